"""raywaste: TACO litter photos to a tuned Keras classifier, with Ray Data and Ray Tune.

The stages are importable functions that return result objects, so a driver
script can chain them::

    import raywaste

    data = raywaste.preprocess("taco/", "out/", task="binary:Bottle")
    tuned = raywaste.tune("out/", num_samples=8)
    metrics = raywaste.evaluate("out/")

The stages, Ray and TensorFlow load on first use, not at import.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["RunResult", "__version__", "build_report", "evaluate", "predict", "preprocess", "resume", "run", "tune"]

_API_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str):
    # The API loads on first use, so tools that import only a submodule (the cluster
    # scripts on every node) do not pay for NumPy, pyarrow and Pillow.
    if name in _API_NAMES:
        from raywaste import api

        return getattr(api, name)
    raise AttributeError(f"module 'raywaste' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)
