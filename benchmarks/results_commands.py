"""Time the commands that read data and results: inspect, predict, evaluate and report.

Each command runs as a user runs it (a fresh ``raywaste`` process, imports included), the
variants interleaved and repeated, with the 1-minute load average recorded before each run.
``predict`` on 1 photo and on all sample photos separates the start-up cost (Python,
TensorFlow, loading the model) from the cost per photo. ``evaluate`` with 0 and 10 baseline
epochs gives the cost of the dense-network baseline.

The dataset is the sample's binary:Bottle task at --size pixels, and the model is an untrained
CNN of the default architecture (tuning is not what is measured here).

    python benchmarks/results_commands.py --data /path/to/data --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import command_line, describe, load_average


def prepare(data: Path, out: Path, size: int) -> None:
    """Preprocess the sample with a local Ray and save an untrained model with its metadata."""
    import keras
    import ray

    import raywaste
    from raywaste.dataset import load_dataset_info
    from raywaste.model import ModelConfig, make_model

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        raywaste.preprocess(data / "taco-sample", out, task="binary:Bottle", size=size)
    finally:
        ray.shutdown()
    info = load_dataset_info(out / "data")
    model = make_model(ModelConfig(), info.input_shape, info.num_classes)
    model.optimizer.build(model.trainable_variables)
    model.save(out / "best_model.keras")
    metadata = {"task": info.task, "class_names": info.class_names, "image_size": info.image_size,
                "color_mode": info.color_mode, "dataset": info.raw["settings"], "config": ModelConfig().to_dict()}
    (out / "best_model.json").write_text(json.dumps(metadata))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with taco-sample/ and taco-official/")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (default 3)")
    parser.add_argument("--size", type=int, default=128, help="image size of the dataset in pixels (default 128)")
    arguments = parser.parse_args()

    raywaste = str(Path(sys.executable).with_name("raywaste"))
    sample = arguments.data / "taco-sample"
    with tempfile.TemporaryDirectory(prefix="raywaste-bench-") as temporary:
        out = Path(temporary) / "out"
        prepare(arguments.data, out, arguments.size)
        plots = Path(temporary) / "plots"
        commands = {
            "inspect official (text)": [raywaste, "inspect", str(arguments.data / "taco-official" / "annotations.json")],
            "inspect sample --plots": [raywaste, "inspect", str(sample / "annotations.json"), "--plots", str(plots)],
            "predict 1 photo": [raywaste, "predict", str(out), str(sample / "batch_1" / "000006.jpg"), "--json"],
            "predict 102 photos": [raywaste, "predict", str(out), str(sample), "--json"],
            "evaluate, no dense baseline": [raywaste, "evaluate", str(out), "--baseline-epochs", "0"],
            "evaluate, dense baseline 10 epochs": [raywaste, "evaluate", str(out), "--baseline-epochs", "10"],
            "report": [raywaste, "report", str(out)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        loads: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(arguments.repeats):
            for name, command in commands.items():
                loads[name].append(load_average())
                started = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - started)
                shutil.rmtree(plots, ignore_errors=True)

    print(f"command: {command_line()}")
    print(f"machine: {describe()}")
    print(f"dataset: taco-sample, binary:Bottle, {arguments.size} px; {arguments.repeats} runs each, interleaved\n")
    print("| command | median s | min s | max s | load average (min-max) |")
    print("|---|---|---|---|---|")
    for name in commands:
        print(f"| {name} | {statistics.median(times[name]):.1f} | {min(times[name]):.1f} | {max(times[name]):.1f} "
              f"| {min(loads[name]):.1f}-{max(loads[name]):.1f} |")
    per_photo = (statistics.median(times["predict 102 photos"]) - statistics.median(times["predict 1 photo"])) / 101
    print(f"\npredict: about {per_photo * 1000:.0f} ms per photo beyond the start-up (difference of medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
