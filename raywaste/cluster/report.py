"""What the running cluster has and did: nodes and their resources, the software versions
on each node, and how many tasks ran on each node.

The formatting functions take what Ray returns (``ray.nodes()``, task states), so they
work without a cluster. ``print_report`` is the part that talks to Ray.
"""

from __future__ import annotations

import os
import platform
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

GIB = 1024**3
# Maximum number of tasks that Ray 2.60's state API returns per request (RAY_MAX_LIMIT_FROM_API_SERVER).
TASK_LIMIT = 10_000


def node_lines(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Format one line per node from ``ray.nodes()`` entries, sorted by address."""
    lines = []
    for node in sorted(nodes, key=lambda node: node["NodeManagerAddress"]):
        resources = node.get("Resources", {})
        lines.append(
            f"node {node['NodeManagerAddress']}: {'alive' if node['Alive'] else 'dead'}, "
            f"host {node.get('NodeManagerHostname', '?')}, "
            f"CPU {resources.get('CPU', 0):g}, GPU {resources.get('GPU', 0):g}, "
            f"memory {resources.get('memory', 0) / GIB:.1f} GiB"
        )
    return lines


def software_versions() -> dict[str, str]:
    """Return the host name and the versions of Python, NumPy, TensorFlow and Ray in this process."""
    # Silence TensorFlow's C++ start-up messages unless TF_CPP_MIN_LOG_LEVEL is set already.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy
    import ray

    try:
        import tensorflow

        tensorflow_version = tensorflow.__version__
    except ImportError:
        tensorflow_version = "not installed"
    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "tensorflow": tensorflow_version,
        "ray": ray.__version__,
    }


def version_line(address: str, versions: Mapping[str, str]) -> str:
    return (
        f"versions {address}: python {versions['python']}, numpy {versions['numpy']}, "
        f"tensorflow {versions['tensorflow']}, ray {versions['ray']}"
    )


def task_lines(tasks: Iterable[Mapping[str, Any]], address_of_node: Mapping[str, str]) -> list[str]:
    """Count tasks per node address, with a count for each task name, most frequent first.

    ``tasks`` are task states with ``node_id``, ``name`` and ``type``; driver tasks and
    tasks not yet placed on a node are left out.
    """
    per_node: dict[str, Counter[str]] = {address: Counter() for address in address_of_node.values()}
    for task in tasks:
        if task.get("type") == "DRIVER_TASK" or not task.get("node_id"):
            continue
        address = address_of_node.get(task["node_id"], task["node_id"])
        per_node.setdefault(address, Counter())[task["name"]] += 1
    lines = []
    for address in sorted(per_node):
        names = per_node[address]
        common = ", ".join(f"{name}: {count}" for name, count in names.most_common())
        lines.append(f"tasks {address}: {sum(names.values())}" + (f" ({common})" if common else ""))
    return lines


def print_report(versions: bool, tasks: bool) -> None:
    """Connect to the cluster in RAY_ADDRESS and print its nodes, and optionally versions and tasks."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(logging_level="WARNING", log_to_driver=False)
    try:
        nodes = ray.nodes()
        alive = [node for node in nodes if node["Alive"]]
        resources = ray.cluster_resources()
        print(
            f"Ray {ray.__version__} cluster: {len(alive)} nodes alive, "
            f"CPU {resources.get('CPU', 0):g}, GPU {resources.get('GPU', 0):g}"
        )
        for line in node_lines(nodes):
            print(line)

        if versions:
            # num_cpus=0 so the check runs even where the CPUs are busy.
            remote_versions = ray.remote(num_cpus=0)(software_versions)
            pending = {
                node["NodeManagerAddress"]: remote_versions.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote()
                for node in alive
            }
            print(version_line("driver", software_versions()))
            for address, reference in sorted(pending.items()):
                print(version_line(address, ray.get(reference)))

        if tasks:
            from ray.util.state import list_tasks

            states = list_tasks(limit=TASK_LIMIT, raise_on_missing_output=False)
            address_of_node = {node["NodeID"]: node["NodeManagerAddress"] for node in nodes}
            rows = [{"node_id": state.node_id, "name": state.name, "type": state.type} for state in states]
            if len(rows) >= TASK_LIMIT:
                print(f"tasks: counting only the first {TASK_LIMIT} tasks that the state API returned")
            for line in task_lines(rows, address_of_node):
                print(line)
    finally:
        ray.shutdown()
