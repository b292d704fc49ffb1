"""`relay scheduler`: the scan and the flush once a day at ``RELAY_FLUSH_AT`` UTC, whatever the replicas.

A day is claimed in PostgreSQL: under a session advisory lock, the run row ``(scheduled, day)`` is
inserted once (its unique key refuses a second). Two schedulers started together produce one run; a
day missed because every replica was down runs as soon as one starts (the latest slot without a
finished run is due); a run whose scheduler died (row unfinished, lock free) is run again, which is
safe because documents are claimed one by one. Only the latest slot is caught up: one flush sends
everything pending, whatever day it arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import asyncpg

from consumers import flusher
from relay import config, db, errors, log, queries, report

logger = log.get(__name__)

LOCK: Final = (0x52454C59 + 1, 1)  # advisory lock of the scheduler (namespace, key)
POLL_S: Final = 60.0


class Flush(Protocol):
    def __call__(
        self, settings: config.Settings, pool: asyncpg.Pool, *, run_kind: str, run_id: int | None
    ) -> Awaitable[report.RunReport]: ...


def latest_slot(now: dt.datetime, flush_at: dt.time) -> dt.datetime:
    """The most recent scheduled moment at or before ``now``."""
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
    """Run the latest slot's scan + flush if no one has; True when this call ran it."""
    day = latest_slot(now, settings.flush_at).date()
    with db.translate("scheduler"):
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *LOCK):
                return False  # another scheduler is running a day right now
            try:
                run_id = await conn.fetchval(queries.get("claim_scheduled_run"), day)
                if run_id is None:
                    existing = await conn.fetchrow(queries.get("get_scheduled_run"), day)
                    if existing is None or existing["finished_at"] is not None:
                        return False
                    run_id = existing["id"]
                    logger.warning("scheduled_run_resumed", day=day.isoformat(), run=run_id)
                logger.info("scheduled_run_started", day=day.isoformat(), run=run_id)
                result = await flush(settings, pool, run_kind="scheduled", run_id=run_id)
                await conn.execute(queries.get("finish_run"), run_id, result.to_json())
                logger.info(
                    "scheduled_run_finished", day=day.isoformat(), run=run_id, **result.totals()
                )
                return True
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", *LOCK)


async def run_forever(
    settings: config.Settings,
    pool: asyncpg.Pool,
    *,
    stop: asyncio.Event | None = None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    flush: Flush = flusher.flush,
) -> None:
    """Check every minute (and at each slot) whether a day is due; stop when ``stop`` is set."""
    stop = stop or asyncio.Event()
    logger.info("scheduler_started", flush_at=settings.flush_at.isoformat(timespec="minutes"))
    while not stop.is_set():
        try:
            await run_due(settings, pool, now(), flush=flush)
        except errors.Retryable as exc:
            logger.warning("scheduler_unavailable", reason=str(exc))
        wait = min(POLL_S, max(0.0, (next_slot(now(), settings.flush_at) - now()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait or 0.01)
    logger.info("scheduler_stopped")
