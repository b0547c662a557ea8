"""Preprocess one TACO folder on a 1-CPU local Ray, then on a head and two worker nodes.

Run by tests/test_multinode.py in its own process, because a process has one Ray
connection and the test session already has one. Usage:

    python tests/multinode_run.py TACO_DIR ANNOTATIONS OUT_ROOT RESULT_JSON

Writes OUT_ROOT/one-cpu and OUT_ROOT/three-nodes, and RESULT_JSON with the node ids of
the cluster. Set RAY_TMPDIR to a private folder so that these clusters' sessions and
address files stay out of other Ray users' way.
"""

import json
import sys

import ray
from ray.cluster_utils import Cluster

import raywaste
from raywaste.preprocessing import RunOptions

# Ray gives a new node 30 s to register, and its dashboard agent may need longer on a
# loaded machine. Ray then raises a plain Exception; a second start gets another 30 s.
# NOTE: with a 1-minute load average above about 15 on 2 CPUs both starts have failed.
STARTUP_ATTEMPTS = 2


def start_with_retries(start):
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            return start()
        except Exception as error:
            if "timed out during startup" not in str(error) or attempt == STARTUP_ATTEMPTS:
                raise
            ray.shutdown()  # stops what the failed start left running
            print(f"Ray start-up timed out (attempt {attempt} of {STARTUP_ATTEMPTS}); starting again", file=sys.stderr)


def start_cluster() -> Cluster:
    """Start a head and two worker nodes with 1 CPU each; shut them down if any fails to start."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def preprocess(taco_dir: str, annotations: str, out: str, photos_per_task: int) -> None:
    raywaste.preprocess(taco_dir, out, annotations=annotations, task="supercategory", size=32, padding=0.1,
                        fractions="0.6,0.2,0.2", options=RunOptions(photos_per_task=photos_per_task))


def main() -> None:
    taco_dir, annotations, out_root, result_path = sys.argv[1:5]

    start_with_retries(lambda: ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING"))
    try:
        preprocess(taco_dir, annotations, f"{out_root}/one-cpu", photos_per_task=5)
    finally:
        ray.shutdown()

    cluster = start_with_retries(start_cluster)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        node_ids = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        preprocess(taco_dir, annotations, f"{out_root}/three-nodes", photos_per_task=1)
        ray.shutdown()
    finally:
        cluster.shutdown()
    with open(result_path, "w") as handle:
        json.dump({"node_ids": node_ids}, handle)


if __name__ == "__main__":
    main()
