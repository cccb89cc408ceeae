"""The HTTP servers' listening sockets: connections send without Nagle's delay, and worker processes share a port
only when they ask to."""

from __future__ import annotations

import asyncio
import socket

import pytest

from app.http.listen import listening_socket


def test_accepted_connections_send_without_delay() -> None:
    """asyncio sets TCP_NODELAY only on sockets that say they are TCP: without it a response's body waits for the
    client's delayed ACK of its headers (40 ms a request at one client)."""

    async def nodelay_of_an_accepted_connection() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listening_socket("127.0.0.1", 0, shared=False)
        async with await asyncio.start_server(on_connection, sock=sock):
            _, writer = await asyncio.open_connection(*sock.getsockname())
            try:
                return await asyncio.wait_for(accepted, 10)
            finally:
                writer.close()

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0


def test_only_shared_sockets_share_a_port() -> None:
    first = listening_socket("127.0.0.1", 0, shared=True)
    first.listen()
    port = first.getsockname()[1]
    with first, listening_socket("127.0.0.1", port, shared=True):  # a second worker's
        pass
    alone = listening_socket("127.0.0.1", 0, shared=False)
    alone.listen()
    with alone, pytest.raises(OSError):
        listening_socket("127.0.0.1", alone.getsockname()[1], shared=False)
