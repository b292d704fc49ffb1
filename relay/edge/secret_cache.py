"""Each worker's cache of the webhook secrets, so that a webhook costs no database query.

Read :class:`SecretCache`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from typing import Final

import asyncpg

from relay import config, crypto, errors, log, retry, store
from relay.store import db

logger = log.get(__name__)

UNKNOWN_TTL_S: Final = 30.0
UNKNOWN_MAX: Final = 10_000
UNKNOWN_LOOKUPS_PER_S: Final = 10.0  # per worker, only while the cache's LISTEN is lost
RELOAD_WAIT_S: Final = 5.0  # how long a miss waits for a reload a NOTIFY asked for
REFRESH_S: Final = 60.0
# pauses between attempts to listen again after a lost LISTEN: from 1 s, never longer than 5 s
RELISTEN: Final = retry.Policy(first_s=1.0, cap_s=5.0, floor=0.5)
CHANNEL: Final = "relay_connections_changed"


class SecretCache:
    """Connection id → its currently valid webhook secrets (plaintext, in memory only).

    Loaded at start and refreshed on PostgreSQL ``NOTIFY relay_connections_changed`` (and every
    minute as a safety net), so a known connection's webhook never queries the database; while the
    cache listens, an unknown id costs no query either (the cache holds every connection that
    accepts webhooks). Only while its LISTEN is lost does an unknown id cost a lookup, at most
    ``UNKNOWN_LOOKUPS_PER_S`` per worker (503 beyond, and Qonto retries).
    """

    def __init__(self, settings: config.Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._box = crypto.Box(settings.secret_key.reveal())
        self._known: dict[uuid.UUID, tuple[str, ...]] = {}
        self._unknown: OrderedDict[uuid.UUID, float] = OrderedDict()
        self._pending: dict[uuid.UUID, asyncio.Future[tuple[str, ...]]] = {}
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._reloaded = asyncio.Event()  # clear while a NOTIFY's reload is pending
        self._reloaded.set()
        self._tokens = UNKNOWN_LOOKUPS_PER_S
        self._tokens_at = time.monotonic()
        self.lookups = 0  # single-id lookups in PostgreSQL (unknown ids)
        self.reloads = 0  # full reloads
        self.listens = 0  # LISTEN connections opened

    async def start(self) -> None:
        """Listen first, then load, so that a change committed in between is not missed."""
        await self._listen()
        await self.reload()
        self._tasks.append(asyncio.create_task(self._refresher(), name="secret-cache-refresh"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def reload(self) -> None:
        known: dict[uuid.UUID, list[str]] = {}
        for row in await store.webhook_secrets.intake_all(self._pool):
            known.setdefault(row.connection_id, []).append(self._box.open(row.secret))
        self._known = {k: tuple(v) for k, v in known.items()}
        self._unknown.clear()
        self.reloads += 1

    async def _listen(self) -> None:
        try:
            self._listener = await db.listen(self._settings, CHANNEL, self._notified, self._lost)
        except errors.DatabaseUnavailable:
            self._listener = None
            logger.warning("secret_cache_listen_failed")
            return
        self.listens += 1

    def _notified(self, *_: object) -> None:
        self._reloaded.clear()
        self._changed.set()

    def _lost(self, *_: object) -> None:
        self._listener = None
        self._changed.set()

    @property
    def complete(self) -> bool:
        """Whether the cache holds every connection that accepts webhooks.

        It does while it listens and no change it was told of is still to be loaded.
        """
        return self._listener is not None and self._reloaded.is_set()

    async def _refresher(self) -> None:
        """Reload on NOTIFY or every minute, and re-listen with backoff while the listener is lost.

        Whatever fails, the last known cache keeps serving.
        """
        backoff = retry.Backoff(RELISTEN)
        pause = RELISTEN.first_s
        while True:
            timeout = REFRESH_S if self._listener is not None else pause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=timeout)
            self._changed.clear()
            try:
                if self._listener is None:
                    await self._listen()
                await self.reload()
                self._reloaded.set()
            except Exception as exc:  # the cache must outlive any failure
                pause = backoff.next()
                logger.warning(
                    "secret_cache_reload_failed",
                    error=type(exc).__name__,
                    retry_in_s=round(pause, 2),
                )
                await asyncio.sleep(pause)
                self._changed.set()
            else:
                if self._listener is not None:
                    backoff.reset()
                else:  # still no listener: the next attempt waits longer (reloads keep the cache fresh)
                    pause = backoff.next()

    def at_once(self, connection_id: uuid.UUID) -> tuple[str, ...] | None:
        """Return the connection's secrets if the cache can tell without waiting, else None.

        Empty when the connection surely has none; None when only :meth:`secrets_for` can tell.
        """
        found = self._known.get(connection_id)
        if found is not None:
            return found
        if self.complete:
            return ()
        until = self._unknown.get(connection_id)
        return () if until is not None and until > time.monotonic() else None

    async def secrets_for(self, connection_id: uuid.UUID) -> tuple[str, ...]:
        """Return the connection's secrets, empty when it is unknown, disconnected or revoked.

        Raises ``errors.DatabaseUnavailable`` when the cache cannot tell (its LISTEN is lost and
        the lookups' rate is spent, or PostgreSQL does not answer).
        """
        found = self._known.get(connection_id)
        if found is not None:
            return found
        if self._listener is not None and not self._reloaded.is_set():
            # a change was notified and is being loaded: this id may be the new one
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reloaded.wait(), timeout=RELOAD_WAIT_S)
        told = self.at_once(connection_id)
        if told is not None:
            return told
        # Concurrent requests for the same unknown id share one lookup.
        pending = self._pending.get(connection_id)
        if pending is None:
            if not self._spend_token(time.monotonic()):
                raise errors.DatabaseUnavailable(
                    "connection lookups rate-limited while not listening"
                )
            pending = asyncio.ensure_future(self._look_up(connection_id))
            self._pending[connection_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(connection_id, None))
        return await asyncio.shield(pending)

    def _spend_token(self, now: float) -> bool:
        self._tokens = min(
            UNKNOWN_LOOKUPS_PER_S, self._tokens + (now - self._tokens_at) * UNKNOWN_LOOKUPS_PER_S
        )
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _look_up(self, connection_id: uuid.UUID) -> tuple[str, ...]:
        self.lookups += 1
        rows = await store.webhook_secrets.intake_one(self._pool, connection_id)
        if rows:
            value = tuple(self._box.open(row.secret) for row in rows)
            self._known[connection_id] = value
            return value
        self._unknown[connection_id] = time.monotonic() + UNKNOWN_TTL_S
        self._unknown.move_to_end(connection_id)
        while len(self._unknown) > UNKNOWN_MAX:
            self._unknown.popitem(last=False)
        return ()
