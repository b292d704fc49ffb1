"""The ``web_sessions`` table, the setup pages' browser sessions by their id's SHA-256."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    data: dict[str, Any]
    created_at: dt.datetime
    expires_at: dt.datetime


async def insert(
    conn: db.Executor, id_hash: bytes, data: dict[str, Any], expires_at: dt.datetime
) -> None:
    """Store a new session."""
    with db.translate("start session"):
        await conn.execute(queries.get("insert_web_session"), id_hash, data, expires_at)


async def touch(
    conn: db.Executor, id_hash: bytes, expires_at: dt.datetime, created_after: dt.datetime
) -> Stored | None:
    """Read a live session and push its expiry back (None when it is gone or too old)."""
    with db.translate("read session"):
        record = await conn.fetchrow(
            queries.get("get_web_session"), id_hash, expires_at, created_after
        )
    if record is None:
        return None
    data = record["data"] if isinstance(record["data"], dict) else {}
    return Stored(dict(data), record["created_at"], record["expires_at"])


async def set_data(conn: db.Executor, id_hash: bytes, data: dict[str, Any]) -> None:
    """Store a session's data."""
    with db.translate("save session"):
        await conn.execute(queries.get("set_web_session_data"), id_hash, data)


async def delete(conn: db.Executor, id_hash: bytes) -> None:
    """End a session."""
    with db.translate("end session"):
        await conn.execute(queries.get("delete_web_session"), id_hash)


async def delete_expired(conn: db.Executor) -> None:
    """Delete the expired sessions."""
    with db.translate("start session"):
        await conn.execute(queries.get("delete_expired_web_sessions"))
