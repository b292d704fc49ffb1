"""The ``relay scheduler`` worker, running the scan and flush daily at ``RELAY_FLUSH_AT`` UTC.

One run per day whatever the replicas (:func:`run_due`), and the flushes asked for over HTTP
(:func:`run_requested`) under the same lock; every six hours it also checks each connection's
dossier access (:func:`check_dossiers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import asyncpg
import httpx

from consumers import flusher, upload
from relay import config, crypto, errors, log, models, outage, retry, store
from relay.domain import connections, credentials, heartbeat, report
from relay.store import db
from relay.upstreams import cegid

logger = log.get(__name__)

LOCK: Final = (0x52454C59 + 1, 1)  # advisory lock of the scheduler (namespace, key)
POLL_S: Final = 60.0
PING_EVERY_S: Final = 1.0  # between polls, how often PostgreSQL is asked for flush requests
PING_TIMEOUT_S: Final = 5.0
DOSSIER_CHECK_EVERY: Final = dt.timedelta(hours=6)
CEGID_REASON: Final = upload.CEGID_REASON  # how the reason shown for a Cegid refusal begins

Clock = Callable[[], dt.datetime]
Wait = Callable[[float], Awaitable[None]]


class Flush(Protocol):
    def __call__(
        self, settings: config.Settings, pool: asyncpg.Pool, *, run_kind: str, run_id: int | None
    ) -> Awaitable[report.RunReport]: ...


class RequestedFlush(Protocol):
    def __call__(
        self,
        settings: config.Settings,
        pool: asyncpg.Pool,
        *,
        connection_id: uuid.UUID | None,
        since: dt.datetime | None,
        run_kind: str,
        run_id: int | None,
    ) -> Awaitable[report.RunReport]: ...


# What makes a requested run fail for good (said on the request) rather than wait for the next poll.
REQUEST_REFUSED: Final = (
    errors.Refused,
    errors.NotFound,
    errors.Permanent,
    errors.ConfigurationError,
)


def latest_slot(now: dt.datetime, flush_at: dt.time) -> dt.datetime:
    """Return the most recent scheduled moment at or before ``now``."""
    today = dt.datetime.combine(now.date(), flush_at, tzinfo=dt.UTC)
    return today if today <= now else today - dt.timedelta(days=1)


def next_slot(now: dt.datetime, flush_at: dt.time) -> dt.datetime:
    return latest_slot(now, flush_at) + dt.timedelta(days=1)


async def run_due(
    settings: config.Settings,
    pool: asyncpg.Pool,
    now: dt.datetime,
    *,
    flush: Flush = flusher.flush,
) -> bool:
    """Run the latest slot's scan and flush if no one has (True when this call ran it).

    A day is claimed in PostgreSQL: under a session advisory lock, the run row ``(scheduled,
    day)`` is inserted once (its unique key refuses a second). Two schedulers started together
    produce one run; a day missed because every replica was down runs as soon as one starts (the
    latest slot without a finished run is due); a run whose scheduler died (row unfinished, lock
    free) is run again, which is safe because documents are claimed one by one. Only the latest
    slot is caught up: one flush sends everything pending, whatever day it arrived.
    """
    day = latest_slot(now, settings.flush_at).date()
    async with db.connection(pool, "scheduler") as conn:
        if not await store.server.try_scheduler_lock(conn, *LOCK):
            return False  # another scheduler is running a day right now
        try:
            run_id = await store.runs.claim_scheduled(conn, day)
            if run_id is None:
                existing = await store.runs.get_scheduled(conn, day)
                if existing is None or existing.finished_at is not None:
                    return False
                run_id = existing.id
                logger.warning("scheduled_run_resumed", day=day.isoformat(), run=run_id)
            logger.info("scheduled_run_started", day=day.isoformat(), run=run_id)
            started = time.monotonic()
            result = await flush(settings, pool, run_kind="scheduled", run_id=run_id)
            # the flush finished the run row already, riding out any outage; this lock's
            # connection may have gone with one (its lock with it), so a failure here is moot
            with contextlib.suppress(errors.DatabaseUnavailable):
                await store.runs.finish(pool, run_id, result.to_json())
            logger.info(
                "scheduled_run_finished",
                day=day.isoformat(),
                run=run_id,
                duration_ms=round((time.monotonic() - started) * 1000),
                **result.totals(),
            )
            return True
        finally:
            # a connection gone with an outage released its lock with it
            with contextlib.suppress(errors.DatabaseUnavailable):
                await store.server.scheduler_unlock(conn, *LOCK)


async def run_requested(
    settings: config.Settings, pool: asyncpg.Pool, *, flush: RequestedFlush = flusher.flush
) -> bool:
    """Run the oldest flush asked for under the scheduler's lock (True when this call ran one).

    A request that cannot run (its connection gone, disconnected or revoked, an upstream down) is
    failed with the reason; PostgreSQL lost leaves it open, to be run again once PostgreSQL answers.
    """
    async with db.connection(pool, "scheduler") as conn:
        if not await store.server.try_scheduler_lock(conn, *LOCK):
            return False  # a run is going on: the request waits for it to end
        try:
            request = await store.flush_requests.next_open(conn)
            if request is None:
                return False
            run_id = await store.runs.insert_manual(conn)
            await _close_dead_run(conn, request, run_id)
            served = await store.flush_requests.start(conn, request.id, run_id)
            logger.info("requested_run_started", run=run_id, requests=served)
            await _run_request(settings, pool, request, run_id, flush)
            return True
        finally:
            with contextlib.suppress(errors.DatabaseUnavailable):
                await store.server.scheduler_unlock(conn, *LOCK)


async def _close_dead_run(
    conn: db.Conn, request: store.flush_requests.FlushRequest, run_id: int
) -> None:
    """Finish the run of a request whose scheduler died during it (we hold the lock it held)."""
    if request.run_id is None:
        return
    dead = await store.runs.get(conn, request.run_id)
    if dead is not None and dead.finished_at is None:
        reason = f"the scheduler running it stopped before the end; run again as run {run_id}"
        logger.warning("requested_run_abandoned", run=dead.id, rerun=run_id)
        await store.runs.finish(conn, dead.id, {"kind": "manual", "error": reason})


async def _run_request(
    settings: config.Settings,
    pool: asyncpg.Pool,
    request: store.flush_requests.FlushRequest,
    run_id: int,
    flush: RequestedFlush,
) -> None:
    """Run the requested flush as run ``run_id``, then finish or fail the requests it serves."""
    try:
        result = await flush(
            settings,
            pool,
            connection_id=request.connection_id,
            since=request.since,
            run_kind="manual",
            run_id=run_id,
        )
    except errors.DatabaseUnavailable:
        raise  # nothing can be recorded: the request stays open and is run once PostgreSQL answers
    except REQUEST_REFUSED as exc:
        logger.warning("requested_run_refused", run=run_id, reason=str(exc))
        await store.runs.finish(pool, run_id, {"kind": "manual", "error": str(exc)})
        await store.flush_requests.finish(pool, run_id, error=str(exc))
        return
    except errors.RelayError as exc:
        # An upstream down for the whole run: failed with the reason (asking again is one click),
        # rather than left open and run again at every poll, each time with one more run row.
        reason = f"{exc} (nothing more was sent: ask again once it answers)"
        logger.warning("requested_run_failed", run=run_id, reason=reason)
        await store.runs.finish(pool, run_id, {"kind": "manual", "error": reason})
        await store.flush_requests.finish(pool, run_id, error=reason)
        return
    await store.flush_requests.finish(pool, run_id, error=None)
    logger.info("requested_run_finished", run=run_id, **result.totals())


def seconds_until_next_check(now: dt.datetime, flush_at: dt.time) -> float:
    """Return the wait until the next slot, at most POLL_S (so a crashed run is seen soon)."""
    return max(0.0, min(POLL_S, (next_slot(now, flush_at) - now).total_seconds()))


async def check_dossiers(
    settings: config.Settings,
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    *,
    now: dt.datetime | None = None,
    every: dt.timedelta = DOSSIER_CHECK_EVERY,
) -> dict[str, int]:
    """Check the dossier access of every active connection not checked within ``every``.

    The scheduler runs it every six hours, so that a dossier unlinked from its key is flagged
    (``needs_attention``) before the nightly flush.
    Refused: the connection needs attention (its documents wait). Passed: ``dossier_checked_at`` is
    set, and a flag this check had raised is cleared. Cegid unavailable: tried again next time.
    """
    moment = now or dt.datetime.now(dt.UTC)
    box = crypto.Box(settings.secret_key.reveal())
    client = cegid.CegidClient(settings, http)
    counts = {"checked": 0, "refused": 0, "unavailable": 0}
    for connection in await connections.list_all(pool):
        if connection.state not in (
            models.ConnectionState.ACTIVE,
            models.ConnectionState.NEEDS_ATTENTION,
        ):
            continue
        if connection.dossier_checked_at is not None and (
            moment - connection.dossier_checked_at < every
        ):
            continue
        _, cegid_creds = await credentials.load(pool, box, connection.id)
        try:
            await client.check_dossier(cegid_creds, connection.cegid_dossier)
        except errors.CegidAccessRefused as exc:
            counts["refused"] += 1
            await connections.flag(
                pool,
                connection.id,
                models.ConnectionState.NEEDS_ATTENTION,
                CEGID_REASON + str(exc),
                (models.Refuser.CEGID,),
            )
            logger.warning("dossier_check_refused", connection=str(connection.id), reason=str(exc))
            continue
        except errors.Retryable as exc:
            counts["unavailable"] += 1
            logger.warning(
                "dossier_check_unavailable", connection=str(connection.id), reason=str(exc)
            )
            continue
        counts["checked"] += 1
        await _dossier_checked(pool, connection)
    logger.info("dossier_check_finished", **counts)
    return counts


async def _dossier_checked(pool: asyncpg.Pool, connection: models.Connection) -> None:
    await store.connections.set_dossier_checked(pool, connection.id)
    if connection.state == models.ConnectionState.NEEDS_ATTENTION:
        await connections.clear_cegid_flag(pool, connection.id)


async def run_forever(
    settings: config.Settings,
    pool: asyncpg.Pool,
    *,
    stop: asyncio.Event | None = None,
    now: Clock = lambda: dt.datetime.now(dt.UTC),
    flush: Flush = flusher.flush,
    wait: Wait | None = None,
    dossier_check_every: dt.timedelta | None = DOSSIER_CHECK_EVERY,
    progress: heartbeat.Work | None = None,
    flush_requested: RequestedFlush = flusher.flush,
) -> None:
    """Check every minute (and at each slot) whether a day is due, until ``stop`` is set.

    PostgreSQL going away is ridden out: between polls the scheduler pings it every
    ``PING_EVERY_S``; a failed ping or poll makes it poll again with a capped, jittered backoff,
    so that the slot runs as soon as PostgreSQL answers.

    ``now`` and ``wait`` (default: wait on ``stop`` with a timeout, pinging PostgreSQL every
    PING_EVERY_S) are injectable for tests; ``dossier_check_every=None`` turns the periodic
    dossier check off; ``progress`` counts the documents each run uploaded (for the heartbeat);
    ``flush_requested`` runs the flushes asked for over HTTP. Raises OutageTooLong when PostgreSQL
    stays unreachable past ``RELAY_OUTAGE_LIMIT`` (exit 1, for its supervisor to restart it).
    """
    stop = stop or asyncio.Event()
    stopping = stop
    database = outage.Outage("scheduler", "PostgreSQL", settings.outage_limit_s)
    backoff = retry.Backoff(retry.OUTAGE)

    def counted(result: report.RunReport) -> report.RunReport:
        if progress is not None:
            progress.add(result.totals()["uploaded"])
        return result

    async def flush_and_count(
        settings: config.Settings, pool: asyncpg.Pool, *, run_kind: str, run_id: int | None
    ) -> report.RunReport:
        return counted(await flush(settings, pool, run_kind=run_kind, run_id=run_id))

    async def requested_and_count(
        settings: config.Settings,
        pool: asyncpg.Pool,
        *,
        connection_id: uuid.UUID | None,
        since: dt.datetime | None,
        run_kind: str,
        run_id: int | None,
    ) -> report.RunReport:
        return counted(
            await flush_requested(
                settings,
                pool,
                connection_id=connection_id,
                since=since,
                run_kind=run_kind,
                run_id=run_id,
            )
        )

    async def wait_or_stop(seconds: float) -> None:
        """Wait for ``stop``, ``seconds``, a flush asked for or PostgreSQL found gone (poll now)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=max(0.01, min(left, PING_EVERY_S)))
            if stopping.is_set() or time.monotonic() >= deadline:
                return
            try:
                if await asyncio.wait_for(
                    store.flush_requests.any_open(pool), timeout=PING_TIMEOUT_S
                ):
                    return
            except (errors.DatabaseUnavailable, TimeoutError):
                return

    pause = wait or wait_or_stop
    last_dossier_check: dt.datetime | None = None
    logger.info("scheduler_started", flush_at=settings.flush_at.isoformat(timespec="minutes"))
    while not stop.is_set():
        try:
            await run_due(settings, pool, now(), flush=flush_and_count)
            await run_requested(settings, pool, flush=requested_and_count)
            database.recovered()
            backoff.reset()
            if dossier_check_every is not None and (
                last_dossier_check is None or now() - last_dossier_check >= dossier_check_every
            ):
                last_dossier_check = now()
                async with cegid.http_client(settings) as http:
                    await check_dossiers(settings, pool, http, now=last_dossier_check)
        except errors.DatabaseUnavailable as exc:
            database.failed(str(exc))  # OutageTooLong past RELAY_OUTAGE_LIMIT: exit 1
            delay = min(backoff.next(), max(database.remaining_s(), 0.05))
            logger.warning("scheduler_unavailable", reason=str(exc), retry_in_s=round(delay, 2))
            if not stop.is_set():
                await pause(delay)
            continue
        except errors.Retryable as exc:
            logger.warning("scheduler_unavailable", reason=str(exc))
        except errors.RelayError as exc:  # the run row stays unfinished: retried at the next poll
            logger.error("scheduled_run_failed", reason=str(exc), error=type(exc).__name__)
        if not stop.is_set():
            await pause(seconds_until_next_check(now(), settings.flush_at))
    logger.info("scheduler_stopped")
