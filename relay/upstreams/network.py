"""The sockets under the relay's httpx clients: httpcore on asyncio's own transports, without anyio.

httpcore's default backend goes through anyio, which costs a cancel scope per read and per write,
and, every time the pool assigns a request, a ``getpeername()`` and a ``poll()`` for each pooled
connection (httpcore asks each idle one whether it ``is_readable``). Profiled with py-spy on the
flush of ``make bench`` (C=16), the backend's share was 27% of the flush's CPU. Measured side by side
(2,000 documents, L = 50 ms): 3.5 -> 3.1 ms of CPU per document at C=16 and 4.7 -> 3.5 at C=64;
alone, one POST of 20 KB at 32 in flight costs 1,250 us of client CPU on httpcore's default backend
and 630 us on this one.

Here each connection is an ``asyncio.Protocol`` that buffers what arrives (reading is paused above
``HIGH_WATER`` and resumed below ``LOW_WATER``, so a 20 MB download is never held whole), and:
- a read that finds buffered data returns it at once; otherwise it waits on a future, with a timer
  only when a timeout is set;
- a write hands the bytes to the transport and waits only under back-pressure;
- ``is_readable`` (data or end of stream on an idle connection) is answered from that state;
- TLS is ``loop.start_tls`` on the same protocol, the handshake bounded by the connect timeout.
Failures become httpcore's exceptions, so httpx and the callers (``relay.upstreams.cegid``'s "was the whole
body sent?" classification in particular) see exactly what they saw before.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import typing

import httpcore
import httpx

HIGH_WATER: typing.Final = 256 * 1024
LOW_WATER: typing.Final = 64 * 1024


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Protocol(asyncio.Protocol):
    """What one connection has received, whether it ended, and whether it may be written to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of chunks[0] already handed out
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.lost = False
        self.reading_paused = False
        self.writing_paused = False
        self.read_waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        _wake(self.read_waiter)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.read_waiter)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.eof = True
        self.error = exc
        _wake(self.read_waiter)
        _wake(self.write_waiter)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        _wake(self.write_waiter)

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what is buffered (there is some); resumes reading when drained."""
        head = self.chunks[0]
        if self.offset == 0 and len(head) <= max_bytes:
            self.chunks.popleft()
            data = head
        else:
            data = head[self.offset : self.offset + max_bytes]
            self.offset += len(data)
            if self.offset == len(head):
                self.chunks.popleft()
                self.offset = 0
        self.buffered -= len(data)
        if self.reading_paused and self.buffered <= LOW_WATER and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return data


async def _wait(protocol: _Protocol, attribute: str, seconds: float | None) -> None:
    """Until the protocol wakes ``attribute``'s waiter; TimeoutError after ``seconds``."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    setattr(protocol, attribute, waiter)
    timer = loop.call_later(seconds, _expire, waiter) if seconds is not None else None
    try:
        await waiter
    finally:
        setattr(protocol, attribute, None)
        if timer is not None:
            timer.cancel()


def _describe(exc: BaseException | None, default: str) -> str:
    if exc is None:
        return default
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Stream(httpcore.AsyncNetworkStream):
    """One connection, plain or TLS, as httpcore uses it."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.chunks and not protocol.eof:
            try:
                await _wait(protocol, "read_waiter", timeout)
            except TimeoutError as exc:
                raise httpcore.ReadTimeout(f"no data within {timeout} s") from exc
        if protocol.chunks:
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(_describe(protocol.error, "connection lost"))
        return b""  # the peer closed the connection

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol, transport = self._protocol, self._transport
        if protocol.lost or transport.is_closing():
            raise httpcore.WriteError(_describe(protocol.error, "connection closed"))
        transport.write(buffer)
        if transport.is_closing():  # the send failed at once: the bytes did not leave
            raise httpcore.WriteError(_describe(protocol.error, "connection lost while writing"))
        while protocol.writing_paused and not protocol.lost:
            try:
                await _wait(protocol, "write_waiter", timeout)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(f"could not write within {timeout} s") from exc
        if protocol.lost:
            raise httpcore.WriteError(_describe(protocol.error, "connection lost while writing"))

    async def aclose(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()
        await asyncio.sleep(0)  # let the loop release the socket before the caller goes on

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport,
                    self._protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                    ssl_handshake_timeout=timeout if timeout else None,
                )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"TLS handshake not done within {timeout} s") from exc
        except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; both are named
            self._transport.abort()
            raise httpcore.ConnectError(_describe(exc, "TLS handshake failed")) from exc
        if transport is None:  # the connection closed during the handshake
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        self._protocol.transport = transport
        return Stream(transport, self._protocol)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":  # on an idle connection: unexpected data, or the peer closed
            return bool(self._protocol.chunks) or self._protocol.eof
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class Backend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on the running asyncio loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await _connect(
            loop.create_connection(_Protocol, host, port, local_addr=local),
            timeout,
            socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        return await _connect(loop.create_unix_connection(_Protocol, path), timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(
    connecting: typing.Awaitable[tuple[asyncio.BaseTransport, _Protocol]],
    timeout: float | None,
    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None,
) -> Stream:
    """A new connection within ``timeout``, as httpcore's exceptions when it fails."""
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await connecting
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(f"no connection within {timeout} s") from exc
    except OSError as exc:
        raise httpcore.ConnectError(_describe(exc, "connection failed")) from exc
    sock = transport.get_extra_info("socket")
    for option in socket_options or ():
        sock.setsockopt(*option)
    return Stream(typing.cast(asyncio.Transport, transport), protocol)


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's default verification (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), built once per
    process: loading the trust store costs tens of milliseconds each time."""
    return httpx.create_ssl_context()


def transport(
    limits: httpx.Limits, *, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose pool uses ``Backend``; TLS is verified as httpx does by default
    unless ``ssl_context`` says otherwise.

    httpx takes no network backend, so the pool it built is replaced by one with the same
    settings; ``tests/unit/test_network.py`` checks that responses really come through it."""
    context = ssl_context or _default_ssl_context()
    built = httpx.AsyncHTTPTransport(limits=limits, verify=context)
    built._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=Backend(),
    )
    return built
