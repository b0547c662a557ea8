"""ASHA against FIFO on the same trial configs: total trial-epochs and the best validation metric.

Both schedulers run the same seeded random search (Ray's BasicVariantGenerator draws the
same configs in the same order for the same seed and search space), on one preprocessed
dataset of the real TACO sample, on one local Ray. The runs alternate (FIFO first in odd
repeats, ASHA first in even ones) so that a change in machine load hits both.

    python benchmarks/asha_vs_fifo.py /path/to/taco-sample /tmp/asha-bench \
        --task map:/path/to/taco-maps/map_4.csv --repeat 2

Prints one line per run and a Markdown table for BENCHMARKS.md. Target: ASHA runs at
most 40% of FIFO's trial-epochs, and its best metric is within 0.02 of FIFO's.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402

# The search space of the benchmark: small CNNs on 32x32 crops.
SPACE = {
    "model": {
        "conv_blocks": {"choice": [2, 3]},
        "filters": {"choice": [16, 32]},
        "dense_units": 64,
        "batch_norm": {"choice": [False, True]},
        "activation": {"choice": ["relu", "leaky_relu"]},
        "dropout": {"uniform": [0.0, 0.4]},
    },
    "optimization": {"learning_rate": {"loguniform": [3e-4, 3e-3]}, "batch_size": 32},
    "data": {"flip": "horizontal", "rotation": 0.0, "zoom": 0.0},
}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("taco_dir", type=Path, help="TACO folder with annotations.json (the real sample)")
    parser.add_argument("out", type=Path, help="work folder; the dataset is kept there between runs")
    parser.add_argument("--task", required=True,
                        help="preprocessing task, e.g. map:taco-maps/map_4.csv (4 classes of crops: Bottle, Can, "
                             "Plastic bag + wrapper, Other)")
    parser.add_argument("--min-class-examples", type=int, default=0, help="crop tasks: merge smaller classes into Other")
    parser.add_argument("--image-size", type=int, default=32, help="pixels per side")
    parser.add_argument("--split", dest="fractions", default="0.6,0.3,0.1",
                        help="train,val,test split fractions; a larger validation split ranks trials with less noise")
    parser.add_argument("--num-samples", type=int, default=16, help="trials per run")
    parser.add_argument("--max-epochs", type=int, default=16)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each scheduler")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    return parser.parse_args()


def linked_out(data_dir: Path, destination: Path) -> Path:
    """Make a fresh OUT whose data/ links to the shared dataset's files."""
    (destination / "data").mkdir(parents=True)
    for item in data_dir.iterdir():
        (destination / "data" / item.name).symlink_to(item)
    return destination


def run_once(scheduler: str, arguments: argparse.Namespace, data_dir: Path, run_dir: Path) -> dict:
    import raywaste

    out = linked_out(data_dir, run_dir)
    load_before = machine.load_average()
    started = time.perf_counter()
    result = raywaste.tune(
        out, search_space=SPACE, scheduler=scheduler, num_samples=arguments.num_samples, max_epochs=arguments.max_epochs,
        grace_period=arguments.grace_period, reduction_factor=arguments.reduction_factor, seed=arguments.seed,
        keep_checkpoints=1,
    )
    wall_s = time.perf_counter() - started
    rows = list(csv.DictReader((out / "tune" / "results.csv").open()))
    configs = sorted(json.dumps({key: row[key] for key in row if key.startswith("config/")}, sort_keys=True) for row in rows)
    return {
        "scheduler": scheduler,
        "trials": len(rows),
        "trial_epochs": sum(int(row["epochs"]) for row in rows),
        "stopped_early": sum(row["stopped_early"] == "True" for row in rows),
        "best_metric": max(float(row[f"best_{result.metric}"]) for row in rows),
        "metric": result.metric,
        "wall_s": round(wall_s, 1),
        "load_before": round(load_before, 1),
        "load_after": round(machine.load_average(), 1),
        "configs": configs,
    }


def main() -> int:
    arguments = parse_arguments()
    logging.basicConfig(level=logging.WARNING)
    import ray

    import raywaste

    print(f"command: {machine.command_line()}")
    print(f"machine: {machine.describe()}")
    ray.init(num_cpus=arguments.num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        prepared = raywaste.preprocess(arguments.taco_dir, arguments.out / "dataset", task=arguments.task,
                                       size=arguments.image_size, min_class_examples=arguments.min_class_examples,
                                       fractions=arguments.fractions)
        counts = prepared.info.counts
        print(f"dataset: {prepared.info.task}, {prepared.info.num_classes} classes, {arguments.image_size} px, "
              f"train {counts['train']}, val {counts['val']}")
        runs = []
        for repeat in range(arguments.repeat):
            order = ("fifo", "asha") if repeat % 2 == 0 else ("asha", "fifo")
            for scheduler in order:
                run = run_once(scheduler, arguments, prepared.data_dir, arguments.out / f"{scheduler}-{repeat}")
                runs.append(run)
                print(json.dumps({key: value for key, value in run.items() if key != "configs"}))
    finally:
        ray.shutdown()

    fifo = [run for run in runs if run["scheduler"] == "fifo"]
    asha = [run for run in runs if run["scheduler"] == "asha"]
    same_configs = all(run["configs"] == fifo[0]["configs"] for run in runs)
    print(f"\nsame trial configs in every run: {same_configs}")
    print(f"\n| repeat | FIFO trial-epochs | ASHA trial-epochs | ASHA / FIFO | FIFO best {runs[0]['metric']} | ASHA best | "
          "difference | FIFO wall s | ASHA wall s | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for repeat, (first, second) in enumerate(zip(fifo, asha)):
        ratio = second["trial_epochs"] / first["trial_epochs"]
        loads = [first["load_before"], first["load_after"], second["load_before"], second["load_after"]]
        print(f"| {repeat} | {first['trial_epochs']} | {second['trial_epochs']} | {ratio:.0%} | {first['best_metric']:.3f} | "
              f"{second['best_metric']:.3f} | {second['best_metric'] - first['best_metric']:+.3f} | {first['wall_s']:.0f} | "
              f"{second['wall_s']:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    return 0 if same_configs else 1


if __name__ == "__main__":
    sys.exit(main())
