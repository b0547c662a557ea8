"""Connect to Ray: an existing cluster when an address is given, else a local Ray in-process."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# Seconds to wait for a TCP connection to a cluster address before giving up on it.
CONNECT_TIMEOUT_S = 10.0
# Addresses that ray.init resolves itself instead of connecting to a host and port.
_SPECIAL_ADDRESSES = ("auto", "local")


# The logger of Ray's notice that a local Ray turned token authentication on.
_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _hide_auth_enabled_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


class RayAddressError(RuntimeError):
    """A cluster address is malformed or nothing listens there."""


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayAddressError unless ``address`` is HOST:PORT (or ray://HOST:PORT) and accepts connections.

    Without this check, ray.init raises a bare ValueError for a malformed address and
    retries an unreachable one for minutes.
    """
    if address in _SPECIAL_ADDRESSES:
        return
    host, separator, port_text = address.removeprefix("ray://").rpartition(":")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RayAddressError(f"invalid Ray address {address!r} (from --address or RAY_ADDRESS); "
                              "expected HOST:PORT such as 10.0.0.5:6379, or leave it out for a local Ray")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s):
            pass
    except OSError as error:
        raise RayAddressError(
            f"no Ray cluster responds at {address} (from --address or RAY_ADDRESS): {error}; start one "
            "(cluster/start-ray.sh in a batch job, or 'ray start --head'), or leave the address out for a local Ray"
        ) from None


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
        check_address(address)
        log.info("connecting to the Ray cluster at %s", address)
        context = ray.init(address=address, logging_level=logging.WARNING)
    else:
        log.info("starting a local Ray with %s CPUs", num_cpus if num_cpus is not None else "all")
        # Ray notes on every local start that token authentication is on, which needs no action.
        # Its warning when authentication is off still shows.
        auth_logger = logging.getLogger(_AUTH_LOGGER)
        auth_logger.addFilter(_hide_auth_enabled_notice)
        try:
            context = ray.init(num_cpus=num_cpus, logging_level=logging.WARNING)
        finally:
            auth_logger.removeFilter(_hide_auth_enabled_notice)
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    try:
        yield
    finally:
        ray.shutdown()
