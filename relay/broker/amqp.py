"""RabbitMQ's topology, confirmed publishing, and the one boundary translating aio-pika errors.

:func:`declare` lays out the queues, :meth:`Publisher.publish_event` the message the intake
publishes, :func:`connection` and :func:`connect` which connection each role uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import aio_pika
import aio_pika.abc
import aiormq
import pamqp.commands

from relay import config, errors, log

logger = log.get(__name__)

# Delivery counts on ``{p}.events`` (observed on 3.10.8; see tests/integration/test_topology.py):
# every hand-back of an unacknowledged message counts toward ``x-delivery-limit``: nack or reject
# with requeue, a closed channel or connection, and a cancelled subscription's deliveries still in
# flight. (RabbitMQ documents 4.3 as no longer counting ``basic.nack``; 4.0 to 4.2 count every
# return.) So a consumer stopping gracefully does not hand its prefetched messages back: it lets
# the deliveries in flight arrive, cancels its subscription and processes them first
# (``consumers/consume.py``).
DELIVERY_LIMIT: Final = 10
RECONNECT_S: Final = 1.0  # between a robust connection's attempts to reconnect (aio-pika: 5)
RETRY_DELAYS_S: Final = (1, 5, 30, 120, 600)
HEADER_CONNECTION: Final = "x-connection-id"
HEADER_RECEIVED_AT: Final = "x-received-at-ms"
HEADER_ATTEMPTS: Final = "x-relay-attempts"
HEADER_REASON: Final = "x-relay-reason"
HEADER_DLQ_ID: Final = "x-relay-dlq-id"
HEADER_FAILED_AT: Final = "x-relay-failed-at"
HEADER_FIRST_FAILED_AT: Final = "x-relay-first-failed-at"  # kept through the retries
HEADER_BATCH: Final = "x-relay-batch"  # a message holding several events: see Batcher
# Classic queues have no delivery limit on any RabbitMQ version, whereas a quorum queue gets a
# default limit of 20 from 4.0 on, and ``relay dlq`` browses by get and requeue, so every listing
# would count. (``x-delivery-limit: -1`` is no way out: 4.x reads it as "no limit", but 3.10
# accepts it and drops a message at its first return.)
DEAD_LETTER_QUEUE_TYPE: Final = "classic"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    RuntimeError,  # aio-pika raises it on a closed channel/connection
)


@contextlib.contextmanager
def translate(what: str = "broker") -> Iterator[None]:
    """Translate aio-pika/socket errors into BrokerUnavailable (the one boundary)."""
    try:
        yield
    except errors.RelayError:
        raise
    except _UNAVAILABLE as exc:
        raise errors.BrokerUnavailable(
            f"{what}: RabbitMQ unavailable ({type(exc).__name__})"
        ) from exc


def retry_queue_name(settings: config.Settings, delay_s: int) -> str:
    return f"{settings.retry_queue}.{delay_s}s"


async def declare(channel: aio_pika.abc.AbstractChannel, settings: config.Settings) -> None:
    """Declare the whole topology, idempotently, so that every role may call it at start.

    Names are prefixed by ``RELAY_AMQP_PREFIX`` (``{p}`` below):

    ``{p}.events``
        quorum queue of raw Qonto events; ``x-delivery-limit`` guards against a message that
        crashes its consumer, dead-lettering it (at least once) to ``{p}.dlx``.
    ``{p}.events.retry.<n>s``
        quorum queues with a fixed message TTL: a transient failure (database down) republishes
        the message here; on expiry it dead-letters back to ``{p}.events``.
    ``{p}.dlx`` → ``{p}.events.dlq``
        the dead-letter exchange and queue (a durable classic queue). The consumer also publishes
        a message there itself, with ``x-relay-reason``, when it can never be processed.

    Raise ConfigurationError when a queue already exists with other arguments (RabbitMQ answers
    PRECONDITION_FAILED and never changes a queue's arguments): the message names the queue.
    """
    with translate("declare"), _inequivalent():
        dlx = await channel.declare_exchange(
            settings.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dlq = await channel.declare_queue(
            settings.dead_letter_queue,
            durable=True,
            arguments={"x-queue-type": DEAD_LETTER_QUEUE_TYPE},
        )
        await dlq.bind(dlx, routing_key=settings.dead_letter_queue)
        await channel.declare_queue(
            settings.events_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": settings.dead_letter_exchange,
                "x-dead-letter-routing-key": settings.dead_letter_queue,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for delay in RETRY_DELAYS_S:
            await channel.declare_queue(
                retry_queue_name(settings, delay),
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": delay * 1000,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": settings.events_queue,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )


@contextlib.contextmanager
def _inequivalent() -> Iterator[None]:
    try:
        yield
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise errors.ConfigurationError(
            f"RabbitMQ refused the topology: {exc} (a queue keeps the arguments it was first "
            "declared with: move its messages elsewhere and delete it, then start again)"
        ) from exc


async def delete_topology(channel: aio_pika.abc.AbstractChannel, settings: config.Settings) -> None:
    """Remove every queue and exchange of this prefix (tests clean up after themselves)."""
    with translate("delete"):
        names = [
            settings.events_queue,
            settings.dead_letter_queue,
            *(retry_queue_name(settings, d) for d in RETRY_DELAYS_S),
        ]
        for name in names:
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        await channel.exchange_delete(settings.dead_letter_exchange)


@contextlib.asynccontextmanager
async def connection(
    settings: config.Settings, *, name: str = "relay"
) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """Open a robust connection for publishers (the intake), closed on exit.

    aio-pika reconnects it and reopens its channels, trying every ``RECONNECT_S`` (publishing
    fails meanwhile: the intake answers 503). It restores no consumer reliably: the consumer uses
    :func:`connect`.
    """
    with translate("connect"):
        conn = await aio_pika.connect_robust(
            settings.amqp_url.reveal(),
            client_properties={"connection_name": name},
            timeout=10,
            reconnect_interval=RECONNECT_S,
        )
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def connect(
    settings: config.Settings,
    *,
    name: str,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> aio_pika.abc.AbstractConnection:
    """Open a plain connection, which does not come back by itself.

    Its owner watches it (its ``close_callbacks``) and opens a new one, declaring and subscribing
    again.

    aio-pika's robust connection restores channels, but only the queues it declared on them:
    a queue obtained otherwise (``get_queue(..., ensure=False)``) keeps no consumer after a
    reconnection, and messages delivered on the old channel can no longer be acknowledged.
    """
    with translate("connect"):
        return await aio_pika.connect(
            settings.amqp_url.reveal(), client_properties={"connection_name": name}, timeout=timeout
        )


async def queue_state(conn: aio_pika.abc.AbstractConnection, name: str) -> tuple[int, int]:
    """Return a queue's (messages ready, consumers) by a passive declare.

    The declare goes on a channel of its own (a missing queue closes the channel it is asked on).
    Raises BrokerUnavailable when the state cannot be read.
    """
    with translate(f"check queue {name}"):
        channel = await conn.channel(publisher_confirms=False)
        try:
            declared = await channel.declare_queue(name, passive=True)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
    result = declared.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


class Publisher:
    """Publisher of persistent messages on a confirm channel, returning once RabbitMQ confirmed."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, settings: config.Settings) -> None:
        self._channel = channel
        self._settings = settings

    @classmethod
    async def open(
        cls, conn: aio_pika.abc.AbstractConnection, settings: config.Settings
    ) -> Publisher:
        with translate("open channel"):
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, settings)

    @property
    def channel(self) -> aio_pika.abc.AbstractChannel:
        return self._channel

    @property
    def events_queue(self) -> str:
        return self._settings.events_queue

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = 5.0,  # noqa: ASYNC109 - aio-pika's confirm timeout
    ) -> None:
        """Publish to the default exchange and wait for RabbitMQ's confirmation.

        Raises BrokerUnavailable unless it is confirmed (ack) in time; a message RabbitMQ returns
        as unroutable (``mandatory``) is not an ack. The frame goes out on aio-pika's underlying
        aiormq channel (``get_underlay_channel``, what ``Exchange.publish`` does too) with its
        properties built directly, without an ``aio_pika.Message`` per webhook.
        """
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
            headers=dict(headers or {}),
            message_id=message_id,
        )
        if self._channel.is_closed:
            raise errors.BrokerUnavailable("publish: RabbitMQ channel closed")
        with translate("publish"):
            channel = await self._channel.get_underlay_channel()
            if channel.is_closed:
                raise errors.BrokerUnavailable("publish: RabbitMQ channel closed")
            confirmation = await channel.basic_publish(
                body,
                exchange="",
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=timeout,
            )
        if not isinstance(confirmation, pamqp.commands.Basic.Ack):
            raise errors.BrokerUnavailable(f"publish: RabbitMQ did not confirm ({confirmation!r})")

    async def publish_event(
        self,
        body: bytes,
        *,
        connection_id: str,
        event_id: str,
        received_at_ms: int | None = None,
        timeout: float | None = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Publish a Qonto event on the events queue, in the format the consumer reads.

        The body is the webhook body exactly as received; the message is persistent, its
        ``message_id`` the Qonto event id, its headers ``x-connection-id`` and ``x-received-at-ms``
        (unix milliseconds, int).
        """
        await self.publish(
            self._settings.events_queue,
            body,
            message_id=event_id,
            headers={
                HEADER_CONNECTION: connection_id,
                HEADER_RECEIVED_AT: received_at_ms or time.time_ns() // 1_000_000,
            },
            timeout=timeout,
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One Qonto event for the events queue, with what the consumer needs to read it."""

    body: bytes  # the webhook body exactly as received
    connection_id: str
    event_id: str
    received_at_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """One event read back from a message of the events queue (:func:`split`)."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None


def split(body: bytes, headers: Mapping[str, Any], message_id: str | None) -> list[Piece]:
    """Read a message of the events queue back as its events, in the order they were received.

    A message without ``x-relay-batch`` is one event. A batch's header lists, for each event, its
    id, connection, time of receipt and size; its body is their bodies end to end. Each event gets
    the message's other headers with its own connection and time of receipt. A batch whose header
    does not describe its body is returned whole, as one piece (which then fails as not an event).
    """
    listed = headers.get(HEADER_BATCH)
    if listed is None:
        return [Piece(body, dict(headers), message_id)]
    shared = {k: v for k, v in headers.items() if k != HEADER_BATCH}
    pieces, at = [], 0
    try:
        for entry in listed:
            size = int(entry["size"])
            pieces.append(
                Piece(
                    body[at : at + size],
                    {
                        **shared,
                        HEADER_CONNECTION: _text(entry["connection"]),
                        HEADER_RECEIVED_AT: int(entry["received_at_ms"]),
                    },
                    _text(entry["id"]),
                )
            )
            at += size
    except (TypeError, KeyError, ValueError):
        return [Piece(body, shared, message_id)]
    if at != len(body) or not pieces:
        return [Piece(body, shared, message_id)]
    return pieces


def events_in(headers: Mapping[str, Any] | None) -> int:
    """Count the events a message of the events queue holds, from its headers alone."""
    listed = (headers or {}).get(HEADER_BATCH)
    return len(listed) if isinstance(listed, list) and listed else 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Batcher:
    """Publishes the intake's events, several to a message while a publish is in flight.

    An event that finds fewer than ``in_flight`` publishes waiting for RabbitMQ's confirmation
    goes out at once, alone, in the one-event format. The others wait for the next free slot and
    go together, up to ``max_events`` or ``max_bytes`` per message, in one confirmed message
    (:func:`split` reads it back). So a quiet intake adds no wait, and a busy one makes RabbitMQ
    write and confirm one message per handful of events, not one per event. Each caller returns
    once its own message is confirmed, or gets ``BrokerUnavailable`` (never a 202 for less).
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        in_flight: int = 2,
        max_events: int = 32,
        max_bytes: int = 4 * 1024 * 1024,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        """``on_sent`` is told the number of events of each message once it is confirmed."""
        self._publisher = publisher
        self._on_sent = on_sent
        self._in_flight = in_flight
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._flying = 0
        self._waiting: list[tuple[Event, asyncio.Future[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish_event(self, body: bytes, *, connection_id: str, event_id: str) -> None:
        """Queue one event; return once RabbitMQ confirmed the message that holds it."""
        event = Event(body, connection_id, event_id, time.time_ns() // 1_000_000)
        if self._flying < self._in_flight and not self._waiting:
            self._flying += 1
            try:
                await self._send([event])
            finally:
                self._landed()
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, done))
        await done

    def _landed(self) -> None:
        """Free a slot, and send what waits for one."""
        self._flying -= 1
        if self._waiting and self._flying < self._in_flight:
            self._flying += 1
            batch: list[tuple[Event, asyncio.Future[None]]] = []
            size = 0
            for event, done in self._waiting:
                if batch and (
                    len(batch) >= self._max_events or size + len(event.body) > self._max_bytes
                ):
                    break
                batch.append((event, done))
                size += len(event.body)
            del self._waiting[: len(batch)]
            task = asyncio.get_running_loop().create_task(self._carry(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _carry(self, batch: list[tuple[Event, asyncio.Future[None]]]) -> None:
        try:
            await self._send([event for event, _ in batch])
        except BaseException as exc:
            for _, done in batch:
                if not done.done():
                    done.set_exception(
                        exc
                        if isinstance(exc, errors.BrokerUnavailable)
                        else errors.BrokerUnavailable(f"publish: {type(exc).__name__}")
                    )
                    done.exception()  # a caller gone (disconnected) leaves it unretrieved
            if not isinstance(exc, Exception):
                raise
        else:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
        finally:
            self._landed()

    async def _send(self, batch: list[Event]) -> None:
        await self._publish(batch)
        if self._on_sent is not None:
            self._on_sent(len(batch))

    async def _publish(self, batch: list[Event]) -> None:
        if len(batch) == 1:
            event = batch[0]
            await self._publisher.publish_event(
                event.body,
                connection_id=event.connection_id,
                event_id=event.event_id,
                received_at_ms=event.received_at_ms,
            )
            return
        listed = [
            {
                "id": event.event_id,
                "connection": event.connection_id,
                "received_at_ms": event.received_at_ms,
                "size": len(event.body),
            }
            for event in batch
        ]
        await self._publisher.publish(
            self._publisher.events_queue,
            b"".join(event.body for event in batch),
            message_id=f"batch-{uuid.uuid4()}",
            headers={HEADER_BATCH: listed, HEADER_RECEIVED_AT: batch[0].received_at_ms},
        )


async def ping(conn: aio_pika.abc.AbstractConnection) -> None:
    """Raise BrokerUnavailable unless the connection is open and a channel can be opened."""
    with translate("ping"):
        if conn.is_closed:
            raise errors.BrokerUnavailable("ping: RabbitMQ connection is closed")
        channel = await asyncio.wait_for(conn.channel(), timeout=2)
        await channel.close()


# ------------------------------------------------------------------ queue depths (relay status)


@dataclasses.dataclass(frozen=True, slots=True)
class Depth:
    """A queue's ready messages and subscribed consumers (both None when there is no queue)."""

    name: str
    ready: int | None
    consumers: int | None


async def depths(conn: aio_pika.abc.AbstractConnection, names: Sequence[str]) -> list[Depth]:
    """Read each queue's depth by a passive declare (no management plugin needed).

    Unacknowledged messages are not counted as ready. A missing queue is reported, not created.
    """
    found: list[Depth] = []
    channel: aio_pika.abc.AbstractChannel | None = None
    try:
        for name in names:
            with translate("queue depth"):
                if channel is None or channel.is_closed:
                    channel = await conn.channel()
                underlay = await channel.get_underlay_channel()
                try:
                    declared = await underlay.queue_declare(name, passive=True, timeout=5)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    found.append(Depth(name, None, None))
                    with contextlib.suppress(Exception):  # RabbitMQ closed it (404)
                        await channel.close()
                    channel = None
                    continue
            found.append(Depth(name, declared.message_count, declared.consumer_count))
    finally:
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
    return found
