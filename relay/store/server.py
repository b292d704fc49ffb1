"""What the PostgreSQL server holds beyond the tables (its clock, advisory locks, migrations)."""

from __future__ import annotations

import datetime as dt

from relay.store import db, queries


async def now(conn: db.Executor) -> dt.datetime:
    """Read the database's clock."""
    with db.translate("database time"):
        value: dt.datetime = await conn.fetchval(queries.get("database_now"))
    return value


async def try_worker_lock(conn: db.Conn, space: int, worker: int) -> bool:
    """Take a flush worker's session lock if free (free means its worker is gone)."""
    with db.translate("worker lock"):
        return bool(await conn.fetchval(queries.get("try_worker_lock"), space, worker))


async def worker_lock_held(conn: db.Conn, space: int, worker: int, *, timeout: float) -> bool:  # noqa: ASYNC109 - asyncpg's own statement timeout
    """Whether this session still holds the worker's lock."""
    with db.translate("worker lease"):
        return bool(
            await conn.fetchval(queries.get("worker_lock_held"), space, worker, timeout=timeout)
        )


async def worker_unlock(conn: db.Conn, space: int, worker: int) -> None:
    """Release a flush worker's session lock."""
    with db.translate("worker unlock"):
        await conn.execute(queries.get("worker_unlock"), space, worker)


async def try_scheduler_lock(conn: db.Conn, space: int, key: int) -> bool:
    """Take the scheduler's session lock if no other scheduler holds it."""
    with db.translate("scheduler lock"):
        return bool(await conn.fetchval(queries.get("try_scheduler_lock"), space, key))


async def scheduler_unlock(conn: db.Conn, space: int, key: int) -> None:
    """Release the scheduler's session lock."""
    with db.translate("unlock"):
        await conn.execute(queries.get("scheduler_unlock"), space, key)


async def applied_migrations(conn: db.Executor) -> set[str]:
    """Read the schema versions applied."""
    with db.translate("schema check"):
        records = await conn.fetch(queries.get("applied_migrations"))
    return {r["version"] for r in records}
