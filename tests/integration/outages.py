"""Helpers of the fault tests: events fed to the real RabbitMQ, what landed in PostgreSQL, a held
batch, and a TCP proxy in front of RabbitMQ that can pause the network or lose a frame."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

import aio_pika
import asyncpg
import orjson

from relay import config
from relay.broker import amqp
from tests.integration import factories


def card_event() -> dict[str, object]:
    """A Qonto event the relay records and acknowledges (a topic it has no use for)."""
    return {
        "id": f"evt-{uuid.uuid4()}",
        "subscription_id": "sub-1",
        "organization_id": "org-test",
        "membership_id": "m-1",
        "type": "v1/cards",
        "created_at": "2026-12-05T10:00:00Z",
        "data": {"id": str(uuid.uuid4())},
    }


async def publish(
    settings: config.Settings, connection_id: uuid.UUID, count: int, *, within_s: float = 30
) -> list[str]:
    """Publish ``count`` events (confirmed) on a connection of their own, retried until RabbitMQ
    takes them all (it may be on its way back, or its queue about to be declared again); their ids."""
    events = [card_event() for _ in range(count)]
    deadline = time.monotonic() + within_s
    left = list(events)
    while left:
        try:
            connection = await aio_pika.connect(settings.amqp_url.reveal(), timeout=5)
            async with connection:
                publisher = await amqp.Publisher.open(connection, settings)
                while left:
                    event = left[0]
                    await publisher.publish_event(
                        orjson.dumps(event), connection_id=str(connection_id), event_id=event["id"]
                    )
                    left.pop(0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    return [str(event["id"]) for event in events]


async def fetchval(pool: asyncpg.Pool, sql: str, *, within_s: float = 10) -> object:
    """``pool.fetchval``, tried again while the pool is reconnecting after a fault."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await pool.fetchval(sql)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def landed(pool: asyncpg.Pool) -> list[str]:
    """The event ids in the events table, one per row."""
    return [r["event_id"] for r in await pool.fetch("SELECT event_id FROM events")]


async def until_landed(pool: asyncpg.Pool, ids: Iterable[str], *, within_s: float) -> float:
    """Wait until every one of ``ids`` is a row of the events table; the seconds it took."""
    wanted = set(ids)
    found: set[str] = set()

    async def all_landed() -> bool:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            found.update(wanted & set(await landed(pool)))
        return wanted <= found

    return await factories.until(
        all_landed,
        within_s=within_s,
        what=lambda: f"{len(found)} of {len(wanted)} events landed: all of them",
        every_s=0.05,
    )


async def exactly_once(pool: asyncpg.Pool, ids: Iterable[str]) -> None:
    """Every one of ``ids`` is exactly one row of the events table, and nothing else is."""
    rows = await landed(pool)
    assert sorted(rows) == sorted(ids), f"{len(rows)} rows for {len(list(ids))} events"


@contextlib.asynccontextmanager
async def events_table_locked(database_url: str) -> AsyncIterator[Callable[[], object]]:
    """Hold a lock that makes the consumer's insert into ``events`` wait (reads still pass): the
    batch stays in its hand, unacknowledged; released on leaving. Yields a waiter for the moment
    a backend is blocked on it."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")

        async def blocked(within_s: float = 30) -> None:
            deadline = time.monotonic() + within_s
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            ):
                assert time.monotonic() < deadline, f"no insert waited within {within_s} s"
                await asyncio.sleep(0.05)

        yield blocked
        with contextlib.suppress(Exception):
            await transaction.rollback()
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


# AMQP 0-9-1: a frame is type (1 byte), channel (2), size (4), payload, 0xCE; a method frame's
# payload opens with its class and method ids (2 + 2).
_METHOD_FRAME = 1
BASIC_CANCEL = (60, 30)


class AmqpProxy:
    """A TCP proxy to RabbitMQ on loopback: ``pause()`` stops every byte both ways (connections stay
    open, as in a network pause), ``resume()`` lets them flow again; ``drop`` names server methods
    (class id, method id) the client never receives. A side that closes closes the other."""

    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672) -> None:
        self._target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.drop: set[tuple[int, int]] = set()
        self.dropped = 0
        self.port = 0

    async def __aenter__(self) -> AmqpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def url(self, settings: config.Settings) -> str:
        return settings.amqp_url.reveal().replace(":5672", f":{self.port}")

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, frames=False),
            self._pipe(up_reader, writer, frames=True),
            return_exceptions=True,
        )
        for each in (writer, up_writer):
            self._writers.discard(each)
            each.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, frames: bool
    ) -> None:
        try:
            while True:
                chunk = await (self._frame(reader) if frames else reader.read(65536))
                if not chunk:
                    break
                await self._flowing.wait()
                if frames and self._dropped(chunk):
                    continue
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> bytes:
        try:
            header = await reader.readexactly(7)
            _, _, size = struct.unpack(">BHI", header)
            return header + await reader.readexactly(size + 1)
        except asyncio.IncompleteReadError:
            return b""

    def _dropped(self, frame: bytes) -> bool:
        if frame[0] != _METHOD_FRAME or len(frame) < 11:
            return False
        if struct.unpack(">HH", frame[7:11]) in self.drop:
            self.dropped += 1
            return True
        return False


def settings_through(settings: config.Settings, proxy: AmqpProxy) -> config.Settings:
    """The settings with RabbitMQ reached through the proxy."""
    import dataclasses

    return dataclasses.replace(settings, amqp_url=config.Secret(proxy.url(settings)))
