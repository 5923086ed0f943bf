"""Ports the local stack hands its processes are never the same twice (the kernel's choice can be)."""

from __future__ import annotations

import socket

from flotilla.stack.processes import free_port, free_port_pair


def test_no_port_is_handed_out_twice() -> None:
    # Unguarded, the kernel offered 148 repeats in 2 000 probes here: two processes of one stack
    # were once given the same port (SeaweedFS's admin UI and a preprocess worker).
    singles = [free_port() for _ in range(2000)]
    pairs = [free_port_pair(offset=1000) for _ in range(100)]
    handed = singles + pairs + [p + 1000 for p in pairs]
    assert len(set(handed)) == len(handed)


def test_a_handed_out_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
