"""The sandboxes' HTTP/1.1 server: keep-alive, streamed bodies both ways, dropped connections."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest

from relay.sandbox import http


async def _echo(request: http.Request) -> http.Response:
    """Hashes the body as it streams; answers what it saw."""
    if request.path == "/drop":
        raise http.Drop
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/stream":
        size = int(request.arg("size", "0") or "0")
        body = (b"x" * 1000 for _ in range(size // 1000))
        length = size if request.arg("length") == "yes" else None
        return http.Response(200, body, "application/octet-stream", length=length)
    digest, size, largest = hashlib.sha256(), 0, 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
        largest = max(largest, len(chunk))
    answer = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "header": request.headers.get("x-probe"),
        "size": size,
        "largest_chunk": largest,
        "sha256": digest.hexdigest(),
    }
    return http.Response(200, orjson.dumps(answer))


@pytest.fixture
def server() -> Iterator[http.ServerThread]:
    with http.ServerThread(_echo, name="test-http") as running:
        yield running


def _read_response(sock: socket.socket, buffer: bytearray) -> bytes:
    """Reads one Content-Length response from the socket; returns its body."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    buffer[:] = rest[length:]
    return rest[:length]


def test_server_keeps_the_connection_alive_between_requests(server: http.ServerThread) -> None:
    """Two requests sent one after the other on one socket both get their answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        buffer = bytearray()
        for path in ("/first", "/second"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert orjson.loads(_read_response(sock, buffer))["path"] == path


def test_server_parses_method_path_query_and_lower_cases_headers(
    server: http.ServerThread,
) -> None:
    """The handler sees the method, the unquoted path, every query value and lower-case headers."""
    response = httpx.post(
        f"{server.url}/a%20b?k=1&k=2&empty=",
        content=b"hello",
        headers={"X-Probe": "Yes"},
    )
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/a b"
    assert seen["query"] == {"k": ["1", "2"], "empty": [""]}
    assert seen["header"] == "Yes"
    assert seen["size"] == 5


def test_server_streams_a_large_request_body_to_the_handler(server: http.ServerThread) -> None:
    """An 8 MB upload reaches the handler in bounded chunks, whole and unaltered."""
    block = bytes(range(256)) * 4096  # 1 MiB

    def body() -> Iterator[bytes]:
        for _ in range(8):
            yield block

    response = httpx.post(f"{server.url}/upload", content=body(), timeout=30)
    seen = response.json()
    assert seen["size"] == 8 * len(block)
    assert seen["sha256"] == hashlib.sha256(block * 8).hexdigest()
    assert 0 < seen["largest_chunk"] <= 4 * http.CHUNK


@pytest.mark.parametrize(("length", "chunked"), [("yes", False), ("no", True)])
def test_server_streams_a_generated_response_body(
    server: http.ServerThread, length: str, chunked: bool
) -> None:
    """A generator body is sent with Content-Length when known, chunked otherwise."""
    response = httpx.get(f"{server.url}/stream?size=300000&length={length}")
    assert response.status_code == 200
    assert response.content == b"x" * 300_000
    assert ("chunked" in response.headers.get("transfer-encoding", "")) is chunked


def test_server_drop_aborts_the_connection_without_an_answer(server: http.ServerThread) -> None:
    """A handler raising Drop leaves the client with no response at all."""
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{server.url}/drop", content=b"data")


def test_server_answers_500_when_a_handler_fails(server: http.ServerThread) -> None:
    """A bug in a handler gives a 500 answer, not a hung client."""
    response = httpx.get(f"{server.url}/boom", timeout=5)
    assert response.status_code == 500
    assert b"handler bug" in response.content


def test_server_stops_listening_when_stopped() -> None:
    """After stop(), the port refuses connections."""
    running = http.ServerThread(_echo, name="test-http-stop")
    running.start()
    port = running.port
    assert httpx.get(f"http://127.0.0.1:{port}/x").status_code == 200
    running.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/x", timeout=2)
