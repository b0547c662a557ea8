"""The tuning driver's memory over a run of many small trials.

Runs ``--num-samples`` tiny trials (one conv block on 16x16 photos, FIFO, a few epochs)
on the real TACO sample and samples the driver's resident memory (VmRSS of this process)
every half second, together with the number of finished trials. The figure of interest is
the growth between the 10th and the last finished trial: flat means the driver keeps no
per-trial state that grows with the run.

    python benchmarks/driver_memory.py /path/to/taco-sample /tmp/memory-bench --num-samples 50
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402

SPACE = {
    "model": {"conv_blocks": 1, "filters": 4, "dense_units": 8, "batch_norm": False, "activation": "relu",
              "dropout": {"uniform": [0.0, 0.3]}},
    "optimization": {"learning_rate": {"loguniform": [1e-3, 1e-2]}, "batch_size": 32},
    "data": {"flip": "none"},
}


def resident_mib() -> float:
    """VmRSS of this process, in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def finished_trials(experiment_dir: Path, max_epochs: int) -> int:
    """Count trials whose progress.csv has all epochs (header plus one row per epoch)."""
    count = 0
    for progress in experiment_dir.glob("trial_*/progress.csv"):
        try:
            if sum(1 for _ in progress.open()) >= max_epochs + 1:
                count += 1
        except OSError:
            continue
    return count


class Sampler(threading.Thread):
    """Record (seconds, VmRSS MiB, finished trials) every ``interval_s`` until stopped."""

    def __init__(self, experiment_dir: Path, max_epochs: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.experiment_dir, self.max_epochs, self.interval_s = experiment_dir, max_epochs, interval_s
        self.samples: list[tuple[float, float, int]] = []
        self._stopping = threading.Event()
        self._began = time.perf_counter()

    def run(self) -> None:
        while not self._stopping.is_set():
            self.samples.append((time.perf_counter() - self._began, resident_mib(),
                                 finished_trials(self.experiment_dir, self.max_epochs)))
            self._stopping.wait(self.interval_s)

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def memory_at(samples: list[tuple[float, float, int]], trials: int) -> float:
    """Return the highest VmRSS seen while ``trials`` trials had finished."""
    values = [rss for _, rss, finished in samples if finished == trials]
    return max(values) if values else float("nan")


def summarize(samples: list, num_samples: int, max_epochs: int, wall_s: float, before_tune: float) -> dict:
    """Reduce the samples to the figures for BENCHMARKS.md.

    "During trials" ends when the last trial finishes. After that, tune() reads every
    trial's history and draws the plots, which is reported on its own as the final peak.
    """
    running = [finished for _, _, finished in samples if finished < num_samples]
    last_running = max(running) if running else 0
    growth = memory_at(samples, last_running) - memory_at(samples, 10)
    return {
        "trials": num_samples,
        "epochs_per_trial": max_epochs,
        "wall_s": round(wall_s, 1),
        "rss_before_tune_mib": round(before_tune, 1),
        "rss_at_10_trials_mib": round(memory_at(samples, 10), 1),
        "rss_at_25_trials_mib": round(memory_at(samples, 25), 1),
        f"rss_at_{last_running}_trials_mib": round(memory_at(samples, last_running), 1),
        f"growth_10_to_{last_running}_trials_mib": round(growth, 1),
        "growth_per_trial_kib": round(1024 * growth / max(1, last_running - 10), 1),
        "rss_peak_after_trials_mib": round(max(rss for _, rss, finished in samples if finished >= num_samples), 1),
        "load_after": round(machine.load_average(), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("taco_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-samples", type=int, default=50)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    import raywaste

    print(f"command: {machine.command_line()}")
    print(f"machine: {machine.describe()}")
    ray.init(num_cpus=arguments.num_cpus, include_dashboard=False, logging_level="WARNING")
    try:
        raywaste.preprocess(arguments.taco_dir, arguments.out, task="binary:Bottle", size=16)
        before_tune = resident_mib()
        sampler = Sampler(arguments.out / "tune", arguments.max_epochs)
        sampler.start()
        started = time.perf_counter()
        raywaste.tune(arguments.out, search_space=SPACE, scheduler="fifo", num_samples=arguments.num_samples,
                      max_epochs=arguments.max_epochs, keep_checkpoints=1, overwrite=True)
        wall_s = time.perf_counter() - started
        sampler.stop()
    finally:
        ray.shutdown()

    summary = summarize(sampler.samples, arguments.num_samples, arguments.max_epochs, wall_s, before_tune)
    print(json.dumps(summary))
    (arguments.out / "driver_memory.json").write_text(json.dumps({"summary": summary, "samples": sampler.samples}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
