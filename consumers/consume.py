"""The ``relay consume`` worker, moving Qonto events from RabbitMQ to the PostgreSQL buffer.

The events queue's deliveries are gathered into batches (up to ``batch_size`` events, a batch
message counting each of its events, or ``batch_window_s``) for :class:`consumers.buffer.Buffer`, which applies and settles them.
:class:`_Consumer` runs one :class:`_Session` (connection, subscription, batches) after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Final

import aio_pika.abc
import asyncpg
import pamqp.commands

from consumers import buffer
from relay import config, errors, log, outage, retry
from relay.broker import amqp
from relay.store import db
from relay.upstreams import qonto

logger = log.get(__name__)

CHECK_EVERY_S: Final = 2.0  # how often the subscription and PostgreSQL are checked
CHECK_TIMEOUT_S: Final = 5.0  # a check unanswered for this long: the connection is taken as lost
CLOSE_TIMEOUT_S: Final = 5.0
# PostgreSQL probed while a batch is held: from half a second, as the roles' outage policy
HOLD_PROBES: Final = retry.Policy(first_s=0.5, cap_s=4.0, floor=0.5)


@dataclasses.dataclass
class Progress:
    """What the consumer has done, for its heartbeat."""

    events: int = 0  # messages settled (applied, duplicate, ignored, retried, dead-lettered)
    last_work_at: float | None = None  # time.time() when the last batch was settled
    subscribed: bool = False  # a consume-ok is in force on the events queue
    in_hand: int = 0  # messages delivered and not yet settled
    oldest_held_ms: int | None = None  # x-received-at-ms of the oldest message in hand


@dataclasses.dataclass(frozen=True)
class _Tuning:
    prefetch: int
    batch_size: int
    batch_window_s: float
    retry_delays: Sequence[int]
    drain_s: float
    check_every_s: float


class _Lost(Exception):
    """A session whose broker side is gone, its messages in hand dropped.

    The message says how it went.
    """


async def consume(
    settings: config.Settings,
    *,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
    prefetch: int = 1024,
    batch_size: int = 256,
    batch_window_s: float = 0.02,
    retry_delays: Sequence[int] = amqp.RETRY_DELAYS_S,
    drain_s: float = 5.0,
    check_every_s: float = CHECK_EVERY_S,
) -> None:
    """Consume events until ``stop`` is set, then drain what was delivered and leave.

    On ``stop`` it cancels the subscription and processes the messages already delivered (for at
    most ``drain_s`` seconds); only those still unprocessed then are handed back to the queue,
    which counts toward its delivery limit.

    ``retry_delays`` (seconds, each one of the declared delay queues) is the wait before each
    retry of a message failing transiently; after the last one it is dead-lettered. Tests shorten
    it. ``progress`` is kept up to date for a heartbeat.

    Raises BrokerUnavailable or DatabaseUnavailable when the first connection fails (a start that
    cannot succeed), and OutageTooLong when either stays unavailable past ``RELAY_OUTAGE_LIMIT``
    (exit 1, for its supervisor to restart it); what it held goes back to the queue.
    """
    tuning = _Tuning(prefetch, batch_size, batch_window_s, retry_delays, drain_s, check_every_s)
    async with (
        db.pool_for(settings, min_size=1, max_size=3) as pool,
        qonto.http_clients(settings) as http,
    ):
        consumer = _Consumer(
            settings,
            pool,
            http,
            stop=stop or asyncio.Event(),
            progress=progress if progress is not None else Progress(),
            tuning=tuning,
        )
        await consumer.run()


class _Consumer:
    """Supervisor running one session after another, until stopped or an outage outlasts its limit.

    A session connects, declares the topology, sets the prefetch, subscribes, then runs batches.
    It ends when RabbitMQ goes away (its connection or a channel closes, or the broker cancels the
    subscription: queue deleted, leader moved) or when the check of the events queue
    (:meth:`_Session._watch`) goes unanswered or finds the subscription gone. The messages in hand
    are then dropped (a dead channel cannot acknowledge them; RabbitMQ delivers them again and the
    events table makes them no-ops) and a new session starts after a capped, jittered backoff.

    aio-pika's robust connection is not used: it restores a channel's consumers only for the
    queues it declared on that channel, so the consumer of a queue got with ``get_queue`` was
    never restored after a reconnection, leaving the process alive and idle.
    """

    def __init__(
        self,
        settings: config.Settings,
        pool: asyncpg.Pool,
        http: qonto.HttpClients,
        *,
        stop: asyncio.Event,
        progress: Progress,
        tuning: _Tuning,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.http = http
        self.stop = stop
        self.progress = progress
        self.tuning = tuning
        self.broker = outage.Outage("consume", "RabbitMQ", settings.outage_limit_s)
        self.database = outage.Outage("consume", "PostgreSQL", settings.outage_limit_s)
        self.processed = 0

    async def run(self) -> None:
        backoff = retry.Backoff(retry.OUTAGE)
        sessions = 0
        returned = 0
        while not self.stop.is_set():
            session = _Session(self)
            try:
                try:
                    await session.open()
                    sessions += 1
                    self.broker.recovered()
                    backoff.reset()
                    logger.info(
                        "consume_started" if sessions == 1 else "consume_resubscribed",
                        queue=self.settings.events_queue,
                    )
                    await session.run()
                finally:
                    returned = await session.close()
            except (errors.BrokerUnavailable, _Lost) as exc:
                if sessions == 0:
                    raise  # the start failed: exit 1, as any start that cannot succeed
                self.broker.failed(str(exc))  # OutageTooLong past the limit
                pause = min(backoff.next(), max(self.broker.remaining_s(), 0.05))
                logger.warning(
                    "consume_connection_lost",
                    reason=str(exc),
                    dropped=returned,  # delivered again by RabbitMQ, deduped by the events table
                    retry_in_s=round(pause, 2),
                )
                returned = 0
                await _wait((self.stop,), pause)
        logger.info("consume_stopped", processed=self.processed, returned=returned)


class _Session:
    """One connection to RabbitMQ with its channel, subscription, publisher and messages in hand."""

    def __init__(self, consumer: _Consumer) -> None:
        self._c = consumer
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None
        self._worker: buffer.Buffer | None = None
        self._inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        self._held: dict[int | None, int | None] = {}  # delivery tag -> x-received-at-ms
        self._delivered = 0
        self._lost = asyncio.Event()
        self._reason = ""
        self._fatal: errors.OutageTooLong | None = None

    # ------------------------------------------------------------------ open, close

    async def open(self) -> None:
        """Connect, declare, set the prefetch and subscribe (BrokerUnavailable if one fails)."""
        c = self._c
        self._conn = conn = await amqp.connect(c.settings, name="relay-consume")
        conn.close_callbacks.add(self._closed)
        with amqp.translate("consumer channel"):
            channel = await conn.channel()
            channel.close_callbacks.add(self._closed)
            (await channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(self._cancelled)
            await amqp.declare(channel, c.settings)
            await channel.set_qos(prefetch_count=c.tuning.prefetch)
            self._queue = await channel.get_queue(c.settings.events_queue, ensure=False)
        publisher = await amqp.Publisher.open(conn, c.settings)
        publisher.channel.close_callbacks.add(self._closed)
        self._worker = buffer.Buffer(
            c.settings, c.pool, publisher, c.http, retry_delays=c.tuning.retry_delays
        )
        with amqp.translate("consume"):
            self._tag = await self._queue.consume(self._deliver)
        c.progress.subscribed = True

    async def close(self) -> int:
        """Close the connection and return how many unsettled messages RabbitMQ takes back."""
        c = self._c
        c.progress.subscribed = False
        returned = len(self._held)
        self._held.clear()
        self._report(recount=True)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), timeout=CLOSE_TIMEOUT_S)
        return returned

    # ------------------------------------------------------------------ what RabbitMQ tells us

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._reason = reason
            self._lost.set()

    def _closed(self, sender: object, exc: BaseException | None = None) -> None:
        self._lose(f"RabbitMQ closed the {type(sender).__name__.lower()} ({exc!r})")

    def _cancelled(self, frame: pamqp.commands.Basic.Cancel) -> None:
        self._lose("RabbitMQ cancelled the subscription (queue deleted or moved)")

    async def _deliver(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._delivered += 1
        received = _received_at(message)
        self._held[message.delivery_tag] = received
        progress = self._c.progress
        progress.in_hand = len(self._held)
        if received is not None and (
            progress.oldest_held_ms is None or received < progress.oldest_held_ms
        ):
            progress.oldest_held_ms = received
        self._inbox.put_nowait(message)

    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._lost.is_set():
            raise _Lost(self._reason)

    def _report(self, *, recount: bool = False) -> None:
        progress = self._c.progress
        progress.in_hand = len(self._held)
        if recount:
            progress.oldest_held_ms = min(
                (ms for ms in self._held.values() if ms is not None), default=None
            )

    # ------------------------------------------------------------------ batches

    async def run(self) -> None:
        """Apply batches until ``stop``, then stop gracefully.

        Raises _Lost when the session is lost.
        """
        c = self._c
        watch = asyncio.create_task(self._watch(), name="consume-watch")
        watch.add_done_callback(self._watch_ended)
        try:
            while not c.stop.is_set():
                self._check()
                batch = await _gather(
                    self._inbox,
                    (c.stop, self._lost),
                    c.tuning.batch_size,
                    c.tuning.batch_window_s,
                )
                if batch and not await self._apply(batch):
                    return  # stopped while PostgreSQL was away: what is in hand goes back
        finally:
            watch.remove_done_callback(self._watch_ended)
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self._stop_gracefully()

    def _watch_ended(self, watch: asyncio.Task[None]) -> None:
        """Mark the session lost when its check ended by itself, so no session goes on unchecked.

        The check ends by itself when it found the session lost, or when it failed.
        """
        failure = None if watch.cancelled() else watch.exception()
        if failure is not None:
            logger.error("consume_check_failed", error=f"{type(failure).__name__}: {failure}")
        self._lose(f"the subscription check stopped ({failure!r})")

    async def _apply(
        self, batch: list[aio_pika.abc.AbstractIncomingMessage], *, until: float | None = None
    ) -> bool:
        """Apply and settle the batch, holding it while PostgreSQL is unavailable.

        While PostgreSQL is unavailable the batch stays in hand, unacknowledged, and PostgreSQL is
        probed with backoff; the retry queues are left to failures of one message. Returns False
        when the stop's deadline (``until``, or ``drain_s`` after the stop) passed first; raises
        _Lost when RabbitMQ went away meanwhile.
        """
        c = self._c
        assert self._worker is not None
        backoff = retry.Backoff(HOLD_PROBES)
        holding = False
        while True:
            try:
                counts = await self._worker.process(batch)
            except errors.DatabaseUnavailable as exc:
                reason = str(exc)
            except errors.BrokerUnavailable as exc:
                self._lose(str(exc))
                self._check()
                raise
            else:
                c.database.recovered()
                self._settled(batch, counts)
                return True
            if not holding:
                holding = True
                logger.warning("consume_holding_batch", size=len(batch), reason=reason)
            c.database.failed(reason)  # OutageTooLong past the limit
            while True:
                if c.stop.is_set() and until is None:
                    until = time.monotonic() + c.tuning.drain_s
                left = c.database.remaining_s()
                if until is not None:
                    left = min(left, until - time.monotonic())
                    if left <= 0:
                        return False
                await _wait(
                    (self._lost,) if c.stop.is_set() else (c.stop, self._lost),
                    min(backoff.next(), max(left, 0.05)),
                )
                self._check()  # RabbitMQ went away meanwhile: the batch is dropped
                try:
                    await _ping(c.pool)
                    break
                except errors.DatabaseUnavailable as exc:
                    c.database.failed(str(exc))

    def _settled(
        self, batch: list[aio_pika.abc.AbstractIncomingMessage], counts: dict[str, int]
    ) -> None:
        c = self._c
        for message in batch:
            self._held.pop(message.delivery_tag, None)
        done = sum(counts.values())
        c.processed += done
        c.progress.events += done
        c.progress.last_work_at = time.time()
        self._report(recount=True)

    # ------------------------------------------------------------------ checks

    async def _watch(self) -> None:
        """Check every ``check_every_s`` that the subscription is there and PostgreSQL answers.

        The events queue is checked with a passive declare. The session is lost when the check
        goes unanswered (a network pause), when no consumer is on the queue, or when messages were
        ready at two checks in a row while this consumer had room and nothing was delivered to it.
        """
        c = self._c
        every = c.tuning.check_every_s
        was_ready, seen, had_room = 0, self._delivered, True
        while True:
            await asyncio.sleep(every)
            assert self._conn is not None
            try:
                ready, consumers = await asyncio.wait_for(
                    amqp.queue_state(self._conn, c.settings.events_queue),
                    timeout=CHECK_TIMEOUT_S,
                )
            except (errors.BrokerUnavailable, TimeoutError) as exc:
                self._lose(f"the events queue could not be checked ({exc or 'no answer'})")
                return
            room = len(self._held) < c.tuning.prefetch
            lost = None
            if consumers == 0:
                lost = "RabbitMQ lists no consumer on the events queue"
            elif ready and was_ready and room and had_room and self._delivered == seen:
                lost = f"{ready} messages ready and none delivered to this consumer for {every:g} s"
            if lost is not None:
                logger.warning("consume_subscription_lost", reason=lost)
                self._lose(lost)
                return
            was_ready, seen, had_room = ready, self._delivered, room
            try:
                await _ping(c.pool)
            except errors.DatabaseUnavailable as exc:
                try:
                    c.database.failed(str(exc))
                except errors.OutageTooLong as fatal:
                    self._fatal = fatal
                    self._lost.set()
                    return
            else:
                c.database.recovered()

    # ------------------------------------------------------------------ graceful stop

    async def _stop_gracefully(self) -> None:
        """Let the deliveries in flight arrive, unsubscribe, then process what was delivered.

        Processing lasts at most ``drain_s``.

        They are processed instead of handed back because RabbitMQ counts every hand-back toward
        the events queue's delivery limit, and ten restarts during a backlog would dead-letter good
        events.
        """
        c = self._c
        await _until_window_full(self._inbox, c.tuning.prefetch)
        assert self._queue is not None
        assert self._tag is not None
        if not await _unsubscribe(self._queue, self._tag):
            return
        c.progress.subscribed = False
        deadline = time.monotonic() + c.tuning.drain_s
        while time.monotonic() < deadline:
            batch = await _gather(
                self._inbox, (), c.tuning.batch_size, c.tuning.batch_window_s, idle_s=0.1
            )
            if not batch:
                break
            try:
                if not await self._apply(batch, until=deadline):
                    break
            except (_Lost, errors.BrokerUnavailable) as exc:  # the batch went back to the queue
                logger.warning("consume_drain_interrupted", reason=str(exc))
                break


def _received_at(message: aio_pika.abc.AbstractIncomingMessage) -> int | None:
    value = (message.headers or {}).get(amqp.HEADER_RECEIVED_AT)
    return value if isinstance(value, int) else None


async def _ping(pool: asyncpg.Pool) -> None:
    """Raise DatabaseUnavailable unless PostgreSQL answers within a few seconds."""
    try:
        await asyncio.wait_for(db.ping(pool), timeout=CHECK_TIMEOUT_S)
    except TimeoutError as exc:
        raise errors.DatabaseUnavailable("ping: PostgreSQL did not answer") from exc


async def _wait(events: Sequence[asyncio.Event], timeout: float) -> None:  # noqa: ASYNC109
    """Wait until one of ``events`` is set, or ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        if waiters:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(timeout)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _until_window_full(
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    prefetch: int,
    *,
    quiet_s: float = 0.1,
    within_s: float = 2.0,
) -> None:
    """Wait until no delivery is on its way.

    That is when the inbox holds ``prefetch`` messages (everything unacknowledged, so RabbitMQ
    sends nothing more) or none arrived for ``quiet_s``. As seen on RabbitMQ 3.10, a quorum queue
    consumer cancelled while deliveries are in flight gets them returned to the queue by the
    broker, each counted as a delivery (classic queues deliver them before the cancel-ok).
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
    """Cancel the subscription, after whose cancel-ok RabbitMQ delivers nothing more."""
    try:
        with amqp.translate("cancel consumer"):
            await asyncio.wait_for(queue.cancel(tag), timeout=5)
    except errors.BrokerUnavailable as exc:
        logger.warning("consume_cancel_failed", reason=str(exc))
        return False
    return True


async def _gather(
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    wake: Sequence[asyncio.Event],
    size: int,
    window: float,
    *,
    idle_s: float = 1.0,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Gather messages from the inbox, up to ``size`` events (a batch message counts each).

    It waits ``idle_s`` for the first (or until one of ``wake`` is set), then at most ``window``
    seconds for more.
    """
    getting = asyncio.ensure_future(inbox.get())
    waiting: set[asyncio.Future[Any]] = {getting}
    woken = [asyncio.ensure_future(event.wait()) for event in wake]
    waiting.update(woken)
    try:
        await asyncio.wait(waiting, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in woken:
            waiter.cancel()
    if not getting.done():
        getting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getting
        return []
    batch = [getting.result()]
    events = amqp.events_in(batch[0].headers)
    deadline = time.monotonic() + window
    while events < size:
        try:
            batch.append(inbox.get_nowait())
        except asyncio.QueueEmpty:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(inbox.get(), timeout=remaining))
            except TimeoutError:
                break
        events += amqp.events_in(batch[-1].headers)
    return batch
