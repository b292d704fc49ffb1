"""The ``oauth_states`` table, the ``state`` of each Qonto consent started, by its SHA-256."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Used:
    """A state just used, and whether it had been used before."""

    invitation_id: uuid.UUID
    session_hash: bytes
    expires_at: dt.datetime
    used_before: dt.datetime | None


async def insert(
    conn: db.Executor,
    state_hash: bytes,
    invitation_id: uuid.UUID,
    session_hash: bytes,
    expires_at: dt.datetime,
) -> None:
    """Store a consent's state."""
    with db.translate("start consent"):
        await conn.execute(
            queries.get("insert_oauth_state"), state_hash, invitation_id, session_hash, expires_at
        )


async def use(conn: db.Executor, state_hash: bytes) -> Used | None:
    """Mark a state used, or return None when there is no such state."""
    with db.translate("use consent state"):
        record = await conn.fetchrow(queries.get("use_oauth_state"), state_hash)
    if record is None:
        return None
    return Used(
        record["invitation_id"],
        bytes(record["session_hash"]),
        record["expires_at"],
        record["used_before"],
    )


async def delete_old(conn: db.Executor) -> None:
    """Delete the states expired for a day."""
    with db.translate("start consent"):
        await conn.execute(queries.get("delete_old_oauth_states"))
