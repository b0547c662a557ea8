"""Per-job ports, derived from the job id so that two jobs on one node do not clash.

Each job owns a block of ``PORTS_PER_JOB`` consecutive ports in
``[port_min, port_max]``. The block is chosen by the job number modulo the number of
blocks, so jobs with nearby ids get different blocks. A busy block (another program,
or a job whose number wraps onto the same block) moves the job on to the next one.
Ports that only the node itself needs are left to Ray, which picks free ones.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from dataclasses import dataclass

from raywaste.cluster.errors import ClusterError
from raywaste.cluster.settings import ClusterSettings

logger = logging.getLogger(__name__)

PORTS_PER_JOB = 4


@dataclass(frozen=True)
class JobPorts:
    """The fixed ports of one job's Ray cluster."""

    gcs: int  # head: Ray's GCS, the cluster address (ray start --port)
    dashboard: int  # head: dashboard and Jobs API over HTTP
    client_server: int  # head: Ray Client server
    dashboard_agent: int  # every node: dashboard agent HTTP port, 52365 in Ray by default

    @classmethod
    def from_base(cls, base: int) -> JobPorts:
        return cls(gcs=base, dashboard=base + 1, client_server=base + 2, dashboard_agent=base + 3)

    def head_ports(self) -> tuple[int, ...]:
        return (self.gcs, self.dashboard, self.client_server, self.dashboard_agent)


def job_number(job_key: str) -> int:
    """Return the digits of a job key as one number (``1234_7`` gives 12347)."""
    digits = re.sub(r"\D", "", job_key)
    if not digits:
        raise ClusterError(f"invalid job key {job_key!r}: a job id needs digits to derive ports from")
    return int(digits)


def derive_ports(job_key: str, port_min: int, port_max: int, attempt: int = 0) -> JobPorts:
    """Return the job's port block for ``attempt`` 0, 1, ... (each attempt takes the next block)."""
    blocks = (port_max - port_min + 1) // PORTS_PER_JOB
    if blocks < 1:
        raise ClusterError(f"port range {port_min}-{port_max} is smaller than one block of {PORTS_PER_JOB} ports")
    block = (job_number(job_key) + attempt) % blocks
    return JobPorts.from_base(port_min + block * PORTS_PER_JOB)


def busy_ports(address: str, ports: tuple[int, ...]) -> list[int]:
    """Return those of ``ports`` that cannot be bound on ``address`` right now.

    A bind on the node's own address also fails when another process listens on
    0.0.0.0, so one check covers both cases.
    """
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # Like Ray's servers, ignore connections in TIME_WAIT from an earlier run. Without
            # SO_REUSEPORT the bind still fails on a listener, even one that set it (as gRPC does).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    busy.append(port)
                elif error.errno == errno.EADDRNOTAVAIL:
                    raise ClusterError(
                        f"address {address} is not on this host ({socket.gethostname()}); "
                        "run this step on the node that has it"
                    ) from None
                else:
                    raise ClusterError(f"cannot test port {port} on {address}: {error.strerror}") from None
    return busy


def choose_ports(job_key: str, head_address: str, settings: ClusterSettings) -> JobPorts:
    """Return the first block, starting at the job's own, whose ports are all free on the head."""
    for attempt in range(settings.port_attempts):
        ports = derive_ports(job_key, settings.port_min, settings.port_max, attempt)
        busy = busy_ports(head_address, ports.head_ports())
        if not busy:
            return ports
        logger.warning("ports %s are busy on %s; trying the next block", busy, head_address)
    raise ClusterError(
        f"no free block of {PORTS_PER_JOB} ports on {head_address} after {settings.port_attempts} attempts "
        f"in {settings.port_min}-{settings.port_max}; set RAYWASTE_PORT_MIN/RAYWASTE_PORT_MAX to another range"
    )
