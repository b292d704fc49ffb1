"""Rate limits in fixed windows per key, kept in PostgreSQL for every ``relay serve`` worker.

Used to limit guesses of setup links per client address; the console's sign-in can use the same.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Final

import asyncpg

from relay import store
from relay.store import db


@dataclasses.dataclass(frozen=True, slots=True)
class Limit:
    """At most ``hits`` counted events per ``window`` for one key."""

    name: str
    hits: int
    window: dt.timedelta

    def bucket(self, key: str) -> str:
        return f"{self.name}:{key}"[:200]

    def window_start(self, now: dt.datetime) -> dt.datetime:
        seconds = int(self.window.total_seconds())
        stamp = int(now.timestamp())
        return dt.datetime.fromtimestamp(stamp - stamp % seconds, dt.UTC)


# Wrong, used or expired setup links opened from one address: 20 per 10 minutes.
SETUP_GUESSES: Final = Limit("setup-guess", 20, dt.timedelta(minutes=10))


async def blocked(
    pool: asyncpg.Pool, limit: Limit, key: str, *, now: dt.datetime | None = None
) -> float | None:
    """Return the seconds to wait when ``key`` used up its window, else None."""
    moment = now or dt.datetime.now(dt.UTC)
    start = limit.window_start(moment)
    if await store.rate_limits.hits(pool, limit.bucket(key), start) < limit.hits:
        return None
    return max(1.0, (start + limit.window - moment).total_seconds())


async def hit(pool: asyncpg.Pool, limit: Limit, key: str, *, now: dt.datetime | None = None) -> int:
    """Count one event for ``key`` and return its count in the current window."""
    moment = now or dt.datetime.now(dt.UTC)
    start = limit.window_start(moment)
    async with db.transaction(pool, "count rate limit") as conn:
        hits = await store.rate_limits.hit(conn, limit.bucket(key), start)
        await store.rate_limits.delete_old(conn, start - dt.timedelta(days=1))
    return hits
