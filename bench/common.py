"""What every benchmark shares: a throwaway database and queue prefix, a connection row, processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import asyncpg
import orjson

from relay import config, crypto, store
from relay.broker import amqp
from relay.domain import credentials
from relay.store import db

__all__ = ["asyncpg", "config", "credentials"]

WEBHOOK_SECRET = "bench-webhook-secret-0123456789abcdef"


def event_body(i: int) -> bytes:
    """A distinct, realistic `v1/transactions` event with one attachment."""
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "subscription_id": "bench",
            "organization_id": "bench-organization",
            "membership_id": "bench",
            "type": "v1/transactions",
            "created_at": "2026-11-23T09:41:07Z",
            "data": {
                "event": "created",
                "id": str(uuid.uuid4()),
                "side": "debit" if i % 5 else "credit",
                "amount": 10 + i % 90,
                "currency": "EUR",
                "label": f"BENCH {i}",
                "settled_at": "2026-11-22T12:58:00Z",
                "updated_at": "2026-11-23T09:41:06Z",
                "attachment_ids": [str(uuid.uuid4())],
            },
        }
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(tag: str, **overrides: Any) -> config.Settings:
    base = os.environ.get("RELAY_DATABASE_URL", config.DEFAULTS["RELAY_DATABASE_URL"])
    values: dict[str, Any] = {
        "secret_key": config.Secret(crypto.generate_key()),
        "database_url": config.Secret(f"{base.rsplit('/', 1)[0]}/relay_bench_{tag}"),
        "amqp_url": config.Secret(
            os.environ.get("RELAY_AMQP_URL", config.DEFAULTS["RELAY_AMQP_URL"])
        ),
        "amqp_prefix": f"bench.{tag}",
        "log_level": "warning",
    }
    values.update(overrides)
    return config.Settings(**values)


def environment(settings: config.Settings) -> dict[str, str]:
    """The RELAY_* environment that makes a `relay` subprocess use these settings."""
    env = dict(os.environ)
    env.update(
        {
            "RELAY_SECRET_KEY": settings.secret_key.reveal(),
            "RELAY_DATABASE_URL": settings.database_url.reveal(),
            "RELAY_AMQP_URL": settings.amqp_url.reveal(),
            "RELAY_AMQP_PREFIX": settings.amqp_prefix,
            "RELAY_QONTO_API_URL": settings.qonto_api_url,
            "RELAY_QONTO_OAUTH_URL": settings.qonto_oauth_url,
            "RELAY_CEGID_API_URL": settings.cegid_api_url,
            "RELAY_HOST": settings.host,
            "RELAY_PORT": str(settings.port),
            "RELAY_WORKERS": str(settings.workers),
            "RELAY_UPLOAD_CONCURRENCY": str(settings.upload_concurrency),
            "RELAY_UPLOAD_CONCURRENCY_PER_FIRM": str(settings.upload_concurrency_per_firm),
            "RELAY_QONTO_REQUESTS_PER_10S": str(settings.qonto_requests_per_10s),
            "RELAY_LOG_LEVEL": settings.log_level,
        }
    )
    for name, secret in (
        ("RELAY_CEGID_SUBSCRIPTION_KEY", settings.cegid_subscription_key),
        ("RELAY_QONTO_STAGING_TOKEN", settings.qonto_staging_token),
    ):
        if secret is not None:
            env[name] = secret.reveal()
    return env


def relay_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", *args]


@contextlib.asynccontextmanager
async def environment_ready(settings: config.Settings) -> AsyncIterator[asyncpg.Pool]:
    """A migrated throwaway database and a declared topology, both removed afterwards."""
    await db.migrate(settings)
    try:
        async with amqp.connection(settings, name="bench") as conn:
            channel = await conn.channel()
            await amqp.declare(channel, settings)
            await channel.close()
        async with db.pool_for(settings) as pool:
            yield pool
    finally:
        with contextlib.suppress(Exception):
            async with amqp.connection(settings, name="bench-cleanup") as conn:
                await amqp.delete_topology(await conn.channel(), settings)
        with contextlib.suppress(Exception):
            await db.drop_database(settings)


async def insert_connection(
    pool: asyncpg.Pool,
    settings: config.Settings,
    *,
    qonto: credentials.QontoCredentials | None = None,
    cegid: credentials.CegidCredentials | None = None,
    dossier: str = "BENCH001",
    webhook_secret: str = WEBHOOK_SECRET,
) -> uuid.UUID:
    """A connection row as `relay connections add` stores it (without asking the upstreams)."""
    box = crypto.Box(settings.secret_key.reveal())
    qonto = qonto or credentials.QontoApiKey(login="bench", secret=config.Secret("bench-secret"))
    cegid = cegid or credentials.CegidCredentials(
        api_key=config.Secret("bench-key"), api_secret=config.Secret("bench-secret")
    )
    connection_id = uuid.uuid4()
    async with db.transaction(pool, "add connection") as conn:
        await store.connections.insert(
            conn,
            store.connections.NewConnection(
                id=connection_id,
                client_name="Bench",
                qonto_organization_id="bench-organization",
                qonto_auth_kind="api_key",
                qonto_credentials=credentials.seal_qonto(box, qonto),
                cegid_credentials=credentials.seal_cegid(box, cegid),
                cegid_key_fingerprint=crypto.fingerprint(cegid.api_key.reveal()),
                cegid_dossier=dossier,
                cegid_domain="BENCH",
                scan_since=dt.datetime.now(dt.UTC),
                dossier_checked_at=None,
            ),
        )
        await store.webhook_secrets.insert(
            conn, connection_id, box.seal(webhook_secret), None, ["v1/transactions"]
        )
    return connection_id


async def count_and_drain(
    settings: config.Settings, queue_name: str, *, idle_s: float = 1.0
) -> int:
    """How many events a queue holds, by consuming its messages (quorum queues' passive count
    lags); a batch of events counts each one."""
    count = messages_read = 0
    conn = await aio_pika.connect(settings.amqp_url.reveal())
    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.get_queue(queue_name, ensure=False)
        last = None
        async with queue.iterator() as messages:
            while True:
                try:
                    last = await asyncio.wait_for(messages.__anext__(), timeout=idle_s)
                except (TimeoutError, StopAsyncIteration):
                    break
                count += len(amqp.split(last.body, last.headers or {}, last.message_id))
                messages_read += 1
                if messages_read % 500 == 0:
                    await last.ack(multiple=True)
            if last is not None and messages_read % 500:
                await last.ack(multiple=True)
        await channel.close()
    return count


@dataclasses.dataclass
class Figure:
    name: str
    value: float
    unit: str
    ceiling: float | None = None
    ceiling_name: str | None = None
    target: str | None = None
    met: bool | None = None
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.value / self.ceiling if self.ceiling else None

    def line(self) -> str:
        text = f"{self.name:44} {self.value:12.1f} {self.unit}"
        if self.ceiling is not None:
            text += f"   ceiling ({self.ceiling_name}) {self.ceiling:.1f}   ratio {self.ratio:.2f}"
        if self.target is not None and self.met is None:
            text += f"   ({self.target})"
        elif self.target is not None:
            text += f"   target {self.target}: {'met' if self.met else 'MISSED'}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 3),
            "unit": self.unit,
            "ceiling": None if self.ceiling is None else round(self.ceiling, 3),
            "ceiling_name": self.ceiling_name,
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "target": self.target,
            "met": self.met,
            "detail": dict(self.detail),
        }


def start(command: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
