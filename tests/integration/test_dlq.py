"""The dead-letter queue as operators see it, fed by the consumer and by RabbitMQ itself."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika.abc
import asyncpg
import orjson
import pytest

from consumers import consume
from relay import config, errors
from relay.broker import amqp, dlq
from tests.integration import factories

FUTURE = orjson.dumps({"id": "evt-v2", "type": "v2/transactions", "data": {"id": "tx-9"}})


async def _letters(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, n: int
) -> list[dlq.DeadLetter]:
    """Poll the dead-letter queue until it holds ``n`` messages (10 s deadline)."""
    found: list[dlq.DeadLetter] = []

    async def enough() -> bool:
        found[:] = await dlq.list_messages(settings, conn)
        return len(found) >= n

    await factories.until(enough, what=lambda: f"{n} dead letters (found {len(found)})")
    return found


async def _consumer_dead_letters(
    settings: config.Settings,
    pool: asyncpg.Pool,
    conn: aio_pika.abc.AbstractConnection,
    publisher: amqp.Publisher,
) -> list[dlq.DeadLetter]:
    """Run `relay consume` on a future topic version and on garbage: two dead letters."""
    connection_id = str(uuid.uuid4())
    await publisher.publish_event(FUTURE, connection_id=connection_id, event_id="evt-v2")
    await publisher.publish_event(b"<html>", connection_id=connection_id, event_id="evt-html")
    stop = asyncio.Event()
    task = asyncio.create_task(consume.consume(settings, stop=stop))
    try:
        return await _letters(settings, conn, 2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_the_consumer_dead_letters_with_an_id_reason_and_the_original_body(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """Each dead letter lists its own id, event, connection, topic, reason and time; show has the body."""
    letters = await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    by_event = {letter.event_id: letter for letter in letters}
    future = by_event["evt-v2"]
    assert future.topic == "v2/transactions"
    assert future.reason.startswith("unknown version of a used topic: v2/transactions")
    assert future.failed_at is not None
    assert future.id not in ("evt-v2", "evt-html")
    assert by_event["evt-html"].reason == "not JSON"
    assert by_event["evt-html"].topic is None
    assert future.connection_id == by_event["evt-html"].connection_id
    shown = await dlq.show(settings, amqp_connection, future.id)
    assert shown.body == FUTURE
    assert shown.to_json(with_body=True)["body"] == FUTURE.decode()
    assert "body" not in future.to_json()


async def test_listing_leaves_every_message_in_the_queue(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """list and show return the messages to the queue; limit caps what list returns."""
    letters = await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    await dlq.show(settings, amqp_connection, letters[0].id)
    assert len(await dlq.list_messages(settings, amqp_connection, limit=1)) == 1
    again = await dlq.list_messages(settings, amqp_connection)
    assert sorted(m.id for m in again) == sorted(m.id for m in letters)


async def test_the_queue_keeps_its_messages_however_often_it_is_listed(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """Listing returns each message to the queue, a delivery each time: the dead-letter queue is a
    classic queue, which has no delivery limit (a quorum queue gets one of 20 from RabbitMQ 4.0)."""
    letters = await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    for _ in range(25):
        listed = await dlq.list_messages(settings, amqp_connection)
        assert sorted(m.id for m in listed) == sorted(m.id for m in letters)
    channel = await amqp_connection.channel()
    try:  # RabbitMQ refuses (PRECONDITION_FAILED) a declaration that does not match the queue
        await channel.declare_queue(
            settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "classic"}
        )
    finally:
        await channel.close()


async def test_replay_sends_the_original_back_without_the_failure_headers(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """Replay: the original body and headers return to the events queue, attempts reset."""
    letters = await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    future = next(letter for letter in letters if letter.event_id == "evt-v2")
    assert await dlq.replay(settings, amqp_connection, [future.id]) == 1
    remaining = await dlq.list_messages(settings, amqp_connection)
    assert [m.event_id for m in remaining] == ["evt-html"]
    channel = await amqp_connection.channel()
    try:
        queue = await channel.get_queue(settings.events_queue, ensure=False)
        message = await queue.get(no_ack=True, timeout=5)
        assert message is not None
        assert (message.body, message.message_id) == (FUTURE, "evt-v2")
        headers = dict(message.headers or {})
        assert headers[amqp.HEADER_CONNECTION] == future.connection_id
        assert amqp.HEADER_RECEIVED_AT in headers
        assert not set(headers) & {*dlq.RELAY_HEADERS, "x-death", "x-acquired-count"}
        assert headers.get("x-delivery-count", 0) == 0  # a first delivery (get says 0 on quorum)
    finally:
        await channel.close()


async def test_replay_all_empties_the_queue(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """replay with no ids sends every dead letter back to the events queue."""
    await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    assert await dlq.replay(settings, amqp_connection, None) == 2
    assert await dlq.list_messages(settings, amqp_connection) == []
    channel = await amqp_connection.channel()
    try:
        queue = await channel.declare_queue(settings.events_queue, passive=True)
        assert queue.declaration_result.message_count == 2
    finally:
        await channel.close()


async def test_purge_drops_only_the_named_messages(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """purge removes the named dead letter and keeps the others."""
    letters = await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    html = next(letter for letter in letters if letter.event_id == "evt-html")
    assert await dlq.purge(settings, amqp_connection, [html.id]) == 1
    assert [m.event_id for m in await dlq.list_messages(settings, amqp_connection)] == ["evt-v2"]


async def test_unknown_ids_are_not_found_and_change_nothing(
    settings: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """show, replay and purge of an id not in the queue raise NotFound; the queue is unchanged."""
    letters = await _consumer_dead_letters(settings, pool, amqp_connection, publisher)
    with pytest.raises(errors.NotFound):
        await dlq.show(settings, amqp_connection, "no-such-id")
    with pytest.raises(errors.NotFound):
        await dlq.purge(settings, amqp_connection, ["no-such-id"])
    with pytest.raises(errors.NotFound):
        await dlq.replay(settings, amqp_connection, ["no-such-id"])
    assert len(await dlq.list_messages(settings, amqp_connection)) == len(letters)


async def test_a_message_rejected_by_the_broker_is_described_from_x_death(
    settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    publisher: amqp.Publisher,
) -> None:
    """A message RabbitMQ dead-lettered itself is listed by its event id with the broker's reason."""
    await publisher.publish_event(FUTURE, connection_id=str(uuid.uuid4()), event_id="evt-v2")
    channel = await amqp_connection.channel()
    try:
        queue = await channel.get_queue(settings.events_queue, ensure=False)
        message = await queue.get(no_ack=False, timeout=5)
        assert message is not None
        await message.reject(requeue=False)
    finally:
        await channel.close()
    [letter] = await _letters(settings, amqp_connection, 1)
    assert (letter.id, letter.event_id, letter.topic) == ("evt-v2", "evt-v2", "v2/transactions")
    assert letter.reason == "dead-lettered by RabbitMQ (rejected)"
    assert await dlq.replay(settings, amqp_connection, ["evt-v2"]) == 1
