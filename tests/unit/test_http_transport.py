"""httpx's own transport, as the Qonto and Cegid clients build it: each way a connection can
behave becomes the httpx outcome those boundaries classify, on real loopback sockets (plain and
TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import pathlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """A raw TCP server on loopback running ``handler`` per connection; yields its base URL."""
    tasks: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """The request head, then as much body as Content-Length says."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


def ok(body: bytes, *, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


Client = Callable[..., httpx.AsyncClient]


@pytest.fixture
def client() -> Client:
    """Builds an httpx client on the transport the Qonto and Cegid clients use (no retries of
    its own: their policy retries)."""

    def build(
        url: str, *, timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None
    ) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(limits=LIMITS, retries=0, verify=ssl_context or True)
        return httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport)

    return build


async def test_keep_alive_connection_is_reused(client: Client) -> None:
    """Requests in sequence share one connection."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(3):
            await read_request(reader)
            writer.write(ok(b"x"))
            await writer.drain()

    async with serve(handler) as url, client(url) as http:
        for _ in range(3):
            assert (await http.get("/")).status_code == 200
    assert connections == 1


async def test_idle_connection_closed_by_the_server_is_not_reused(client: Client) -> None:
    """A keep-alive connection the server closed while idle is noticed: the next request opens a
    new connection instead of failing on the dead one."""
    connections = 0
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(ok(b"x"))
        await writer.drain()
        if connections == 1:  # close the first one after its answer, without saying so
            writer.close()
            await writer.wait_closed()
            closed.set()
            return
        await read_request(reader)

    async with serve(handler) as url, client(url) as http:
        first = await http.get("/")
        await asyncio.wait_for(closed.wait(), 5)
        stream = first.extensions["network_stream"]
        async with asyncio.timeout(5):  # the FIN reaches the client within a loop turn or two
            while not stream.get_extra_info("is_readable"):  # noqa: ASYNC110 - no event to await: poll the client's view under a deadline
                await asyncio.sleep(0.005)
        assert (await http.get("/")).status_code == 200
    assert connections == 2


async def test_large_download_arrives_whole_in_bounded_chunks(client: Client) -> None:
    """Five megabytes stream through intact; no chunk handed to httpx exceeds what it asked for."""
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(body))
        await writer.drain()

    received = bytearray()
    largest = 0
    async with serve(handler) as url, client(url) as http, http.stream("GET", "/") as response:
        async for chunk in response.aiter_raw():
            largest = max(largest, len(chunk))
            received += chunk
            await asyncio.sleep(0)  # a slow reader
    assert bytes(received) == body
    assert largest <= 64 * 1024  # httpcore reads 64 KiB at a time


async def test_no_answer_within_the_read_timeout_is_a_read_timeout(client: Client) -> None:
    """A server that reads the request and never answers: httpx.ReadTimeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with serve(handler) as url, client(url, timeout=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")


async def test_server_closing_after_the_request_is_a_protocol_error(client: Client) -> None:
    """The whole request was read, then the connection closed without an answer: the outcome is
    unknown to the caller (httpx.RemoteProtocolError)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serve(handler) as url, client(url) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/", content=b"z" * 1000)


async def test_connection_reset_after_the_request_is_a_read_error(client: Client) -> None:
    """A reset (RST) instead of an answer: httpx.ReadError."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    async with serve(handler) as url, client(url) as http:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await http.post("/", content=b"z" * 1000)


async def test_reset_while_the_body_is_sent_fails_before_the_body_is_consumed(
    client: Client,
) -> None:
    """The server resets before taking the whole body: the request fails and the body iterator
    was not exhausted, which is how ``relay.upstreams.cegid`` knows the file did not go (httpcore swallows
    the write error and reports the read that follows)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1024)
        writer.transport.abort()

    exhausted = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal exhausted
        for _ in range(2000):
            yield b"y" * (64 * 1024)
            await asyncio.sleep(0)
        exhausted = True

    async with serve(handler) as url, client(url) as http:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)):
            await http.post("/", content=body(), headers={"Content-Length": str(2000 * 65536)})
    assert not exhausted


async def test_a_server_that_stops_reading_is_a_write_timeout(client: Client) -> None:
    """Back-pressure that never lifts: httpx.WriteTimeout, not a hang."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    size = 64 * 1024 * 1024
    async with serve(handler) as url, client(url, timeout=0.3) as http:
        with pytest.raises(httpx.WriteTimeout):
            await http.post("/", content=b"w" * size)


async def test_refused_connection_is_a_connect_error(client: Client) -> None:
    """Nothing listening: httpx.ConnectError (the request never left)."""
    async with serve(read_request) as url:
        pass  # closed: its port is free now
    async with client(url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


def _certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, bytes]:
    """A self-signed certificate for 127.0.0.1: (cert file, key file, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, pem


async def test_tls_request_is_verified_and_served(client: Client, tmp_path: pathlib.Path) -> None:
    """HTTPS: the certificate is checked against the given trust and the answer arrives over
    TLS."""
    cert_file, key_file, pem = _certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_file, key_file)
    trusted = ssl.create_default_context(cadata=pem.decode())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"secure", close=True))
        await writer.drain()

    async with serve(handler, tls=server_context) as url:
        async with client(url, ssl_context=trusted) as http:
            response = await http.get("/")
            assert response.content == b"secure"
            assert response.extensions["network_stream"].get_extra_info("ssl_object") is not None
        async with client(url, ssl_context=ssl.create_default_context()) as http:
            with pytest.raises(httpx.ConnectError):  # not trusted by the default trust store
                await http.get("/")
