"""Commands that run a program on another node of the job.

``pbsdsh`` and ``pbs_tmrsh`` start tasks through PBS's task manager, so PBS accounts
for them and kills them when the job ends. ``ssh`` works where compute nodes accept
ssh from inside a job, but PBS does not track what it starts. ``srun`` is the Slurm
counterpart of ``pbsdsh``.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from raywaste.cluster.allocation import Node
from raywaste.cluster.errors import ClusterError


def default_launcher(scheduler: str) -> str:
    return "srun" if scheduler == "slurm" else "pbsdsh"


def launch_command(launcher: str, node: Node, argv: list[str]) -> list[str]:
    """Return the command line that runs ``argv`` on ``node`` with ``launcher``."""
    if launcher == "pbsdsh":
        # -n counts entries of the job's node list, which match the lines of $PBS_NODEFILE.
        return ["pbsdsh", "-n", str(node.launch_index), "--", *argv]
    if launcher == "pbs_tmrsh":
        # NOTE: pbs_tmrsh behaves like rsh, so arguments with spaces are not supported.
        return ["pbs_tmrsh", node.host, *argv]
    if launcher == "ssh":
        # ssh hands the remote shell one string, so quote it here.
        return ["ssh", "-o", "BatchMode=yes", node.host, shlex.join(argv)]
    if launcher == "srun":
        # --overlap lets the stop step run beside the worker step on the same node.
        return ["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={node.host}", *argv]
    raise ClusterError(f"unknown launcher {launcher!r}")


def spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session with output to ``log_path``; do not wait for it."""
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except FileNotFoundError:
            raise ClusterError(
                f"launcher {command[0]!r} not found on PATH; set RAYWASTE_LAUNCHER to one that this site has"
            ) from None
