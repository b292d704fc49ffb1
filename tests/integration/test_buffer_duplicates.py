"""One consumer batch holding the same Qonto event id twice: applied once, the other a duplicate."""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika.abc
import asyncpg
import orjson
import pytest

from relay import config
from relay.broker import amqp
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories


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
    return await factories.process_from_queue(
        settings, amqp_connection, pool, publisher, len(bodies)
    )


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


@pytest.mark.parametrize(
    ("transaction_first", "outcome", "documents"),
    [(True, "applied", 1), (False, "ignored_topic", 0)],
    ids=["transaction-then-card", "card-then-transaction"],
)
async def test_a_reused_event_id_in_a_batch_is_recorded_and_applied_as_the_first_copy_says(
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    pool: asyncpg.Pool,
    publisher: amqp.Publisher,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    transaction_first: bool,
    outcome: str,
    documents: int,
) -> None:
    """A v1/transactions and a v1/cards with one id: the events row and the documents agree."""
    tx, _ = factories.receipt(qonto)
    transaction = qonto.transaction_event(tx)
    card = {**transaction, "type": "v1/cards", "data": {"id": str(uuid.uuid4())}}
    first, second = (transaction, card) if transaction_first else (card, transaction)
    counts = await _one_batch(
        upstream_settings, amqp_connection, pool, publisher, connection_id, [first, second]
    )
    assert counts == {outcome: 1, "duplicate": 1}
    row = await pool.fetchrow("SELECT topic, outcome FROM events")
    assert (row["topic"], row["outcome"]) == (first["type"], outcome)
    assert await pool.fetchval("SELECT count(*) FROM documents") == documents
