"""The unit tier's own contract (tests/unit/conftest.py): no process, no network."""

from __future__ import annotations

import socket
import subprocess

import pytest


def test_starting_a_process_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"must not do I/O: subprocess\.Popen"):
        subprocess.run(["true"], check=False)


def test_connecting_a_socket_is_refused_before_any_packet_leaves() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(RuntimeError, match=r"must not do I/O: socket\.connect"),
    ):
        sock.connect(("127.0.0.1", 9))


def test_listening_on_a_port_is_refused() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        pytest.raises(RuntimeError, match=r"must not do I/O: socket\.bind"),
    ):
        sock.bind(("127.0.0.1", 0))
