"""Ports for the servers the tests, demo and benchmarks start."""

from __future__ import annotations

import socket

from sglang_kvcomm.server_process import _ephemeral_low, free_port


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    # bind(0), which a server's own sockets use, can never hand out a port below the range
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports)
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
