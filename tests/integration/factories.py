"""Building blocks for integration tests: connections through the real setup path, documents."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika.abc
import asyncpg
import orjson

from consumers import buffer
from relay import config, crypto, events, models, store
from relay.broker import amqp
from relay.domain import connections, credentials, ingest, inputs
from relay.sandbox import files, signing
from relay.sandbox import qonto as qonto_sandbox
from relay.store import db
from relay.upstreams import qonto as qonto_client

WEBHOOK_SECRET = "webhook-secret-for-tests-0123456789"
FIRM_KEY, FIRM_SECRET = "firm-key-0001", "firm-secret-0001"


async def no_wait(_: float) -> None:
    """Backoff without waiting: the schedule is the product's, the test only skips the sleep."""
    await asyncio.sleep(0)


async def connect(
    settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    *,
    dossier: str = "ACME001",
    client_name: str = "Acme",
    webhook_secret: str = WEBHOOK_SECRET,
) -> uuid.UUID:
    """A connection created the way `relay connections add` creates it (checked upstream)."""
    login, _, secret = qonto.api_key_header.partition(":")
    created = await connections.add(
        settings,
        pool,
        inputs.NewConnection(
            client_name=client_name,
            qonto_organization_id=qonto.organization_id,
            qonto=credentials.QontoApiKey(login=login, secret=config.Secret(secret)),
            cegid=credentials.CegidCredentials(
                api_key=config.Secret(FIRM_KEY), api_secret=config.Secret(FIRM_SECRET)
            ),
            cegid_dossier=dossier,
            cegid_domain="CABINET",
            webhook_secrets=(webhook_secret,),
        ),
    )
    return created.connection.id


async def make_connection(
    pool: asyncpg.Pool,
    settings: config.Settings,
    *,
    webhook_secret: str | tuple[str, ...] = WEBHOOK_SECRET,
    state: str = models.ConnectionState.ACTIVE,
    organization_id: str = "org-test",
    dossier: str = "ACME001",
    client_name: str = "Acme",
) -> uuid.UUID:
    """A connection row written straight through the store (no upstream check), with its webhook
    secret(s)."""
    box = crypto.Box(settings.secret_key.reveal())
    connection_id = uuid.uuid4()
    secrets = (webhook_secret,) if isinstance(webhook_secret, str) else webhook_secret
    async with db.transaction(pool, "add connection") as conn:
        await store.connections.insert(
            conn,
            store.connections.NewConnection(
                id=connection_id,
                client_name=client_name,
                qonto_organization_id=organization_id,
                qonto_auth_kind="api_key",
                qonto_credentials=credentials.seal_qonto(
                    box, credentials.QontoApiKey(login="login", secret=config.Secret("secret"))
                ),
                cegid_credentials=credentials.seal_cegid(
                    box,
                    credentials.CegidCredentials(
                        api_key=config.Secret(FIRM_KEY), api_secret=config.Secret(FIRM_SECRET)
                    ),
                ),
                cegid_key_fingerprint=crypto.fingerprint(FIRM_KEY),
                cegid_dossier=dossier,
                cegid_domain="CABINET",
                scan_since=dt.datetime.now(dt.UTC),
                dossier_checked_at=None,
            ),
        )
        for secret in secrets:
            await store.webhook_secrets.insert(conn, connection_id, box.seal(secret), None, [])
        if state != models.ConnectionState.ACTIVE:
            await store.connections.set_state(conn, connection_id, str(state), "set by a test")
    return connection_id


def receipt(
    qonto: qonto_sandbox.QontoSandbox,
    content: bytes | files.Synthetic | None = None,
    *,
    seed: int = 0,
    side: str = "debit",
    name: str = "ticket.pdf",
    content_type: str = "application/pdf",
) -> tuple[dict[str, Any], str]:
    """A transaction with one attachment in the Qonto sandbox: (transaction, attachment id)."""
    attachment = qonto.add_attachment(
        content if content is not None else files.pdf(seed=seed),
        file_name=name,
        content_type=content_type,
    )
    tx = qonto.add_transaction(
        side=side, amount=f"{10 + seed}.00", label=f"SHOP {seed}", attachment_ids=[attachment]
    )
    return tx, attachment


async def ingest_transaction(
    pool: asyncpg.Pool, connection_id: uuid.UUID, tx: dict[str, Any]
) -> None:
    """Record a transaction as the consumer would (documents pending)."""
    async with pool.acquire() as conn, conn.transaction():
        await ingest.apply(conn, [(connection_id, events.transaction_snapshot(tx))])


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(event)
    return body, {
        "content-type": "application/json",
        "x-qonto-signature": signing.sign(body, secret),
    }


async def states(pool: asyncpg.Pool) -> dict[str, str]:
    """Attachment id → document state."""
    rows = await pool.fetch("SELECT qonto_attachment_id, state FROM documents")
    return {r["qonto_attachment_id"]: r["state"] for r in rows}


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    within_s: float = 10,
    what: str | Callable[[], str] = "condition",
    every_s: float = 0.02,
) -> float:
    """Poll ``condition`` (a function, or a coroutine function) until it holds; the seconds it
    took. Fail the test after ``within_s`` seconds, saying ``what`` (or what it returns then)."""
    started = time.monotonic()
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > within_s:
            said = what if isinstance(what, str) else what()
            raise AssertionError(f"{said} did not happen within {within_s} s")
        await asyncio.sleep(every_s)


def environment(settings: config.Settings) -> dict[str, str]:
    """The RELAY_* variables that make a `relay` subprocess use these settings."""
    env = {
        "RELAY_SECRET_KEY": settings.secret_key.reveal(),
        "RELAY_DATABASE_URL": settings.database_url.reveal(),
        "RELAY_AMQP_URL": settings.amqp_url.reveal(),
        "RELAY_AMQP_PREFIX": settings.amqp_prefix,
        "RELAY_QONTO_API_URL": settings.qonto_api_url,
        "RELAY_QONTO_OAUTH_URL": settings.qonto_oauth_url,
        "RELAY_CEGID_API_URL": settings.cegid_api_url,
        "RELAY_UPLOAD_CONCURRENCY": str(settings.upload_concurrency),
        "RELAY_UPLOAD_CONCURRENCY_PER_FIRM": str(settings.upload_concurrency_per_firm),
        "RELAY_LOG_LEVEL": "warning",
        "RELAY_OUTAGE_LIMIT": str(settings.outage_limit_s),
        "RELAY_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval_s),
        "RELAY_STALL_AFTER": str(settings.stall_after_s),
    }
    if settings.cegid_subscription_key is not None:
        env["RELAY_CEGID_SUBSCRIPTION_KEY"] = settings.cegid_subscription_key.reveal()
    return env


async def process_from_queue(
    settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractConnection,
    pool: asyncpg.Pool,
    publisher: amqp.Publisher,
    count: int,
) -> dict[str, int]:
    """Take ``count`` messages off the events queue and give them to one Buffer batch."""
    channel = await amqp_connection.channel()
    try:
        queue = await channel.get_queue(settings.events_queue, ensure=False)
        messages = [await queue.get(no_ack=False, timeout=5) for _ in range(count)]
        async with qonto_client.http_clients(settings) as http:
            worker = buffer.Buffer(settings, pool, publisher, http)
            return await worker.process([m for m in messages if m is not None])
    finally:
        await channel.close()
