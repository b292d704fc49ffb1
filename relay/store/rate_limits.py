"""The ``web_rate_limits`` table, hits per bucket and window (guesses at setup links)."""

from __future__ import annotations

import datetime as dt

from relay.store import db, queries


async def hit(conn: db.Executor, bucket: str, window_start: dt.datetime) -> int:
    """Count one hit and return the window's count."""
    with db.translate("count rate limit"):
        return int(await conn.fetchval(queries.get("hit_rate_limit"), bucket, window_start))


async def hits(conn: db.Executor, bucket: str, window_start: dt.datetime) -> int:
    """Read the window's count."""
    with db.translate("read rate limit"):
        return int(await conn.fetchval(queries.get("rate_limit_hits"), bucket, window_start))


async def delete_old(conn: db.Executor, before: dt.datetime) -> None:
    """Delete the windows that started before ``before``."""
    with db.translate("count rate limit"):
        await conn.execute(queries.get("delete_old_rate_limits"), before)
