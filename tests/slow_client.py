"""A raw HTTP/1.1 client that can stop in the middle of a request body, as a slow or stalled uploader does."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class PartialRequest:
    """Sends the request line and headers, then the body only when told to."""

    def __init__(self, url: str, path: str, headers: dict[str, str], *, timeout_s: float = 30) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> Answer:
        response = http.client.HTTPResponse(self.sock, method="POST")
        response.begin()
        return Answer(response.status, response.headers, response.read())

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (a read returns end of file or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PartialRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
