"""The ``webhook_secrets`` table, the sealed secrets Qonto signs each connection's webhooks with."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

from relay import models
from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Subscription:
    """A secret's row without the secret."""

    id: int
    qonto_subscription_id: str | None
    topics: list[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class IntakeSecret:
    connection_id: uuid.UUID
    secret: bytes = dataclasses.field(repr=False)  # sealed


async def insert(
    conn: db.Executor,
    connection_id: uuid.UUID,
    sealed: bytes,
    subscription_id: str | None,
    topics: list[str],
) -> int:
    """Store a connection's webhook secret (sealed) and return its id."""
    with db.translate("add webhook secret"):
        return int(
            await conn.fetchval(
                queries.get("insert_webhook_secret"), connection_id, sealed, subscription_id, topics
            )
        )


async def subscriptions(conn: db.Executor, connection_id: uuid.UUID) -> list[Subscription]:
    """List a connection's webhook subscriptions (never their secrets)."""
    with db.translate("describe connection"):
        records = await conn.fetch(queries.get("list_webhook_secrets"), connection_id)
    return [
        Subscription(
            r["id"], r["qonto_subscription_id"], list(r["topics"]), r["created_at"], r["revoked_at"]
        )
        for r in records
    ]


async def intake_all(conn: db.Executor) -> list[IntakeSecret]:
    """Read the valid secrets of every connection that accepts webhooks."""
    with db.translate("load webhook secrets"):
        records = await conn.fetch(queries.get("intake_secrets_all"))
    return [IntakeSecret(r["connection_id"], bytes(r["secret"])) for r in records]


async def intake_one(conn: db.Executor, connection_id: uuid.UUID) -> list[IntakeSecret]:
    """Read one connection's valid secrets (none when it does not accept webhooks)."""
    with db.translate("look up connection"):
        records = await conn.fetch(queries.get("intake_secrets_one"), connection_id)
    return [IntakeSecret(r["connection_id"], bytes(r["secret"])) for r in records]


async def sealed_batch(conn: db.Executor, after: int, limit: int) -> list[models.SealedValues]:
    """Lock the next secrets after ``after`` and read them."""
    with db.translate("rotate webhook_secrets"):
        records = await conn.fetch(queries.get("rotation_webhook_secrets"), after, limit)
    return [models.SealedValues.from_record(r) for r in records]


async def reseal(conn: db.Executor, secret_id: int, sealed: bytes | None) -> None:
    """Store a re-sealed secret."""
    with db.translate("rotate webhook_secrets"):
        await conn.execute(queries.get("rotation_update_webhook_secret"), secret_id, sealed)
