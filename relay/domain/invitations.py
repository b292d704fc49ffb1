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

from relay import config, crypto, errors, log
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


@dataclasses.dataclass(frozen=True, slots=True)
class Invitation:
    """An invitation and the setup's progress (its secrets stay sealed, out of ``repr``).

    The progress is the Qonto consent (tokens sealed), then the Loop key and secret (sealed), the
    code dossier and domain, and a refusal met at Create, shown on the step it belongs to.
    """

    id: uuid.UUID
    client_name: str
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None
    connection_id: uuid.UUID | None
    qonto_organization_id: str | None
    qonto_organization_name: str | None
    qonto_role: str | None
    qonto_plan: str | None
    qonto_connected_at: dt.datetime | None
    cegid_dossier: str | None
    cegid_domain: str | None
    problem_step: str | None
    problem: str | None
    qonto_tokens: bytes | None = dataclasses.field(default=None, repr=False)
    cegid_credentials: bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_record(cls, record: Any) -> Invitation:
        values = {f.name: record[f.name] for f in dataclasses.fields(cls)}
        for name in ("qonto_tokens", "cegid_credentials"):
            if values[name] is not None:
                values[name] = bytes(values[name])
        return cls(**values)

    def usable(self, now: dt.datetime) -> bool:
        return self.used_at is None and self.expires_at > now

    @property
    def state(self) -> str:
        if self.used_at is not None:
            return "used"
        if self.expires_at <= dt.datetime.now(dt.UTC):
            return "expired"
        return "open"

    @property
    def qonto_done(self) -> bool:
        return self.qonto_tokens is not None and self.qonto_organization_id is not None

    @property
    def key_done(self) -> bool:
        return self.cegid_credentials is not None

    @property
    def dossier_done(self) -> bool:
        return bool(self.cegid_dossier and self.cegid_domain)

    def next_step(self) -> str:
        """Name the first step still to do, in the order qonto, key, dossier, hub (and Create)."""
        if not self.qonto_done:
            return "qonto"
        if not self.key_done:
            return "key"
        if not self.dossier_done:
            return "dossier"
        return "hub"

    def problem_on(self, step: str) -> str | None:
        return self.problem if self.problem_step == step else None

    def to_json(self) -> dict[str, Any]:
        """Show what an operator sees of an invitation (never its token or a secret)."""
        return {
            "id": str(self.id),
            "client_name": self.client_name,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "used_at": self.used_at.isoformat() if self.used_at else None,
            "connection_id": str(self.connection_id) if self.connection_id else None,
            "next_step": None if self.used_at else self.next_step(),
        }


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
    """Find the invitation of a setup token, whatever its state (None when no such token)."""
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
    """Record an eligible member's consent, tokens sealed; False if the invitation is not open."""
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
