"""Invitations: single-use links with which a client's two people set up a connection in a browser.

`relay connections invite` (or the admin API) creates one: a token of 256 random bits, of which only
the SHA-256 is stored, valid 7 days, used once (when **Create** stores the connection). The setup's
progress lives here, server-side, so the link can be forwarded from the Qonto member to the
accountant: the Qonto consent (tokens sealed), then the Loop key and secret (sealed), the code dossier
and domain, and a refusal met at Create, shown on the step it belongs to.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import uuid
from typing import Any, Final

import asyncpg

from relay import config, crypto, errors, log, models
from relay.domain import credentials
from relay.store import db, queries

logger = log.get(__name__)

LIFETIME: Final = dt.timedelta(days=7)
TOKEN_BYTES: Final = 32  # 256 bits of entropy (128 at least are required)
STEPS: Final = ("qonto", "key", "dossier", "hub")


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    """A new invitation; ``setup_url`` holds its token and is shown once, never stored."""

    id: uuid.UUID
    client_name: str
    setup_url: str
    expires_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "client_name": self.client_name,
            "setup_url": self.setup_url,
            "expires_at": self.expires_at.isoformat(),
        }


Invitation = models.Invitation


def new_token() -> str:
    """A setup token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def setup_url(settings: config.Settings, token: str) -> str:
    return f"{settings.public_url.rstrip('/')}/setup/{token}"


async def create(settings: config.Settings, pool: asyncpg.Pool, client_name: str) -> Created:
    """A new single-use setup link for ``client_name``, valid :data:`LIFETIME`."""
    name = client_name.strip()
    if not name:
        raise errors.Refused("the client name must not be empty")
    if len(name) > 200:
        raise errors.Refused("the client name must be at most 200 characters")
    token = new_token()
    invitation_id = uuid.uuid4()
    expires_at = dt.datetime.now(dt.UTC) + LIFETIME
    with db.translate("create invitation"):
        await pool.execute(
            queries.get("insert_invitation"),
            invitation_id,
            crypto.token_digest(token),
            name,
            expires_at,
        )
    logger.info("invitation_created", invitation=str(invitation_id))
    return Created(invitation_id, name, setup_url(settings, token), expires_at)


async def find(pool: asyncpg.Pool, token: str) -> Invitation | None:
    """The invitation of a setup token, whatever its state (None when no such token)."""
    with db.translate("find invitation"):
        record = await pool.fetchrow(
            queries.get("get_invitation_by_token"), crypto.token_digest(token)
        )
    return None if record is None else Invitation.from_record(record)


async def get(pool: asyncpg.Pool, invitation_id: uuid.UUID) -> Invitation | None:
    with db.translate("get invitation"):
        record = await pool.fetchrow(queries.get("get_invitation"), invitation_id)
    return None if record is None else Invitation.from_record(record)


async def list_all(pool: asyncpg.Pool) -> list[Invitation]:
    with db.translate("list invitations"):
        records = await pool.fetch(queries.get("list_invitations"))
    return [Invitation.from_record(r) for r in records]


async def record_qonto(
    pool: asyncpg.Pool,
    box: crypto.Box,
    invitation_id: uuid.UUID,
    *,
    organization_id: str,
    organization_name: str | None,
    role: str,
    plan: str | None,
    tokens: credentials.QontoOAuth,
) -> bool:
    """An eligible member's consent: the tokens sealed. False if the invitation is no longer open."""
    with db.translate("record Qonto consent"):
        record = await pool.fetchrow(
            queries.get("set_invitation_qonto"),
            invitation_id,
            organization_id,
            organization_name,
            role,
            plan,
            credentials.seal_qonto(box, tokens),
        )
    return record is not None


async def store_qonto_tokens(
    pool: asyncpg.Pool, box: crypto.Box, invitation_id: uuid.UUID, tokens: credentials.QontoOAuth
) -> None:
    with db.translate("store rotated Qonto tokens"):
        await pool.execute(
            queries.get("set_invitation_qonto_tokens"),
            invitation_id,
            credentials.seal_qonto(box, tokens),
        )


async def forget_qonto(pool: asyncpg.Pool, invitation_id: uuid.UUID, problem: str) -> None:
    with db.translate("forget Qonto consent"):
        await pool.execute(queries.get("forget_invitation_qonto"), invitation_id, problem)


def qonto_tokens(box: crypto.Box, invitation: Invitation) -> credentials.QontoOAuth | None:
    if invitation.qonto_tokens is None:
        return None
    creds = credentials.open_qonto(box, "oauth", invitation.qonto_tokens)
    assert isinstance(creds, credentials.QontoOAuth)
    return creds


def cegid_credentials(
    box: crypto.Box, invitation: Invitation
) -> credentials.CegidCredentials | None:
    if invitation.cegid_credentials is None:
        return None
    return credentials.open_cegid(box, invitation.cegid_credentials)


async def record_key(
    pool: asyncpg.Pool,
    box: crypto.Box,
    invitation: Invitation,
    api_key: str,
    api_secret: str | None,
) -> None:
    """The Loop API key, and the secret (None: keep the one already given)."""
    if api_secret is None:
        kept = cegid_credentials(box, invitation)
        if kept is None:
            raise errors.Refused("the API secret is required")
        api_secret = kept.api_secret.reveal()
    sealed = credentials.seal_cegid(
        box,
        credentials.CegidCredentials(
            api_key=config.Secret(api_key), api_secret=config.Secret(api_secret)
        ),
    )
    with db.translate("record Loop key"):
        await pool.execute(queries.get("set_invitation_cegid_credentials"), invitation.id, sealed)


async def record_dossier(
    pool: asyncpg.Pool, invitation_id: uuid.UUID, dossier: str, domain: str
) -> None:
    with db.translate("record Loop dossier"):
        await pool.execute(queries.get("set_invitation_dossier"), invitation_id, dossier, domain)


async def set_problem(
    pool: asyncpg.Pool, invitation_id: uuid.UUID, step: str | None, problem: str | None
) -> None:
    with db.translate("record setup problem"):
        await pool.execute(queries.get("set_invitation_problem"), invitation_id, step, problem)


class AlreadyUsed(errors.Refused):
    """The invitation was used (another Create won) or expired meanwhile."""


async def use(conn: db.Conn, invitation_id: uuid.UUID, connection_id: uuid.UUID) -> None:
    """Mark the invitation used by this connection, in the connection's own transaction."""
    used = await conn.fetchval(queries.get("use_invitation"), invitation_id, connection_id)
    if used is None:
        raise AlreadyUsed("this setup link was already used or has expired")
