"""Run the raywaste pipeline from Python on a Ray cluster that is already running.

Inside a batch job, after ``source cluster/start-ray.sh`` (or ``source ray.env`` from
the job directory), ``RAY_ADDRESS``, ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN_PATH`` point
at the job's cluster, so a plain ``ray.init()`` joins it with the token:

    python examples/driver.py "$TACO_DIR" "$OUT_DIR" --task binary:Bottle --num-samples 8

The driver connects once; the raywaste calls then use that connection and leave it open.
"""

from __future__ import annotations

import argparse
import os
import sys

import ray

import raywaste


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("taco_dir", help="TACO folder with annotations.json and batch_*/ photos")
    parser.add_argument("out_dir", help="output folder on a file system that every node can read")
    parser.add_argument("--task", default="binary:Bottle", help="task (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the images in pixels (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=8, help="Tune trials (default: %(default)s)")
    parser.add_argument("--max-epochs", type=int, default=5, help="max epochs per trial (default: %(default)s)")
    parser.add_argument("--cpus-per-trial", type=float, default=2, help="CPUs per trial (default: %(default)s)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not os.environ.get("RAY_ADDRESS"):
        print("RAY_ADDRESS is not set: source the job's ray.env first (see docs/cluster.md)", file=sys.stderr)
        return 2

    # 1. Join the running cluster; the token comes from RAY_AUTH_TOKEN_PATH.
    ray.init(log_to_driver=False)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    resources = ray.cluster_resources()
    print(f"joined {os.environ['RAY_ADDRESS']}: {len(nodes)} nodes, {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")

    # 2. Preprocess and tune on the cluster, then score the best model here.
    prepared = raywaste.preprocess(args.taco_dir, args.out_dir, task=args.task, size=args.image_size)
    print(f"dataset: {prepared.info.counts} ({prepared.error_count} photos could not be read)")
    tuned = raywaste.tune(
        args.out_dir, num_samples=args.num_samples, max_epochs=args.max_epochs, cpus_per_trial=args.cpus_per_trial
    )
    print(f"best trial: {tuned.metric} = {tuned.best_metric:.4f}, config {tuned.best_config}")
    evaluated = raywaste.evaluate(args.out_dir)
    print(f"test accuracy {evaluated.accuracy:.3f}, macro F1 {evaluated.macro_f1:.3f}; details in {evaluated.metrics_path}")

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
