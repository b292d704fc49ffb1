"""Connections: one Qonto organization linked to one Cegid Loop client file (dossier) of one firm.

What `relay connections ...` and the admin API do. Setup is checked against both upstreams before
anything is stored: the Qonto credentials must belong to the organization and to a member allowed to
set up the export (owner, admin or reporting), and the firm's Loop key must be able to read the
dossier (Loop accepts deposits into a dossier that does not exist and silently drops them, so this is
the only place a wrong code dossier can be caught).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets as pysecrets
import uuid
from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from relay import cegid, config, credentials, crypto, db, errors, log, models, qonto, queries

logger = log.get(__name__)

SETUP_ROLES: Final = frozenset({"owner", "admin", "reporting"})
ELIGIBLE_PLANS: Final = frozenset({"smart", "premium", "essential", "business", "enterprise"})
WEBHOOK_TOPICS: Final = ("v1/transactions", "v1/client-invoices", "v1/consent-revocations")
FOLDER_DEADLINE: Final = dt.timedelta(hours=24)
FOLDER_ADVICE: Final = (
    "the client's folder has not appeared in Loop 24 hours after setup: disconnect and reconnect "
    "(relay connections disconnect {id} then relay connections reconnect {id}), and check in Loop Hub "
    "that dossier {dossier} is associated with the partner's API key"
)


@dataclasses.dataclass(frozen=True, slots=True)
class NewConnection:
    client_name: str
    qonto_organization_id: str
    qonto: credentials.QontoCredentials
    cegid: credentials.CegidCredentials
    cegid_dossier: str
    cegid_domain: str
    webhook_secrets: Sequence[str] = ()
    subscribe: bool = False
    since: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    connection: models.Connection
    webhook_url: str
    webhook_path: str
    subscriptions: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.connection.id),
            "webhook_url": self.webhook_url,
            "webhook_path": self.webhook_path,
            "webhook_subscriptions_created": self.subscriptions,
            "connection": self.connection.to_json(),
        }


def _plan_of(organization: dict[str, Any]) -> str | None:
    """The organization's plan if Qonto says it (the documented payload has no such field)."""
    for key in ("plan", "subscription_plan", "pricing_plan"):
        value = organization.get(key)
        if isinstance(value, dict):
            value = value.get("name") or value.get("code")
        if isinstance(value, str) and value:
            return value
    return None


def _plan_is_eligible(plan: str) -> bool:
    return any(name in plan.lower() for name in ELIGIBLE_PLANS)


