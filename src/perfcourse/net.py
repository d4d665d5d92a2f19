"""Loopback networking: the only address the course's servers and load generators use."""

from __future__ import annotations

import socket

__all__ = ["LOOPBACK", "free_port"]

#: Every server the course starts listens here, and every load it sends goes here.
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that is free now (the operating system picks it).

    Another process can take it before it is bound: callers that start a server retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
