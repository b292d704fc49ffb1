"""Invitations, the single-use links with which a client's two people set up a connection.

``relay connections invite`` (or the admin API) creates one (:func:`create`); the setup's
progress lives here, server-side (:class:`Invitation`), so the link can be forwarded from the
Qonto member to the accountant.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import uuid
from typing import Any, Final

import asyncpg

from relay import config, crypto, errors, log, models, store
from relay.domain import credentials
from relay.store import db

logger = log.get(__name__)

LIFETIME: Final = dt.timedelta(days=7)
TOKEN_BYTES: Final = 32  # 256 bits of entropy (128 at least are required)
STEPS: Final = ("qonto", "key", "dossier", "hub")


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    """A new invitation, whose ``setup_url`` holds its token and is shown once, never stored."""

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
    """Draw a setup token of 256 random bits, URL-safe."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def setup_url(settings: config.Settings, token: str) -> str:
    return f"{settings.public_url.rstrip('/')}/setup/{token}"


async def create(settings: config.Settings, pool: asyncpg.Pool, client_name: str) -> Created:
    """Create a single-use setup link for ``client_name``, valid :data:`LIFETIME`.

    Its token has 256 random bits, of which only the SHA-256 is stored; it is used once, when
    **Create** stores the connection.
    """
    name = client_name.strip()
    if not name:
        raise errors.Refused("the client name must not be empty")
    if len(name) > 200:
        raise errors.Refused("the client name must be at most 200 characters")
    token = new_token()
    invitation_id = uuid.uuid4()
    expires_at = dt.datetime.now(dt.UTC) + LIFETIME
    await store.invitations.insert(
        pool, invitation_id, crypto.token_digest(token), name, expires_at
    )
    logger.info("invitation_created", invitation=str(invitation_id))
    return Created(invitation_id, name, setup_url(settings, token), expires_at)


async def find(pool: asyncpg.Pool, token: str) -> Invitation | None:
    """Find the invitation of a setup token, whatever its state (None when no such token)."""
    return await store.invitations.by_token(pool, crypto.token_digest(token))


async def get(pool: asyncpg.Pool, invitation_id: uuid.UUID) -> Invitation | None:
    return await store.invitations.get(pool, invitation_id)


async def list_all(pool: asyncpg.Pool) -> list[Invitation]:
    return await store.invitations.list_all(pool)


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
    """Record an eligible member's consent, tokens sealed (False if the invitation is not open)."""
    return await store.invitations.set_qonto(
        pool,
        invitation_id,
        organization_id,
        organization_name,
        role,
        plan,
        credentials.seal_qonto(box, tokens),
    )


async def store_qonto_tokens(
    pool: asyncpg.Pool, box: crypto.Box, invitation_id: uuid.UUID, tokens: credentials.QontoOAuth
) -> None:
    await store.invitations.set_qonto_tokens(
        pool, invitation_id, credentials.seal_qonto(box, tokens)
    )


async def forget_qonto(pool: asyncpg.Pool, invitation_id: uuid.UUID, problem: str) -> None:
    await store.invitations.forget_qonto(pool, invitation_id, problem)


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
    """Record the Loop API key and the secret (None keeps the one already given)."""
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
    await store.invitations.set_cegid_credentials(pool, invitation.id, sealed)


async def record_dossier(
    pool: asyncpg.Pool, invitation_id: uuid.UUID, dossier: str, domain: str
) -> None:
    await store.invitations.set_dossier(pool, invitation_id, dossier, domain)


async def set_problem(
    pool: asyncpg.Pool, invitation_id: uuid.UUID, step: str | None, problem: str | None
) -> None:
    await store.invitations.set_problem(pool, invitation_id, step, problem)


class AlreadyUsed(errors.Refused):
    """The invitation was used (another Create won) or expired meanwhile."""


async def use(conn: db.Conn, invitation_id: uuid.UUID, connection_id: uuid.UUID) -> None:
    """Mark the invitation used by this connection, in the connection's own transaction."""
    if not await store.invitations.use(conn, invitation_id, connection_id):
        raise AlreadyUsed("this setup link was already used or has expired")
