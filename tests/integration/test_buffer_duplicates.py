"""One consumer batch holding the same Qonto event id twice: applied once, the other a duplicate."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika.abc
import asyncpg
import orjson
import pytest

from consumers import buffer
from relay import config
from relay.broker import amqp
from relay.sandbox import qonto as qonto_sandbox
from relay.upstreams import qonto as qonto_client
from tests.integration import factories


@pytest.fixture
async def publisher(
    upstream_settings: config.Settings, amqp_connection: aio_pika.abc.AbstractRobustConnection
) -> AsyncIterator[amqp.Publisher]:
    value = await amqp.Publisher.open(amqp_connection, upstream_settings)
    yield value
    await value.close()


async def _one_batch(
    settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    pool: asyncpg.Pool,
    publisher: amqp.Publisher,
    connection_id: uuid.UUID,
    bodies: list[dict[str, Any]],
) -> dict[str, int]:
    """Publish the events, take them all off the queue and give them to ONE Buffer batch."""
    for body in bodies:
        await publisher.publish_event(
            orjson.dumps(body), connection_id=str(connection_id), event_id=str(body["id"])
        )
    channel = await amqp_connection.channel()
    try:
        queue = await channel.get_queue(settings.events_queue, ensure=False)
        messages = [await queue.get(no_ack=False, timeout=5) for _ in bodies]
        async with qonto_client.http_clients(settings) as http:
            worker = buffer.Buffer(settings, pool, publisher, http)
            return await worker.process([m for m in messages if m is not None])
    finally:
        await channel.close()


async def test_two_copies_of_one_event_in_a_batch_count_one_applied_one_duplicate(
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    pool: asyncpg.Pool,
    publisher: amqp.Publisher,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The same delivery twice in one batch: one document, counted applied once and duplicate once."""
    tx, _ = factories.receipt(qonto)
    event = qonto.transaction_event(tx)
    counts = await _one_batch(
        upstream_settings, amqp_connection, pool, publisher, connection_id, [event, event]
    )
    assert counts == {"applied": 1, "duplicate": 1}
    assert await pool.fetchval("SELECT count(*) FROM documents") == 1
    assert await pool.fetchval("SELECT count(*) FROM events") == 1


async def test_a_reused_event_id_in_a_batch_is_applied_as_the_first_copy_says(
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    pool: asyncpg.Pool,
    publisher: amqp.Publisher,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A v1/transactions then a v1/cards with its id: the events row and the documents agree."""
    tx, _ = factories.receipt(qonto)
    first = qonto.transaction_event(tx)
    second = {**first, "type": "v1/cards", "data": {"id": str(uuid.uuid4())}}
    counts = await _one_batch(
        upstream_settings, amqp_connection, pool, publisher, connection_id, [first, second]
    )
    assert counts == {"applied": 1, "duplicate": 1}
    row = await pool.fetchrow("SELECT topic, outcome FROM events")
    assert (row["topic"], row["outcome"]) == ("v1/transactions", "applied")
    assert await pool.fetchval("SELECT count(*) FROM documents") == 1


async def test_a_reused_event_id_whose_first_copy_is_ignored_makes_no_document(
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    pool: asyncpg.Pool,
    publisher: amqp.Publisher,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A v1/cards then a v1/transactions with its id: recorded ignored, and no document made."""
    tx, _ = factories.receipt(qonto)
    second = qonto.transaction_event(tx)
    first = {**second, "type": "v1/cards", "data": {"id": str(uuid.uuid4())}}
    counts = await _one_batch(
        upstream_settings, amqp_connection, pool, publisher, connection_id, [first, second]
    )
    assert counts == {"ignored_topic": 1, "duplicate": 1}
    row = await pool.fetchrow("SELECT topic, outcome FROM events")
    assert (row["topic"], row["outcome"]) == ("v1/cards", "ignored_topic")
    assert await pool.fetchval("SELECT count(*) FROM documents") == 0
