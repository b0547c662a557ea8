"""Checks of a Ray cluster address before ray.init, against real sockets on 127.0.0.1."""

import socket

import pytest

from raywaste.runtime import RayAddressError, check_address


@pytest.mark.parametrize("address", ["localhost", "10.0.0.5:", ":6379", "10.0.0.5:port", "10.0.0.5:70000"])
def test_malformed_address_rejected(address):
    with pytest.raises(RayAddressError, match="expected HOST:PORT"):
        check_address(address)


def test_listening_address_accepted():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_address(f"127.0.0.1:{port}")
        check_address(f"ray://127.0.0.1:{port}")


def test_closed_port_names_address():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    with pytest.raises(RayAddressError, match=f"no Ray cluster responds at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}", timeout_s=2)


def test_auto_address_not_probed():
    check_address("auto")
