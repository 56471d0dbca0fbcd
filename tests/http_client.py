"""A raw HTTP client for the endpoint's hostile-client checks (tests/test_http_api.py and
bench/reliability.py): bytes as written, so a malformed request reaches the server as sent."""
from __future__ import annotations

import socket
import time


def exchange(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole response (the server closes after it): status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/"), f"no response: {data[:200]!r}"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def posted(path: str, body: bytes, headers: dict[str, str] | None = None, length: str | None = None) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body) if length is None else length}",
            *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def leaves_after_first_piece(port: int, request: bytes, stream: bool) -> None:
    """A client that asks for a long answer and leaves: after its first event, or (not streamed) soon."""
    with socket.create_connection(("127.0.0.1", port), timeout=300) as connection:
        connection.sendall(request)
        if stream:
            received = b""
            while b"data: " not in received:
                more = connection.recv(4096)
                assert more, f"the stream closed before its first piece: {received[:200]!r}"
                received += more
        else:
            time.sleep(0.3)
