"""Connections, each linking one Qonto organization to one Cegid Loop dossier of one firm.

What ``relay connections ...`` and the admin API do; setup is checked against both upstreams
before anything is stored (:func:`add`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets as pysecrets
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Final

import asyncpg

from relay import config, crypto, errors, log, models, store
from relay.domain import credentials, eligibility, folders, inputs
from relay.store import db
from relay.upstreams import cegid, qonto

logger = log.get(__name__)

WEBHOOK_TOPICS: Final = ("v1/transactions", "v1/client-invoices", "v1/consent-revocations")


@dataclasses.dataclass(frozen=True, slots=True)
class Created:
    connection: models.Connection
    webhook_url: str
    webhook_path: str
    subscriptions: int  # webhook subscriptions the relay created in Qonto
    webhook_secrets: int = 0  # webhook secrets stored (given, or returned by those subscriptions)
    warnings: Sequence[str] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.connection.id),
            "webhook_url": self.webhook_url,
            "webhook_path": self.webhook_path,
            "webhook_subscriptions_created": self.subscriptions,
            "webhook_secrets_stored": self.webhook_secrets,
            "warnings": list(self.warnings),
            "connection": self.connection.to_json(),
        }


# Work done inside the transaction that stores a new connection (given its id): if it raises,
# nothing is stored and the webhook subscriptions just created are deleted again.
Within = Callable[[db.Conn, uuid.UUID], Awaitable[None]]


async def add(
    settings: config.Settings,
    pool: asyncpg.Pool,
    new: inputs.NewConnection,
    *,
    within: Within | None = None,
) -> Created:
    """Validate against Qonto and Cegid, then store the connection with its sealed secrets.

    The Qonto credentials must belong to the organization and to a member allowed to set up the
    export (owner, admin or reporting: see :mod:`relay.domain.eligibility`), and the firm's Loop
    key must be able to read the dossier (Loop accepts deposits into a dossier that does not exist
    and silently drops them, so this is the only place a wrong code dossier can be caught).

    With ``subscribe``, the webhook subscriptions are created in Qonto before the connection is
    stored; if a later step fails they are deleted again (Qonto would otherwise call, for days, a
    connection that does not exist), and the error says so. ``within`` runs in the storing
    transaction (the setup pages mark their invitation used there).
    """
    inputs.validate(new)
    box = crypto.Box(settings.secret_key.reveal())
    connection_id = uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    rotated: list[credentials.QontoCredentials] = []

    async def keep_rotated(creds: credentials.QontoCredentials) -> None:
        rotated.append(creds)

    subscriptions: list[tuple[str, str | None, list[str]]] = [
        (secret, None, list(WEBHOOK_TOPICS)) for secret in new.webhook_secrets
    ]
    created_ids: list[str] = []
    async with qonto.http_clients(settings) as http, cegid.http_client(settings) as cegid_http:
        client = qonto.client(settings, new.qonto, http, on_tokens_rotated=keep_rotated)
        eligible = await eligibility.verify_qonto(client, new.qonto_organization_id)
        warnings = [w for w in (eligibility.plan_notice(eligible.plan),) if w]
        await cegid.CegidClient(settings, cegid_http).check_dossier(new.cegid, new.cegid_dossier)
        try:
            if new.subscribe and not new.webhook_secrets:
                callback = settings.webhook_url(str(connection_id))
                for topic in WEBHOOK_TOPICS:
                    secret = pysecrets.token_hex(32)
                    created = await client.create_webhook_subscription(
                        callback, [topic], secret=secret
                    )
                    subscription_id = str(created["id"]) if created.get("id") else None
                    if subscription_id:
                        created_ids.append(subscription_id)
                    subscriptions.append(
                        (str(created.get("secret") or secret), subscription_id, [topic])
                    )
            qonto_creds = rotated[-1] if rotated else new.qonto
            connection = await _insert(
                pool, box, connection_id, new, qonto_creds, subscriptions, now, within
            )
        except BaseException as exc:
            if created_ids:
                await _undo_subscriptions(client, created_ids, exc)
            raise
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
        subscriptions=len(subscriptions) - len(new.webhook_secrets),
        webhook_secrets=len(subscriptions),
        warnings=warnings,
    )


async def _insert(
    pool: asyncpg.Pool,
    box: crypto.Box,
    connection_id: uuid.UUID,
    new: inputs.NewConnection,
    qonto_creds: credentials.QontoCredentials,
    subscriptions: Sequence[tuple[str, str | None, list[str]]],
    now: dt.datetime,
    within: Within | None = None,
) -> models.Connection:
    kind = "oauth" if isinstance(qonto_creds, credentials.QontoOAuth) else "api_key"
    async with db.transaction(pool, "add connection") as conn:
        connection = await store.connections.insert(
            conn,
            store.connections.NewConnection(
                id=connection_id,
                client_name=new.client_name,
                qonto_organization_id=new.qonto_organization_id,
                qonto_auth_kind=kind,
                qonto_credentials=credentials.seal_qonto(box, qonto_creds),
                cegid_credentials=credentials.seal_cegid(box, new.cegid),
                cegid_key_fingerprint=crypto.fingerprint(new.cegid.api_key.reveal()),
                cegid_dossier=new.cegid_dossier,
                cegid_domain=new.cegid_domain,
                scan_since=new.since or now,
                dossier_checked_at=now,
            ),
        )
        for secret, subscription_id, topics in subscriptions:
            await store.webhook_secrets.insert(
                conn, connection_id, box.seal(secret), subscription_id, topics
            )
        if within is not None:
            await within(conn, connection_id)
    return connection


async def _undo_subscriptions(
    client: qonto.QontoClient, subscription_ids: Sequence[str], exc: BaseException
) -> None:
    """Delete the subscriptions of a connection that will not be stored, and say so in ``exc``."""
    left: list[str] = []
    for subscription_id in subscription_ids:
        try:
            await client.delete_webhook_subscription(subscription_id)
        except errors.RelayError as failure:
            logger.warning(
                "webhook_subscription_not_deleted",
                subscription=subscription_id,
                reason=str(failure),
            )
            left.append(subscription_id)
    deleted = len(subscription_ids) - len(left)
    logger.warning("webhook_subscriptions_undone", deleted=deleted, left=left)
    note = f"the {deleted} webhook subscription(s) already created in Qonto were deleted"
    if left:
        note = (
            f"{note if deleted else 'no webhook subscription could be deleted'}; delete "
            f"{', '.join(left)} in Qonto (they call a connection that was not stored)"
        )
    if isinstance(exc, errors.RelayError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} ({note})",)
    else:
        exc.add_note(note)


async def list_all(pool: asyncpg.Pool) -> list[models.Connection]:
    return await store.connections.list_all(pool)


async def get(pool: asyncpg.Pool, connection_id: uuid.UUID) -> models.Connection:
    connection = await store.connections.get(pool, connection_id)
    if connection is None:
        raise errors.NotFound(f"no connection {connection_id}")
    return connection


async def describe(pool: asyncpg.Pool, connection_id: uuid.UUID) -> dict[str, Any]:
    """Describe the connection, its webhook secrets (never their values) and its documents.

    This is what ``relay connections show`` prints.
    """
    connection = await get(pool, connection_id)
    subscriptions = await store.webhook_secrets.subscriptions(pool, connection_id)
    counts = await store.documents.count_by_state(pool, connection_id)
    facts = await store.connections.folder_facts(pool, connection_id)
    now = dt.datetime.now(dt.UTC)
    by_state = {c.state: c.n for c in counts}
    waiting = sum(by_state.get(s, 0) for s in ("pending", "uploading", "in_doubt"))
    connected_at = facts.connected_at if facts is not None else connection.created_at
    warning = folders.folder_warning(
        connection,
        now,
        waiting_documents=waiting,
        connected_at=connected_at,
        first_deposit_at=facts.first_deposit_at if facts is not None else None,
    )
    return {
        **connection.to_json(),
        "connected_at": connected_at.isoformat(),
        "webhook_subscriptions": [
            {
                "qonto_subscription_id": s.qonto_subscription_id,
                "topics": list(s.topics),
                "created_at": s.created_at.isoformat(),
                "revoked_at": s.revoked_at.isoformat() if s.revoked_at else None,
            }
            for s in subscriptions
        ],
        "documents": by_state,
        "warnings": [warning] if warning else [],
    }


async def _verify(
    settings: config.Settings, pool: asyncpg.Pool, connection: models.Connection
) -> tuple[list[str], list[str], set[models.Refuser]]:
    """Check both sides now and return (problems, notices, who refused).

    Raise when a side cannot be checked at all (unavailable, misconfigured): then nothing is
    known, and nothing may change.
    """
    box = crypto.Box(settings.secret_key.reveal())
    qonto_creds, cegid_creds = await credentials.load(pool, box, connection.id)
    problems: list[str] = []
    refused_by: set[models.Refuser] = set()
    notices: list[str] = []

    async def store_rotated(creds: credentials.QontoCredentials) -> None:
        await credentials.store_qonto(pool, box, connection.id, creds)

    async with qonto.http_clients(settings) as http, cegid.http_client(settings) as cegid_http:
        try:
            eligible = await eligibility.verify_qonto(
                qonto.client(settings, qonto_creds, http, on_tokens_rotated=store_rotated),
                connection.qonto_organization_id,
            )
            notices += [n for n in (eligibility.plan_notice(eligible.plan),) if n]
        except (errors.QontoAuthRejected, errors.Refused) as exc:
            problems.append(f"Qonto: {exc}")
            refused_by.add(models.Refuser.QONTO)
        try:
            await cegid.CegidClient(settings, cegid_http).check_dossier(
                cegid_creds, connection.cegid_dossier
            )
        except errors.CegidAccessRefused as exc:
            problems.append(f"Cegid: {exc}")
            refused_by.add(models.Refuser.CEGID)
    return problems, notices, refused_by


async def _checked(
    pool: asyncpg.Pool, connection_id: uuid.UUID, problems: list[str], notices: list[str]
) -> dict[str, Any]:
    if not problems:
        await store.connections.set_dossier_checked(pool, connection_id)
    result = await describe(pool, connection_id)
    result["problems"] = problems
    result["warnings"] = [*notices, *result["warnings"]]
    return result


async def check(
    settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> dict[str, Any]:
    """Re-check both sides of the connection now.

    The connection is flagged when one refuses, its flag cleared when both pass; a disconnected
    or revoked connection keeps its state.
    """
    connection = await get(pool, connection_id)
    problems, notices, refused_by = await _verify(settings, pool, connection)
    state = models.ConnectionState.NEEDS_ATTENTION if problems else models.ConnectionState.ACTIVE
    await flag(pool, connection_id, state, "; ".join(problems) or None, refused_by)
    return await _checked(pool, connection_id, problems, notices)


async def set_state(
    pool: asyncpg.Pool, connection_id: uuid.UUID, state: models.ConnectionState, reason: str | None
) -> models.Connection:
    connection = await store.connections.set_state(pool, connection_id, state, reason)
    if connection is None:
        raise errors.NotFound(f"no connection {connection_id}")
    logger.info("connection_state_changed", connection=str(connection_id), state=str(state))
    return connection


async def flag(
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    state: models.ConnectionState,
    reason: str | None,
    refused_by: Collection[models.Refuser] = (),
) -> bool:
    """Set a state the relay decides by itself, returning True when applied.

    That is ``needs_attention`` on a refusal, ``active`` when a check passes. It applies only to an
    active or flagged connection, never over a disconnect or a revocation an operator or Qonto made
    meanwhile.
    """
    if await store.connections.flag(pool, connection_id, state, reason, refused_by) is None:
        logger.info("connection_flag_ignored", connection=str(connection_id), state=str(state))
        return False
    logger.info("connection_state_changed", connection=str(connection_id), state=str(state))
    return True


async def clear_cegid_flag(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> models.Connection | None:
    """Clear the flag a Cegid refusal raised, and no other one, after a dossier read passed.

    Only a flag Cegid alone raised (``refused_by``) is cleared. Returns the connection as it is now,
    or None when it had no such flag.
    """
    cleared = await store.connections.clear_cegid_flag(pool, connection_id)
    if cleared is None:
        return None
    logger.info("connection_state_changed", connection=str(connection_id), state="active")
    return cleared


async def disconnect(pool: asyncpg.Pool, connection_id: uuid.UUID) -> models.Connection:
    """Stop everything for this connection.

    Its webhooks answer 404 (so Qonto keeps retrying them).
    """
    return await set_state(
        pool, connection_id, models.ConnectionState.DISCONNECTED, "disconnected by an operator"
    )


async def reconnect(
    settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> dict[str, Any]:
    """Resume a disconnected (or flagged) connection once both sides are checked.

    Its state is set from the outcome (active, or needs_attention with the problems), with its
    reconnection time. When the check cannot run, nothing changes.
    """
    connection = await get(pool, connection_id)
    if connection.state == models.ConnectionState.REVOKED:
        raise _revoked()
    problems, notices, refused_by = await _verify(settings, pool, connection)
    state = models.ConnectionState.NEEDS_ATTENTION if problems else models.ConnectionState.ACTIVE
    if (
        await store.connections.reconnect(
            pool, connection_id, state, "; ".join(problems) or None, refused_by
        )
        is None
    ):
        raise _revoked()
    logger.info("connection_reconnected", connection=str(connection_id), state=str(state))
    return await _checked(pool, connection_id, problems, notices)


def _revoked() -> errors.Refused:
    return errors.Refused(
        "the organization revoked the relay's access in Qonto: add a new connection with fresh "
        "credentials"
    )
