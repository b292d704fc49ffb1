"""`relay consume`: Qonto events from RabbitMQ into the PostgreSQL buffer, in batches.

The events queue's deliveries are gathered into batches (up to ``batch_size`` or
``batch_window_s``) for :class:`consumers.buffer.Buffer`, which applies and settles them.

A graceful stop lets the deliveries in flight arrive, cancels the subscription and processes the
messages already delivered (within ``drain_s``) instead of handing them back: RabbitMQ counts every
hand-back toward the events queue's delivery limit, and ten restarts during a backlog would
dead-letter good events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import aio_pika
import aio_pika.abc

from consumers import buffer
from relay import amqp, config, db, errors, log, qonto

logger = log.get(__name__)


@dataclasses.dataclass
class Progress:
    """What the consumer has done, for its heartbeat."""

    events: int = 0  # messages settled (applied, duplicate, ignored, retried, dead-lettered)
    last_work_at: float | None = None  # time.time() when the last batch was settled
    subscribed: bool = False  # a consume-ok is in force on the events queue
    in_hand: int = 0  # messages delivered and not yet settled
    oldest_held_ms: int | None = None  # x-received-at-ms of the oldest message in hand


async def consume(
    settings: config.Settings,
    *,
    stop: asyncio.Event | None = None,
    prefetch: int = 1024,
    batch_size: int = 256,
    batch_window_s: float = 0.02,
    retry_delays: Sequence[int] = amqp.RETRY_DELAYS_S,
    drain_s: float = 5.0,
    progress: Progress | None = None,
) -> None:
    """Run until ``stop`` is set; then cancel the subscription, process the messages already
    delivered (for at most ``drain_s`` seconds) and leave.

    Only the messages still unprocessed after ``drain_s`` (or when the broker or an error broke
    the loop) are handed back to the queue, which counts toward its delivery limit.
    ``retry_delays`` (seconds, each one of the declared delay queues) is the wait before each retry
    of a message failing transiently; after the last one it is dead-lettered. Tests shorten it.
    """
    stop = stop or asyncio.Event()
    progress = progress or Progress()
    async with (
        db.pool_for(settings, min_size=1, max_size=2) as pool,
        amqp.connection(settings, name="relay-consume") as conn,
        qonto.http_clients(settings) as http,
    ):
        with amqp.translate("consumer channel"):
            channel = await conn.channel()
            await amqp.declare(channel, settings)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(settings.events_queue, ensure=False)
        publisher = await amqp.Publisher.open(conn, settings)
        worker = buffer.Buffer(settings, pool, publisher, http, retry_delays=retry_delays)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        with amqp.translate("consume"):
            tag = await queue.consume(inbox.put)
        subscribed = progress.subscribed = True
        logger.info("consume_started", queue=settings.events_queue)
        backoff = 1.0
        processed = 0
        try:
            while not stop.is_set():
                batch = await _gather(inbox, stop, batch_size, batch_window_s)
                if not batch:
                    continue
                progress.in_hand = len(batch) + inbox.qsize()
                progress.oldest_held_ms = _received_at(batch[0])
                try:
                    counts = await worker.process(batch)
                    processed += sum(counts.values())
                    progress.events += sum(counts.values())
                    progress.last_work_at = time.time()
                    backoff = 1.0
                except errors.BrokerUnavailable as exc:
                    logger.warning("consume_broker_unavailable", reason=str(exc), pause_s=backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=backoff)
                    backoff = min(backoff * 2, 60.0)
                progress.in_hand, progress.oldest_held_ms = inbox.qsize(), None
            subscribed = progress.subscribed = False
            await _until_window_full(inbox, prefetch)
            if await _unsubscribe(queue, tag):
                drained = await _drain(worker, inbox, batch_size, batch_window_s, drain_s)
                processed += drained
                progress.events += drained
        finally:
            progress.subscribed = False
            if subscribed:
                await _unsubscribe(queue, tag)
            returned = 0
            while not inbox.empty():  # delivered but not processed: back to the queue
                returned += 1
                with contextlib.suppress(Exception):
                    await inbox.get_nowait().nack(requeue=True)
            await publisher.close()
            logger.info("consume_stopped", processed=processed, returned=returned)


def _received_at(message: aio_pika.abc.AbstractIncomingMessage) -> int | None:
    value = (message.headers or {}).get(amqp.HEADER_RECEIVED_AT)
    return value if isinstance(value, int) else None


async def _until_window_full(
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    prefetch: int,
    *,
    quiet_s: float = 0.1,
    within_s: float = 2.0,
) -> None:
    """Wait until no delivery is on its way: the inbox holds ``prefetch`` messages (everything
    unacknowledged, so RabbitMQ sends nothing more) or none arrived for ``quiet_s``.

    Measured on RabbitMQ 3.10: a quorum queue consumer cancelled while deliveries are in flight gets
    them returned to the queue by the broker, each counted as a delivery (classic queues deliver
    them before the cancel-ok).
    """
    deadline = time.monotonic() + within_s
    size, since = inbox.qsize(), time.monotonic()
    while inbox.qsize() < prefetch and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        if inbox.qsize() != size:
            size, since = inbox.qsize(), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break


async def _unsubscribe(queue: aio_pika.abc.AbstractQueue, tag: str) -> bool:
    """Cancel the subscription: RabbitMQ delivers nothing more after its cancel-ok."""
    try:
        with amqp.translate("cancel consumer"):
            await asyncio.wait_for(queue.cancel(tag), timeout=5)
    except errors.BrokerUnavailable as exc:
        logger.warning("consume_cancel_failed", reason=str(exc))
        return False
    return True


async def _drain(
    worker: buffer.Buffer,
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    size: int,
    window: float,
    within_s: float,
) -> int:
    """Process what was delivered before the cancel; stop at ``within_s`` or when the inbox stays
    empty for a moment (deliveries read before the cancel-ok may still be on their way to it)."""
    deadline = time.monotonic() + within_s
    processed = 0
    while time.monotonic() < deadline:
        batch = await _gather(inbox, None, size, window, idle_s=0.1)
        if not batch:
            break
        try:
            processed += sum((await worker.process(batch)).values())
        except errors.BrokerUnavailable as exc:  # the batch went back to the queue
            logger.warning("consume_drain_interrupted", reason=str(exc))
            break
    return processed


async def _gather(
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    stop: asyncio.Event | None,
    size: int,
    window: float,
    *,
    idle_s: float = 1.0,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Up to ``size`` messages: wait ``idle_s`` for the first (or until ``stop``), then at most
    ``window`` seconds for more."""
    getting = asyncio.ensure_future(inbox.get())
    waiting: set[asyncio.Future[Any]] = {getting}
    stopping = None
    if stop is not None:
        stopping = asyncio.ensure_future(stop.wait())
        waiting.add(stopping)
    try:
        await asyncio.wait(waiting, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopping is not None:
            stopping.cancel()
    if not getting.done():
        getting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getting
        return []
    batch = [getting.result()]
    deadline = time.monotonic() + window
    while len(batch) < size:
        try:
            batch.append(inbox.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(inbox.get(), timeout=remaining))
        except TimeoutError:
            break
    return batch