async def verify_qonto(
    client: qonto.QontoClient, organization_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the credentials' member may set up the export for this organization; raise Refused."""
    membership = await client.get_membership()
    role = str(membership.get("role", "")).lower()
    if role not in SETUP_ROLES:
        raise errors.Refused(
            f"this Qonto member's role is {role or 'unknown'!r}: only owners, admins and reporting "
            "members can set up the accounting export"
        )
    member_org = membership.get("organization_id")
    if member_org and str(member_org) != organization_id:
        raise errors.Refused(
            "the Qonto credentials belong to another organization than --qonto-organization-id"
        )
    organization = await client.get_organization()
    plan = _plan_of(organization)
    if plan is not None and not _plan_is_eligible(plan):
        raise errors.Refused(
            f"the Qonto plan {plan!r} does not include the accounting export "
            "(eligible plans: Smart, Premium, Essential, Business, Enterprise)"
        )
    return membership, organization


async def add(settings: config.Settings, pool: asyncpg.Pool, new: NewConnection) -> Created:
    """Validate against Qonto and Cegid, then store the connection with its sealed secrets."""
    if not new.webhook_secrets and not new.subscribe:
        raise errors.Refused(
            "give at least one --webhook-secret, or --subscribe so the relay registers the "
            "webhooks itself"
        )
    for secret in new.webhook_secrets:
        if not 16 <= len(secret) <= 256:
            raise errors.Refused("a webhook secret must be 16 to 256 characters long")
    box = crypto.Box(settings.secret_key.reveal())
    connection_id = uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    rotated: list[credentials.QontoCredentials] = []

    async def keep_rotated(creds: credentials.QontoCredentials) -> None:
        rotated.append(creds)

    subscriptions: list[tuple[str, str | None, list[str]]] = [
        (secret, None, list(WEBHOOK_TOPICS)) for secret in new.webhook_secrets
    ]
    async with qonto.http_clients(settings) as http, cegid.http_client(settings) as cegid_http:
        client = qonto.client(settings, new.qonto, http, on_tokens_rotated=keep_rotated)
        await verify_qonto(client, new.qonto_organization_id)
        await cegid.CegidClient(settings, cegid_http).check_dossier(new.cegid, new.cegid_dossier)
        if new.subscribe and not new.webhook_secrets:
            callback = settings.webhook_url(str(connection_id))
            for topic in WEBHOOK_TOPICS:
                secret = pysecrets.token_hex(32)
                created = await client.create_webhook_subscription(callback, [topic], secret=secret)
                subscriptions.append(
                    (str(created.get("secret") or secret), created.get("id"), [topic])
                )
    qonto_creds = rotated[-1] if rotated else new.qonto
    kind = "oauth" if isinstance(qonto_creds, credentials.QontoOAuth) else "api_key"
    with db.translate("add connection"):
        async with pool.acquire() as conn, conn.transaction():
            record = await conn.fetchrow(
                queries.get("insert_connection"),
                connection_id,
                new.client_name,
                new.qonto_organization_id,
                kind,
                credentials.seal_qonto(box, qonto_creds),
                credentials.seal_cegid(box, new.cegid),
                crypto.fingerprint(new.cegid.api_key.reveal()),
                new.cegid_dossier,
                new.cegid_domain,
                new.since or now,
                now,
            )
            for secret, subscription_id, topics in subscriptions:
                await conn.execute(
                    queries.get("insert_webhook_secret"),
                    connection_id,
                    box.seal(secret),
                    subscription_id,
                    topics,
                )
    if record is None:
        raise errors.DatabaseUnavailable("the new connection was not stored")
    connection = models.Connection.from_record(record)
    logger.info(
        "connection_added",
        connection=str(connection_id),
        dossier=new.cegid_dossier,
        subscriptions=len(subscriptions),
    )
    return Created(
        connection=connection,
        webhook_url=settings.webhook_url(str(connection_id)),
        webhook_path=settings.webhook_path(str(connection_id)),
        subscriptions=len(subscriptions) if new.subscribe else 0,
    )


async def list_all(pool: asyncpg.Pool) -> list[models.Connection]:
    with db.translate("list connections"):
        records = await pool.fetch(queries.get("list_connections"))
    return [models.Connection.from_record(r) for r in records]


async def get(pool: asyncpg.Pool, connection_id: uuid.UUID) -> models.Connection:
    with db.translate("get connection"):
        record = await pool.fetchrow(queries.get("get_connection"), connection_id)
    if record is None:
        raise errors.NotFound(f"no connection {connection_id}")
    return models.Connection.from_record(record)


def folder_warning(
    connection: models.Connection, now: dt.datetime, *, waiting_documents: int
) -> str | None:
    """The advice to give when the client's folder has not appeared in Loop 24 h after setup.

    Loop shows the partner's folder after the first deposit; nothing in its API lists folders. So the
    relay says it when, 24 hours after setup, documents are waiting but no deposit has succeeded yet,
    or when Cegid refuses the dossier (the check's outcome is the connection's state and reason).
    """
    if connection.state in (models.ConnectionState.REVOKED, models.ConnectionState.DISCONNECTED):
        return None
    if now - connection.created_at < FOLDER_DEADLINE:
        return None
    if (connection.first_upload_at is None and waiting_documents > 0) or (
        connection.state == models.ConnectionState.NEEDS_ATTENTION
        and (connection.state_reason or "").startswith("Cegid")
    ):
        return FOLDER_ADVICE.format(id=connection.id, dossier=connection.cegid_dossier)
    return None


async def describe(pool: asyncpg.Pool, connection_id: uuid.UUID) -> dict[str, Any]:
    """`connections show`: the connection, its webhook secrets (never their values), its documents."""
    connection = await get(pool, connection_id)
    with db.translate("describe connection"):
        secrets_rows = await pool.fetch(queries.get("list_webhook_secrets"), connection_id)
        counts = await pool.fetch(queries.get("count_documents_by_state"), connection_id)
    now = dt.datetime.now(dt.UTC)
    by_state = {r["state"]: r["n"] for r in counts}
    waiting = sum(by_state.get(s, 0) for s in ("pending", "uploading", "failed", "in_doubt"))
    return {
        **connection.to_json(),
        "webhook_subscriptions": [
            {
                "qonto_subscription_id": r["qonto_subscription_id"],
                "topics": list(r["topics"]),
                "created_at": r["created_at"].isoformat(),
                "revoked_at": r["revoked_at"].isoformat() if r["revoked_at"] else None,
            }
            for r in secrets_rows
        ],
        "documents": by_state,
        "warnings": [w for w in (folder_warning(connection, now, waiting_documents=waiting),) if w],
    }


async def check(
    settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> dict[str, Any]:
    """Re-check both sides now; flag the connection when one refuses, clear the flag when both pass."""
    connection = await get(pool, connection_id)
    box = crypto.Box(settings.secret_key.reveal())
    qonto_creds, cegid_creds = await credentials.load(pool, box, connection_id)
    problems: list[str] = []

    async def store_rotated(creds: credentials.QontoCredentials) -> None:
        await credentials.store_qonto(pool, box, connection_id, creds)

    async with qonto.http_clients(settings) as http, cegid.http_client(settings) as cegid_http:
        try:
            await verify_qonto(
                qonto.client(settings, qonto_creds, http, on_tokens_rotated=store_rotated),
                connection.qonto_organization_id,
            )
        except (errors.QontoAuthRejected, errors.Refused) as exc:
            problems.append(f"Qonto: {exc}")
        try:
            await cegid.CegidClient(settings, cegid_http).check_dossier(
                cegid_creds, connection.cegid_dossier
            )
        except errors.CegidAccessRefused as exc:
            problems.append(f"Cegid: {exc}")
    if connection.state in (models.ConnectionState.ACTIVE, models.ConnectionState.NEEDS_ATTENTION):
        state = (
            models.ConnectionState.NEEDS_ATTENTION if problems else models.ConnectionState.ACTIVE
        )
        await set_state(pool, connection_id, state, "; ".join(problems) or None)
        if not problems:
            with db.translate("dossier checked"):
                await pool.execute(queries.get("set_dossier_checked"), connection_id)
    result = await describe(pool, connection_id)
    result["problems"] = problems
    return result


async def set_state(
    pool: asyncpg.Pool, connection_id: uuid.UUID, state: models.ConnectionState, reason: str | None
) -> models.Connection:
    with db.translate("set connection state"):
        record = await pool.fetchrow(
            queries.get("set_connection_state"), connection_id, state, reason
        )
    if record is None:
        raise errors.NotFound(f"no connection {connection_id}")
    logger.info("connection_state_changed", connection=str(connection_id), state=str(state))
    return models.Connection.from_record(record)


async def flag(
    pool: asyncpg.Pool, connection_id: uuid.UUID, state: models.ConnectionState, reason: str | None
) -> bool:
    """What the relay decides by itself (``needs_attention`` on a refusal, ``active`` when a check
    passes): applied only to an active or flagged connection, never over a disconnect or a
    revocation an operator or Qonto made meanwhile. True when applied."""
    with db.translate("flag connection"):
        record = await pool.fetchrow(queries.get("flag_connection"), connection_id, state, reason)
    if record is None:
        logger.info("connection_flag_ignored", connection=str(connection_id), state=str(state))
        return False
    logger.info("connection_state_changed", connection=str(connection_id), state=str(state))
    return True


async def disconnect(pool: asyncpg.Pool, connection_id: uuid.UUID) -> models.Connection:
    """Stop everything for this connection; its webhooks answer 404 (so Qonto keeps retrying them)."""
    return await set_state(
        pool, connection_id, models.ConnectionState.DISCONNECTED, "disconnected by an operator"
    )


async def reconnect(
    settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> dict[str, Any]:
    """Make a disconnected (or flagged) connection active again after checking both sides."""
    connection = await get(pool, connection_id)
    if connection.state == models.ConnectionState.REVOKED:
        raise errors.Refused(
            "the organization revoked the relay's access in Qonto: add a new connection with fresh "
            "credentials"
        )
    await set_state(pool, connection_id, models.ConnectionState.ACTIVE, None)
    return await check(settings, pool, connection_id)
