"""Operators' commands on the dead-letter queue (list, show, replay, purge).

A message's id is ``x-relay-dlq-id`` when the consumer dead-lettered it, else its message id (the
Qonto event id, or a batch's own id) for messages the broker dead-lettered after the delivery
limit. A batch of events (``relay.broker.amqp.Batcher``) is listed and replayed as one message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.abc
import orjson

from relay import config, errors
from relay.broker import amqp

RELAY_HEADERS = (
    amqp.HEADER_REASON,
    amqp.HEADER_FAILED_AT,
    amqp.HEADER_FIRST_FAILED_AT,
    amqp.HEADER_DLQ_ID,
    amqp.HEADER_ATTEMPTS,
)
# What RabbitMQ writes about a message's past (dead-lettering, deliveries): a replay starts afresh.
BROKER_HEADERS = frozenset({"x-death", "x-delivery-count", "x-acquired-count"})
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


def _replayed_header(name: str) -> bool:
    return not (
        name in RELAY_HEADERS or name in BROKER_HEADERS or name.startswith(BROKER_HEADER_PREFIXES)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    event_id: str | None
    connection_id: str | None
    topic: str | None
    reason: str
    failed_at: str | None
    body: bytes
    first_failed_at: str | None = None  # the first failure of an event retried before
    events: tuple[tuple[str, str], ...] = ()  # a batch's events: (Qonto event id, connection)

    def to_json(self, *, with_body: bool = False) -> dict[str, Any]:
        value: dict[str, Any] = {
            "id": self.id,
            "event_id": self.event_id,
            "connection_id": self.connection_id,
            "topic": self.topic,
            "reason": self.reason,
            "failed_at": self.failed_at,
            "first_failed_at": self.first_failed_at or self.failed_at,
        }
        if self.events:
            value["events"] = [{"event_id": e, "connection_id": c} for e, c in self.events]
        if with_body:
            value["body"] = self.body.decode("utf-8", "replace")
        return value


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def describe(message: aio_pika.abc.AbstractIncomingMessage) -> DeadLetter:
    headers = dict(message.headers or {})
    reason = _text(headers.get(amqp.HEADER_REASON))
    if reason is None:
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            reason = f"dead-lettered by RabbitMQ ({_text(deaths[0].get('reason'))})"
        else:
            reason = "dead-lettered by RabbitMQ (delivery limit)"
    topic = None
    listed = headers.get(amqp.HEADER_BATCH)
    pieces: list[amqp.Piece] = []
    if isinstance(listed, list):  # the broker dead-lettered a batch: it is replayed whole
        topic = f"{len(listed)} events in one message"
        pieces = amqp.split(message.body, headers, message.message_id)
        if not all(amqp.HEADER_CONNECTION in p.headers for p in pieces):
            pieces = []  # a header that does not describe the body: no events to list
    else:
        try:
            body = orjson.loads(message.body)
            if isinstance(body, dict) and isinstance(body.get("type"), str):
                topic = body["type"]
        except orjson.JSONDecodeError:
            pass
    return DeadLetter(
        id=_text(headers.get(amqp.HEADER_DLQ_ID)) or message.message_id or "unknown",
        event_id=None if isinstance(listed, list) else message.message_id,
        connection_id=_text(headers.get(amqp.HEADER_CONNECTION)),
        topic=topic,
        reason=reason,
        failed_at=_text(headers.get(amqp.HEADER_FAILED_AT)),
        body=message.body,
        first_failed_at=_text(headers.get(amqp.HEADER_FIRST_FAILED_AT)),
        events=tuple(
            (str(p.message_id), str(p.headers.get(amqp.HEADER_CONNECTION))) for p in pieces
        ),
    )


Action = Callable[[aio_pika.abc.AbstractIncomingMessage, DeadLetter], Awaitable[bool]]


async def _walk(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, action: Action
) -> None:
    """Get every message and hand it to ``action``, then return the ones it left to the queue.

    ``action`` returns True when it settled (acked) the message itself. RabbitMQ cannot fetch a
    message by id, so each operation reads the whole queue with ``basic.get`` (unacknowledged),
    acts on the matching messages and returns the others with a requeue; the queue's order may
    change, which does not matter to a dead-letter queue. Each return is a delivery, which is why
    the dead-letter queue is a classic queue (no delivery limit: see ``relay.broker.amqp``).
    """
    with amqp.translate("dead-letter queue"):
        channel = await conn.channel()
        try:
            queue = await channel.get_queue(settings.dead_letter_queue, ensure=False)
            held: list[aio_pika.abc.AbstractIncomingMessage] = []
            while True:
                message = await queue.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                if not await action(message, describe(message)):
                    held.append(message)
            for message in held:
                await message.nack(requeue=True)
        finally:
            await channel.close()


async def list_messages(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, limit: int | None = None
) -> list[DeadLetter]:
    found: list[DeadLetter] = []

    async def collect(_: aio_pika.abc.AbstractIncomingMessage, letter: DeadLetter) -> bool:
        if limit is None or len(found) < limit:
            found.append(letter)
        return False

    await _walk(settings, conn, collect)
    return found


async def show(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, dlq_id: str
) -> DeadLetter:
    for letter in await list_messages(settings, conn):
        if letter.id == dlq_id:
            return letter
    raise errors.NotFound(f"no dead-lettered message {dlq_id}")


async def replay(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, ids: list[str] | None
) -> int:
    """Send the matching messages (all when ``ids`` is None) back to the events queue.

    Each one is published (confirmed) before it is removed from the dead-letter queue, so a crash
    in between duplicates it (a no-op for the consumer) and never loses it.
    """
    publisher = await amqp.Publisher.open(conn, settings)
    wanted = None if ids is None else set(ids)
    replayed = 0

    async def send_back(message: aio_pika.abc.AbstractIncomingMessage, letter: DeadLetter) -> bool:
        nonlocal replayed
        if wanted is not None and letter.id not in wanted:
            return False
        headers = {k: v for k, v in (message.headers or {}).items() if _replayed_header(k)}
        await publisher.publish(
            settings.events_queue, message.body, message_id=message.message_id, headers=headers
        )
        await message.ack()
        replayed += 1
        return True

    try:
        await _walk(settings, conn, send_back)
    finally:
        await publisher.close()
    if wanted is not None and replayed < len(wanted):
        raise errors.NotFound(
            f"replayed {replayed} of {len(wanted)}: some ids are not in the queue"
        )
    return replayed


async def purge(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, ids: list[str]
) -> int:
    wanted = set(ids)
    purged = 0

    async def drop(message: aio_pika.abc.AbstractIncomingMessage, letter: DeadLetter) -> bool:
        nonlocal purged
        if letter.id not in wanted:
            return False
        await message.ack()
        purged += 1
        return True

    await _walk(settings, conn, drop)
    if purged < len(wanted):
        raise errors.NotFound(f"purged {purged} of {len(wanted)}: some ids are not in the queue")
    return purged
