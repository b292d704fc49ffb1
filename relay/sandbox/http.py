"""A small HTTP/1.1 server for the sandboxes, on asyncio streams and h11 in a thread of its own.

Not uvicorn, because the sandboxes must misbehave on purpose: drop a connection after reading a
body, answer slowly, stream 20 MB without holding it. Handlers get the raw transport's abort as a
fault.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import h11

CHUNK = 64 * 1024


class Drop(Exception):
    """Raised by a handler to abort the connection without answering."""


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    _reader: Callable[[], Awaitable[bytes | None]]
    _consumed: bool = False

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    async def stream(self) -> AsyncIterator[bytes]:
        if self._consumed:
            return
        while True:
            chunk = await self._reader()
            if chunk is None:
                self._consumed = True
                return
            yield chunk

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.stream()])


@dataclasses.dataclass
class Response:
    status: int
    body: bytes | Iterable[bytes] = b""
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    length: int | None = None


Handler = Callable[[Request], Awaitable[Response]]


class ServerThread:
    """A server running ``handler`` on 127.0.0.1 (ephemeral port) in a daemon thread.

    The thread runs an event loop of its own.
    """

    def __init__(self, handler: Handler, *, name: str = "sandbox") -> None:
        self._handler = handler
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self._name} did not start")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=CHUNK * 4)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next_event(conn, reader)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                request = self._request(event, conn, reader)
                try:
                    response = await self._handler(request)
                except Drop:
                    writer.transport.abort()
                    return
                except Exception as exc:  # a sandbox bug answers 500 rather than hanging the client
                    response = Response(500, f"sandbox error: {exc!r}".encode(), "text/plain")
                    response.headers["connection"] = "close"
                async for _ in request.stream():  # drain an unread body before answering
                    pass
                await self._send(conn, writer, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    writer.close()
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, h11.LocalProtocolError, ConnectionError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            # Only stop() cancels a connection; ending quietly keeps asyncio from logging the
            # cancelled handler task as an exception at every shutdown.
            writer.transport.abort()
        finally:
            writer.close()

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(CHUNK)
                conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                return None
            return event

    def _request(
        self, event: h11.Request, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> Request:
        target = event.target.decode("latin-1")
        parts = urllib.parse.urlsplit(target)

        async def read_chunk() -> bytes | None:
            while True:
                next_event = await self._next_event(conn, reader)
                if isinstance(next_event, h11.Data):
                    return bytes(next_event.data)
                return None  # EndOfMessage (or closed)

        return Request(
            method=event.method.decode("ascii"),
            path=urllib.parse.unquote(parts.path),
            query=urllib.parse.parse_qs(parts.query, keep_blank_values=True),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers},
            _reader=read_chunk,
        )

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        headers = [("content-type", response.content_type), *response.headers.items()]
        if isinstance(response.body, bytes):
            headers.append(("content-length", str(len(response.body))))
            chunks: Iterable[bytes] = [response.body] if response.body else []
        else:
            if response.length is not None:
                headers.append(("content-length", str(response.length)))
            chunks = response.body
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        for chunk in chunks:
            writer.write(conn.send(h11.Data(data=chunk)) or b"")
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


def json_error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    """Build a JSON:API-style error, as Qonto answers them."""
    import orjson

    return Response(
        status,
        orjson.dumps({"errors": [{"code": code, "detail": detail}]}),
        headers=headers or {},
    )
