"""The ``connections`` table, each a Qonto organization linked to a Loop dossier, and its state."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Collection
from typing import Any

from relay import errors, models
from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class NewConnection:
    id: uuid.UUID
    client_name: str
    qonto_organization_id: str
    qonto_auth_kind: str
    qonto_credentials: bytes  # sealed
    cegid_credentials: bytes  # sealed
    cegid_key_fingerprint: str
    cegid_dossier: str
    cegid_domain: str
    scan_since: dt.datetime
    dossier_checked_at: dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class FolderFacts:
    """When the connection was (re)connected, and Loop's first deposit since then."""

    connected_at: dt.datetime
    first_deposit_at: dt.datetime | None


def _refusers(refused_by: Collection[models.Refuser]) -> list[str]:
    return sorted(str(r) for r in set(refused_by))


def _connection(record: Any) -> models.Connection | None:
    return None if record is None else models.Connection.from_record(record)


async def insert(conn: db.Executor, new: NewConnection) -> models.Connection:
    """Store a new connection."""
    with db.translate("add connection"):
        record = await conn.fetchrow(
            queries.get("insert_connection"),
            new.id,
            new.client_name,
            new.qonto_organization_id,
            new.qonto_auth_kind,
            new.qonto_credentials,
            new.cegid_credentials,
            new.cegid_key_fingerprint,
            new.cegid_dossier,
            new.cegid_domain,
            new.scan_since,
            new.dossier_checked_at,
        )
    if record is None:
        raise errors.DatabaseUnavailable("the new connection was not stored")
    return models.Connection.from_record(record)


async def list_all(conn: db.Executor) -> list[models.Connection]:
    """List every connection, oldest first."""
    with db.translate("list connections"):
        records = await conn.fetch(queries.get("list_connections"))
    return [models.Connection.from_record(r) for r in records]


async def get(conn: db.Executor, connection_id: uuid.UUID) -> models.Connection | None:
    """Read one connection (None when there is no such id)."""
    with db.translate("get connection"):
        return _connection(await conn.fetchrow(queries.get("get_connection"), connection_id))


async def sealed_credentials(
    conn: db.Executor, connection_id: uuid.UUID
) -> models.SealedCredentials | None:
    """Read one connection's sealed credentials (None when there is no such id)."""
    with db.translate("load credentials"):
        record = await conn.fetchrow(queries.get("get_sealed_credentials"), connection_id)
    if record is None:
        return None
    return models.SealedCredentials(
        connection_id=record["connection_id"],
        qonto_auth_kind=record["qonto_auth_kind"],
        qonto_credentials=bytes(record["qonto_credentials"]),
        cegid_credentials=bytes(record["cegid_credentials"]),
    )


async def set_qonto_credentials(conn: db.Executor, connection_id: uuid.UUID, sealed: bytes) -> None:
    """Store rotated Qonto credentials (sealed)."""
    with db.translate("store credentials"):
        await conn.execute(queries.get("update_qonto_credentials"), connection_id, sealed)


async def set_state(
    conn: db.Executor, connection_id: uuid.UUID, state: str, reason: str | None
) -> models.Connection | None:
    """Set a connection's state, whatever it was (an operator's decision)."""
    with db.translate("set connection state"):
        record = await conn.fetchrow(
            queries.get("set_connection_state"), connection_id, state, reason
        )
    return _connection(record)


async def flag(
    conn: db.Executor,
    connection_id: uuid.UUID,
    state: str,
    reason: str | None,
    refused_by: Collection[models.Refuser],
) -> models.Connection | None:
    """Set an active or flagged connection's state and who refused it.

    Returns the connection, or None when it is disconnected or revoked.
    """
    with db.translate("flag connection"):
        return _connection(
            await conn.fetchrow(
                queries.get("flag_connection"), connection_id, state, reason, _refusers(refused_by)
            )
        )


async def clear_cegid_flag(conn: db.Executor, connection_id: uuid.UUID) -> models.Connection | None:
    """Clear the flag a refusal by Cegid alone raised, no other one."""
    with db.translate("clear flag"):
        return _connection(await conn.fetchrow(queries.get("clear_cegid_flag"), connection_id))


async def set_dossier_checked(conn: db.Executor, connection_id: uuid.UUID) -> None:
    """Record that Loop answered a read of the connection's dossier now."""
    with db.translate("dossier checked"):
        await conn.execute(queries.get("set_dossier_checked"), connection_id)


async def states(conn: db.Executor, connection_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Read the state of each connection given that exists."""
    with db.translate("connection states"):
        records = await conn.fetch(queries.get("connection_states"), connection_ids)
    return {r["id"]: r["state"] for r in records}


async def revoke(conn: db.Executor, connection_id: uuid.UUID, reason: str) -> None:
    """Mark a connection revoked (Qonto says its consent was withdrawn)."""
    with db.translate("revoke connection"):
        await conn.execute(queries.get("revoke_connection"), connection_id, reason)


async def advance_watermark(
    conn: db.Executor, connection_id: uuid.UUID, source: str, scanned_to: dt.datetime
) -> None:
    """Move a source's scan watermark forward (never back)."""
    with db.translate("advance watermark"):
        await conn.execute(queries.get("advance_scan_watermark"), connection_id, source, scanned_to)


async def set_first_upload(conn: db.Executor, connection_id: uuid.UUID) -> None:
    """Record the connection's first deposit in Loop, once."""
    with db.translate("first upload"):
        await conn.execute(queries.get("set_first_upload"), connection_id)


async def reconnect(
    conn: db.Executor,
    connection_id: uuid.UUID,
    state: str,
    reason: str | None,
    refused_by: Collection[models.Refuser],
) -> models.Connection | None:
    """Set the state a reconnection's check found and restart its clock (None when revoked)."""
    with db.translate("reconnect connection"):
        return _connection(
            await conn.fetchrow(
                queries.get("reconnect_connection"),
                connection_id,
                state,
                reason,
                _refusers(refused_by),
            )
        )


async def folder_facts(conn: db.Executor, connection_id: uuid.UUID) -> FolderFacts | None:
    """Read when the connection was (re)connected and its first deposit since."""
    with db.translate("folder facts"):
        record = await conn.fetchrow(queries.get("folder_facts"), connection_id)
    return (
        None if record is None else FolderFacts(record["connected_at"], record["first_deposit_at"])
    )


async def sealed_batch(
    conn: db.Executor, after: uuid.UUID, limit: int
) -> list[models.SealedValues]:
    """Lock the next connections after ``after`` and read their sealed credentials."""
    with db.translate("rotate connections"):
        records = await conn.fetch(queries.get("rotation_connections"), after, limit)
    return [models.SealedValues.from_record(r) for r in records]


async def reseal(
    conn: db.Executor, connection_id: uuid.UUID, qonto: bytes | None, cegid: bytes | None
) -> None:
    """Store a connection's re-sealed credentials."""
    with db.translate("rotate connections"):
        await conn.execute(queries.get("rotation_update_connection"), connection_id, qonto, cegid)
