"""raywaste: TACO litter photos to a tuned Keras classifier, with Ray Data and Ray Tune.

The stages are importable functions that return result objects, so a driver
script can chain them::

    import raywaste

    data = raywaste.preprocess("taco/", "out/", task="binary:Bottle")
    tuned = raywaste.tune("out/", num_samples=8)
    metrics = raywaste.evaluate("out/")

Ray and TensorFlow load on first use, not at import.
"""

from __future__ import annotations

__version__ = "0.1.0"

from raywaste.api import RunResult, build_report, evaluate, predict, preprocess, run, tune  # noqa: E402

__all__ = ["RunResult", "__version__", "build_report", "evaluate", "predict", "preprocess", "run", "tune"]
