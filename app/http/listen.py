"""The listening sockets of the HTTP servers (PORT, METRICS_PORT)."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, *, shared: bool) -> socket.socket:
    """A TCP socket bound to host:port (OSError if that address cannot be had). Shared by worker processes: each
    binds its own with SO_REUSEPORT and the kernel spreads new connections over them by a hash of the connection's
    addresses, so keep-alive clients land evenly on the workers, rather than on whichever wins the race to accept
    on one socket they all listen on (the busiest worker's loop is the last to get there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP, and without
    # it Nagle's algorithm holds a response's body until the client's delayed ACK of its headers (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
