"""Connect to Ray: an existing cluster when an address is given, else a local Ray in-process."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Make sure Ray is initialized for the duration of the block.

    ``address`` (or the ``RAY_ADDRESS`` environment variable) joins a running cluster,
    for example the one that ``cluster/start-ray.sh`` starts inside a batch job. With
    neither, a local Ray starts in this process with ``num_cpus`` CPUs (default: all).
    A Ray that is already initialized (by a driver script or a test) is used as it is
    and left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        context = ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.info("starting a local Ray with %s CPUs", num_cpus if num_cpus is not None else "all")
        context = ray.init(num_cpus=num_cpus, logging_level=logging.WARNING)
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    try:
        yield
    finally:
        ray.shutdown()
