"""The job's allocation: scheduler, job id, nodes in order, and CPUs and GPUs per node.

PBS Pro lists a job's nodes in ``$PBS_NODEFILE``, one line per MPI rank, so a host can
appear several times. The unique hosts in file order are the Ray nodes, and the first
one (where PBS runs the job script) is the head. Slurm goes through the same code with
``$SLURM_JOB_NODELIST``. Resources come from the allocation, never from Ray's own
detection, because Ray would count every core of a node that the job shares.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from raywaste.cluster.errors import ClusterError
from raywaste.cluster.settings import ClusterSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """One host of the allocation."""

    host: str  # name as the node list gives it
    address: str  # IPv4 address that Ray binds and advertises
    launch_index: int  # 0-based line of the host's first entry in $PBS_NODEFILE (pbsdsh -n)


@dataclass(frozen=True)
class Allocation:
    """The nodes and resources that the scheduler granted this job. ``nodes[0]`` is the head."""

    scheduler: str  # "pbs" or "slurm"
    job_id: str
    job_name: str
    nodes: tuple[Node, ...]
    num_cpus: int  # per node
    num_gpus: int  # per node
    submit_dir: Path  # where qsub or sbatch ran; job output goes there
    submit_host: str  # login node that qsub or sbatch ran on, "" if unknown

    @property
    def key(self) -> str:
        return job_key(self.job_id)


def first_lines_of_hosts(lines: Iterable[str]) -> list[tuple[str, int]]:
    """Return each host of a node file once, in file order, with the 0-based line of its first entry."""
    seen: dict[str, int] = {}
    for index, line in enumerate(lines):
        host = line.strip()
        if host and host not in seen:
            seen[host] = index
    return list(seen.items())


def job_key(job_id: str) -> str:
    """Return the job id's short form used in paths and process matching.

    The server suffix goes and array brackets become underscores:
    ``1234.vulcan-pbs`` gives ``1234`` and ``1234[7].vulcan-pbs`` gives ``1234_7``.
    """
    head = job_id.strip().split(".", 1)[0]
    key = re.sub(r"[^0-9A-Za-z]+", "_", head).strip("_")
    if not key:
        raise ClusterError(f"invalid job id {job_id!r}: expected a form such as 1234.server")
    return key


def resolve_address(host: str) -> str:
    """Return the IPv4 address of ``host``; a node-list entry that is an address stays as it is."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ClusterError(
            f"cannot resolve node {host!r} from the node list: {error}; "
            "check the host name or list addresses instead"
        ) from None
    return str(infos[0][4][0])


def read_allocation(
    environ: Mapping[str, str],
    settings: ClusterSettings,
    resolve: Callable[[str], str] = resolve_address,
) -> Allocation:
    """Read the allocation of the PBS or Slurm job that this process runs in."""
    if environ.get("PBS_JOBID"):
        return _read_pbs(environ, settings, resolve)
    if environ.get("SLURM_JOB_ID"):
        return _read_slurm(environ, settings, resolve)
    raise ClusterError(
        "not inside a batch job: neither PBS_JOBID nor SLURM_JOB_ID is set; "
        "run this from a PBS or Slurm job script"
    )


def _read_pbs(environ: Mapping[str, str], settings: ClusterSettings, resolve: Callable[[str], str]) -> Allocation:
    nodefile = environ.get("PBS_NODEFILE", "")
    if not nodefile:
        raise ClusterError("PBS_NODEFILE is not set; start the cluster from inside the PBS job")
    try:
        lines = Path(nodefile).read_text().splitlines()
    except OSError as error:
        raise ClusterError(f"cannot read PBS_NODEFILE {nodefile}: {error.strerror}") from None
    hosts = first_lines_of_hosts(lines)
    if not hosts:
        raise ClusterError(f"PBS_NODEFILE {nodefile} lists no nodes")

    return Allocation(
        scheduler="pbs",
        job_id=environ["PBS_JOBID"],
        job_name=environ.get("PBS_JOBNAME") or "raywaste",
        nodes=_nodes(hosts, resolve),
        num_cpus=_cpus_per_node(environ, settings, "NCPUS"),
        num_gpus=_gpus_per_node(environ, settings, "NGPUS"),
        submit_dir=Path(environ.get("PBS_O_WORKDIR") or os.getcwd()),
        submit_host=environ.get("PBS_O_HOST", ""),
    )


def _read_slurm(environ: Mapping[str, str], settings: ClusterSettings, resolve: Callable[[str], str]) -> Allocation:
    nodelist = environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        raise ClusterError("SLURM_JOB_NODELIST is not set; start the cluster from inside the Slurm job")
    try:
        expanded = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise ClusterError(f"cannot expand SLURM_JOB_NODELIST {nodelist!r} with scontrol: {error}") from None
    hosts = first_lines_of_hosts(expanded.splitlines())

    return Allocation(
        scheduler="slurm",
        job_id=environ["SLURM_JOB_ID"],
        job_name=environ.get("SLURM_JOB_NAME") or "raywaste",
        nodes=_nodes(hosts, resolve),
        num_cpus=_cpus_per_node(environ, settings, "SLURM_CPUS_ON_NODE"),
        num_gpus=_gpus_per_node(environ, settings, "SLURM_GPUS_ON_NODE"),
        submit_dir=Path(environ.get("SLURM_SUBMIT_DIR") or os.getcwd()),
        submit_host=environ.get("SLURM_SUBMIT_HOST", ""),
    )


def _nodes(hosts: list[tuple[str, int]], resolve: Callable[[str], str]) -> tuple[Node, ...]:
    nodes = tuple(Node(host=host, address=resolve(host), launch_index=index) for host, index in hosts)
    by_address: dict[str, str] = {}
    for node in nodes:
        if node.address in by_address:
            raise ClusterError(
                f"nodes {by_address[node.address]!r} and {node.host!r} both resolve to {node.address}; "
                "every node needs its own address"
            )
        by_address[node.address] = node.host
    return nodes


def _cpus_per_node(environ: Mapping[str, str], settings: ClusterSettings, variable: str) -> int:
    if settings.num_cpus is not None:
        return settings.num_cpus
    text = environ.get(variable, "")
    if not text.isdigit() or int(text) < 1:
        raise ClusterError(
            f"cannot tell the CPUs per node: {variable}={text!r}; request ncpus in the select "
            "statement (PBS) or set RAYWASTE_NUM_CPUS"
        )
    return int(text)


def _gpus_per_node(environ: Mapping[str, str], settings: ClusterSettings, variable: str) -> int:
    if settings.num_gpus is not None:
        return settings.num_gpus
    text = environ.get(variable, "")
    # Slurm may write "a100:2"; the count is the last field.
    count = text.rsplit(":", 1)[-1]
    if count.isdigit():
        return int(count)
    visible = [device for device in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if device.strip()]
    if visible:
        logger.info("GPUs per node taken from CUDA_VISIBLE_DEVICES on the head: %d", len(visible))
    return len(visible)
