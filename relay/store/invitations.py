"""The ``invitations`` table of setup links (their token's SHA-256) and the setup's progress."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from relay import models
from relay.store import db, queries


def _invitation(record: Any) -> models.Invitation | None:
    return None if record is None else models.Invitation.from_record(record)


async def insert(
    conn: db.Executor,
    invitation_id: uuid.UUID,
    token_hash: bytes,
    client_name: str,
    expires_at: dt.datetime,
) -> None:
    """Store a new invitation."""
    with db.translate("create invitation"):
        await conn.execute(
            queries.get("insert_invitation"), invitation_id, token_hash, client_name, expires_at
        )


async def by_token(conn: db.Executor, token_hash: bytes) -> models.Invitation | None:
    """Read the invitation of a token's hash."""
    with db.translate("find invitation"):
        return _invitation(await conn.fetchrow(queries.get("get_invitation_by_token"), token_hash))


async def get(conn: db.Executor, invitation_id: uuid.UUID) -> models.Invitation | None:
    """Read one invitation."""
    with db.translate("get invitation"):
        return _invitation(await conn.fetchrow(queries.get("get_invitation"), invitation_id))


async def list_all(conn: db.Executor) -> list[models.Invitation]:
    """List every invitation, oldest first."""
    with db.translate("list invitations"):
        records = await conn.fetch(queries.get("list_invitations"))
    return [models.Invitation.from_record(r) for r in records]


async def set_qonto(
    conn: db.Executor,
    invitation_id: uuid.UUID,
    organization_id: str,
    organization_name: str | None,
    role: str,
    plan: str | None,
    sealed_tokens: bytes,
) -> bool:
    """Record an eligible member's consent (False when the invitation is no longer open)."""
    with db.translate("record Qonto consent"):
        record = await conn.fetchrow(
            queries.get("set_invitation_qonto"),
            invitation_id,
            organization_id,
            organization_name,
            role,
            plan,
            sealed_tokens,
        )
    return record is not None


async def set_qonto_tokens(
    conn: db.Executor, invitation_id: uuid.UUID, sealed_tokens: bytes
) -> None:
    """Store the Qonto tokens rotated while the setup used them."""
    with db.translate("store rotated Qonto tokens"):
        await conn.execute(queries.get("set_invitation_qonto_tokens"), invitation_id, sealed_tokens)


async def forget_qonto(conn: db.Executor, invitation_id: uuid.UUID, problem: str) -> None:
    """Drop a consent Qonto refused at Create, the refusal shown on the Qonto step."""
    with db.translate("forget Qonto consent"):
        await conn.execute(queries.get("forget_invitation_qonto"), invitation_id, problem)


async def set_cegid_credentials(conn: db.Executor, invitation_id: uuid.UUID, sealed: bytes) -> None:
    """Store the Loop key and secret typed (sealed)."""
    with db.translate("record Loop key"):
        await conn.execute(queries.get("set_invitation_cegid_credentials"), invitation_id, sealed)


async def set_dossier(
    conn: db.Executor, invitation_id: uuid.UUID, dossier: str, domain: str
) -> None:
    """Store the Loop dossier and domain typed."""
    with db.translate("record Loop dossier"):
        await conn.execute(queries.get("set_invitation_dossier"), invitation_id, dossier, domain)


async def set_problem(
    conn: db.Executor, invitation_id: uuid.UUID, step: str | None, problem: str | None
) -> None:
    """Record (or clears, with None) the refusal shown on a step."""
    with db.translate("record setup problem"):
        await conn.execute(queries.get("set_invitation_problem"), invitation_id, step, problem)


async def use(conn: db.Executor, invitation_id: uuid.UUID, connection_id: uuid.UUID) -> bool:
    """Mark the invitation used by a connection (False when another Create won or it expired)."""
    with db.translate("use invitation"):
        value = await conn.fetchval(queries.get("use_invitation"), invitation_id, connection_id)
    return value is not None


async def sealed_batch(
    conn: db.Executor, after: uuid.UUID, limit: int
) -> list[models.SealedValues]:
    """Lock the next invitations holding secrets after ``after`` and read them."""
    with db.translate("rotate invitations"):
        records = await conn.fetch(queries.get("rotation_invitations"), after, limit)
    return [models.SealedValues.from_record(r) for r in records]


async def reseal(
    conn: db.Executor, invitation_id: uuid.UUID, tokens: bytes | None, cegid: bytes | None
) -> None:
    """Store an invitation's re-sealed secrets."""
    with db.translate("rotate invitations"):
        await conn.execute(queries.get("rotation_update_invitation"), invitation_id, tokens, cegid)
