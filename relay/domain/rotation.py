"""Re-sealing of every stored secret under the first key of ``RELAY_SECRET_KEY``.

What ``relay secrets rotate`` does; :func:`rotate` says how a key rotation goes.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg

from relay import config, crypto, log, models, store
from relay.store import db

logger = log.get(__name__)

BATCH: Final = 200
_NIL = uuid.UUID(int=0)


@dataclasses.dataclass(slots=True)
class Rotated:
    """How many stored values were re-sealed, and how many already were under the first key."""

    resealed: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"connections": 0, "webhook_secrets": 0, "invitations": 0}
    )
    unchanged: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"resealed": dict(self.resealed), "already_under_first_key": self.unchanged}


def _reseal(box: crypto.Box, value: bytes | None, rotated: Rotated) -> tuple[bytes | None, bool]:
    if value is None:
        return None, False
    token = bytes(value)
    if box.sealed_by_first(token):
        rotated.unchanged += 1
        return token, False
    return box.reseal(token), True


async def rotate(settings: config.Settings, pool: asyncpg.Pool) -> Rotated:
    """Re-seal every stored secret under the first key of ``RELAY_SECRET_KEY``.

    Key rotation, in three moves: put the new key first in ``RELAY_SECRET_KEY`` everywhere, the
    old one after it (every process then seals with the new key and opens with both); run ``relay
    secrets rotate``; remove the old key. The rotation walks connections (Qonto and Loop
    credentials), webhook secrets and open invitations in batches, each row locked while it is
    re-sealed (a concurrent OAuth refresh waits for it, then writes under the first key too).
    Values already under the first key are left as they are.

    Raise ConfigurationError if a value cannot be opened with any key (nothing of that row
    changes; rows before it stay re-sealed).
    """
    box = crypto.Box(settings.secret_key.reveal())
    rotated = Rotated()
    await _walk(
        pool,
        box,
        rotated,
        "connections",
        store.connections.sealed_batch,
        store.connections.reseal,
    )
    await _walk(
        pool,
        box,
        rotated,
        "webhook_secrets",
        store.webhook_secrets.sealed_batch,
        store.webhook_secrets.reseal,
        first=0,
    )
    await _walk(
        pool,
        box,
        rotated,
        "invitations",
        store.invitations.sealed_batch,
        store.invitations.reseal,
    )
    logger.info("secrets_rotated", **rotated.resealed, unchanged=rotated.unchanged)
    return rotated


async def _walk(
    pool: asyncpg.Pool,
    box: crypto.Box,
    rotated: Rotated,
    kind: str,
    select: Callable[[db.Conn, Any, int], Awaitable[list[models.SealedValues]]],
    update: Callable[..., Awaitable[None]],
    *,
    first: Any = _NIL,
) -> None:
    after = first
    while True:
        async with db.transaction(pool, f"rotate {kind}") as conn:
            rows = await select(conn, after, BATCH)
            for row in rows:
                values = [_reseal(box, value, rotated) for value in row.values]
                if any(changed for _, changed in values):
                    await update(conn, row.id, *(v for v, _ in values))
                    rotated.resealed[kind] += 1
        if len(rows) < BATCH:
            return
        after = rows[-1].id
