"""`relay serve` under a broker and a database that restart beneath it (fault tests, run apart).

RabbitMQ away: the intake answers 503, never 202 for an event it could not queue, and 202 again
within seconds of RabbitMQ's return (its confirm channel comes back). PostgreSQL away: known
connections are still accepted (their secrets are in memory), /readyz names PostgreSQL, and the
LISTEN connection comes back (a connection disconnected afterwards is refused within seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import httpx
import pytest

from relay import config, models
from relay.broker import amqp
from relay.domain import connections
from relay.store import db
from tests import services
from tests.integration import factories, outages, processes

pytestmark = pytest.mark.fault


class Intake:
    """Signed webhooks for one connection, sent to `relay serve`; what each one was answered."""

    def __init__(self, client: httpx.AsyncClient, path: str) -> None:
        self._client = client
        self._path = path
        self.accepted: list[str] = []  # event ids answered 202

    async def post(self) -> int | None:
        event = outages.card_event()
        body, headers = factories.signed(event)
        try:
            answer = await self._client.post(self._path, content=body, headers=headers, timeout=10)
        except httpx.TransportError:
            return None
        if answer.status_code == 202:
            self.accepted.append(str(event["id"]))
        return answer.status_code

    async def until(self, status: int, *, within_s: float) -> float:
        """Send webhooks until one answers ``status``; the seconds it took."""
        started = time.monotonic()
        while (answer := await self.post()) != status:
            assert time.monotonic() - started < within_s, (
                f"no {status} within {within_s} s (last {answer})"
            )
            await asyncio.sleep(0.1)
        return time.monotonic() - started


@pytest.fixture
async def serve(settings: config.Settings, tmp_path: pathlib.Path) -> AsyncIterator[processes.Role]:
    process = processes.Role(
        settings, "serve", log_path=tmp_path / "serve.log", env={"RELAY_WORKERS": "1"}
    )
    try:
        await process.ready()
        yield process
    finally:
        process.close()


@pytest.fixture
async def intake(
    settings: config.Settings, pool: asyncpg.Pool, serve: processes.Role
) -> AsyncIterator[Intake]:
    connection_id = await factories.make_connection(pool, settings)
    async with httpx.AsyncClient(base_url=serve.url) as client:
        yield Intake(client, settings.webhook_path(str(connection_id)))


async def _queued(settings: config.Settings) -> set[str]:
    """The ids of the events waiting in the events queue, a batch's each (read without taking
    them)."""
    connection = await aio_pika.connect(settings.amqp_url.reveal(), timeout=5)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.events_queue, ensure=False)
        found = set()
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            pieces = amqp.split(message.body, message.headers or {}, message.message_id)
            found.update(str(piece.message_id) for piece in pieces)
        return found  # unacknowledged: back in the queue when the channel closes


async def _readyz(serve: processes.Role) -> tuple[int, dict[str, str]]:
    async with httpx.AsyncClient(base_url=serve.url) as client:
        answer = await client.get("/readyz", timeout=10)
        return answer.status_code, answer.json()


@pytest.mark.parametrize("fault", ["rabbitmq_restart", "close_all_connections"])
async def test_the_intake_answers_503_while_rabbitmq_is_away_and_202_once_it_is_back(
    fault: str,
    settings: config.Settings,
    serve: processes.Role,
    intake: Intake,
    faults: services.Services,
) -> None:
    """Never a 202 for an event that could not be queued (every accepted event is in the queue);
    the intake resumes by itself within seconds, on a new confirm channel."""
    await intake.until(202, within_s=10)
    if fault == "rabbitmq_restart":
        await faults.rabbitmq_stop()
        await intake.until(503, within_s=10)
        status, checks = await _readyz(serve)
        assert status == 503
        assert checks["rabbitmq"].startswith("unavailable"), checks
        assert checks["postgresql"] == "ok", checks
        await faults.rabbitmq_start()
    else:
        await faults.rabbitmq_close_connections()
    await intake.until(202, within_s=30)
    for _ in range(5):
        assert await intake.post() == 202
    assert set(intake.accepted) <= await _queued(settings)
    assert serve.alive()


@pytest.mark.parametrize("fault", ["postgres_restart", "backends_terminated"])
async def test_known_connections_are_accepted_through_a_postgresql_outage_and_listen_comes_back(
    fault: str,
    settings: config.Settings,
    pool: asyncpg.Pool,
    serve: processes.Role,
    intake: Intake,
    faults: services.Services,
) -> None:
    """PostgreSQL restarted or its backends terminated: a known connection's webhooks are still
    accepted (/readyz names PostgreSQL meanwhile); afterwards the LISTEN connection is back, so a
    connection disconnected then is refused with 404 within seconds (not at the next minute's
    reload)."""
    await intake.until(202, within_s=10)
    if fault == "postgres_restart":
        await faults.postgres_stop()
        for _ in range(3):
            assert await intake.post() == 202
        status, checks = await _readyz(serve)
        assert status == 503
        assert checks["postgresql"].startswith("unavailable"), checks
        assert checks["rabbitmq"] == "ok", checks
        await faults.postgres_start()
    else:
        await faults.postgres_terminate(db.database_name(settings.database_url.reveal()))
        assert await intake.post() == 202

    async def ready() -> bool:
        return (await _readyz(serve))[0] == 200

    await factories.until(ready, within_s=30, what="relay serve ready again", every_s=0.2)
    [connection_id] = [r["id"] for r in await _fetch_connections(pool)]
    await connections.set_state(
        pool, connection_id, models.ConnectionState.DISCONNECTED, "disconnected by a fault test"
    )
    took = await intake.until(404, within_s=15)
    assert took < 15
    assert set(intake.accepted) <= await _queued(settings)


async def _fetch_connections(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """The connections (the test's pool reconnects after the fault)."""
    for _ in range(50):
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
            return list(await pool.fetch("SELECT id FROM connections"))
        await asyncio.sleep(0.1)
    return list(await pool.fetch("SELECT id FROM connections"))
