"""`relay run` as a process: one role ending stops the whole process, loudly; SIGTERM stops it cleanly."""

from __future__ import annotations

import pathlib
import signal
import uuid
from collections.abc import AsyncIterator

import aio_pika.abc
import asyncpg
import httpx
import orjson
import pytest

from relay import config
from relay.broker import amqp, dlq
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories, processes

Run = processes.Role


@pytest.fixture
async def run(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    tmp_path: pathlib.Path,
) -> AsyncIterator[Run]:
    """`relay run` with a connection, started and ready."""
    await factories.connect(upstream_settings, pool, qonto)
    process = Run(upstream_settings, "run", log_path=tmp_path / "relay-run.log")
    try:
        await process.ready()
        yield process
    finally:
        process.close()


async def test_a_role_that_dies_stops_relay_run_with_exit_1_naming_it(
    run: Run,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """The consumer dies (its table is gone): relay run logs run_role_failed for it, stops the
    intake and the scheduler, and exits 1, rather than answering 202 for events nothing processes."""
    await pool.execute("ALTER TABLE events RENAME TO events_gone")
    connection_id = await pool.fetchval("SELECT id FROM connections")
    publisher = await amqp.Publisher.open(amqp_connection, upstream_settings)
    try:
        event = {"id": "evt-1", "type": "v1/transactions", "data": {"id": "tx-1"}}
        await publisher.publish_event(
            orjson.dumps(event), connection_id=str(connection_id), event_id=str(uuid.uuid4())
        )
    finally:
        await publisher.close()
    assert await run.exit_code(within_s=45) == 1
    failures = [line for line in run.lines() if line.get("event") == "run_role_failed"]
    assert [(f["role"], f["level"]) for f in failures] == [("consume", "error")], run.log()
    assert 'relation "events" does not exist' in failures[0]["error"]
    assert (
        await dlq.list_messages(upstream_settings, amqp_connection) == []
    )  # not the event's fault
    with pytest.raises(httpx.TransportError):  # the intake stopped with it
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{run.port}/healthz", timeout=2)


async def test_sigterm_stops_every_role_and_exits_0(run: Run) -> None:
    """SIGTERM: the intake, the consumer and the scheduler stop, and the process exits 0."""
    run.process.send_signal(signal.SIGTERM)
    assert await run.exit_code(within_s=45) == 0, run.log()
    assert not [line for line in run.lines() if line.get("event") == "run_role_failed"]
