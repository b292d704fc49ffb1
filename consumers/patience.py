"""A guard that makes a flush's writes wait out PostgreSQL outages instead of dropping them.

The ledger's writes are what make a deposit safe, so a flush that loses PostgreSQL does not drop
them: every write of the flush goes through :meth:`Guard.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import asyncpg

from relay import errors, log, retry
from relay.store import db

logger = log.get(__name__)

T = TypeVar("T")

# PostgreSQL probed after a loss: soon at first (a restart is back within a second or two)
PROBES: Final = retry.Policy(first_s=0.1, cap_s=2.0, floor=0.5)
OPERATION_TRIES: Final = 10


class Guard:
    """One flush's view of PostgreSQL, which is up, lost since a moment, or given up on.

    An operation handed to :meth:`run` that finds the database gone
    (:class:`errors.DatabaseUnavailable`) waits until it answers again, then runs once more. One
    watcher probes PostgreSQL with capped backoff; when it answers, ``on_back`` runs first (the
    flush re-takes its worker lease, which a restart or a terminated backend frees), then every
    waiting operation goes on. While the database is gone nothing new starts that needs it
    (claims, attempt rows), and what needs no database (a deposit already out, a download)
    finishes.

    Past ``limit_s`` (``RELAY_OUTAGE_LIMIT``) from the loss the watcher gives up: every waiting
    operation, and every later one, raises :class:`errors.OutageTooLong`, and the flush stops
    saying what it leaves.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        limit_s: float,
        *,
        on_back: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self.limit_s = limit_s
        self._on_back = on_back
        self._up = asyncio.Event()
        self._up.set()
        self._epoch = 0  # outages seen so far: a failure from before the last one is not news
        self._lost_at: float | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.gave_up: errors.OutageTooLong | None = None
        self.outages: list[float] = []  # the duration of each outage ridden out, in seconds

    @property
    def down(self) -> bool:
        return not self._up.is_set() or self.gave_up is not None

    async def wait_up(self) -> None:
        """Return once PostgreSQL answers (at once when it does), raising when given up on."""
        await self._up.wait()
        if self.gave_up is not None:
            raise self.gave_up

    async def run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation()``, and again after each outage, until it goes through.

        Only operations that may run twice are handed over: one transaction, or statements whose
        second run changes nothing (the claim, whose answer can be lost after its commit, adopts on
        its next run what it had claimed: see :mod:`consumers.flusher`). An operation that keeps
        failing while the database answers (a statement timing out every time) is given up after
        ``OPERATION_TRIES`` runs.
        """
        tries = 0
        while True:
            await self.wait_up()
            epoch = self._epoch
            try:
                return await operation()
            except errors.OutageTooLong:
                raise
            except errors.DatabaseUnavailable as exc:
                tries += 1
                if tries >= OPERATION_TRIES:
                    raise
                await self._lost(what, exc, epoch)

    async def _lost(self, what: str, exc: errors.DatabaseUnavailable, epoch: int) -> None:
        if epoch != self._epoch or not self._up.is_set():
            return  # known already, or a connection from before the last outage: run it again
        self._epoch += 1
        self._up.clear()
        self._lost_at = time.monotonic()
        logger.warning("flush_database_lost", during=what, reason=str(exc), limit_s=self.limit_s)
        with contextlib.suppress(Exception):
            await self._pool.expire_connections()  # every idle connection is dead: open new ones
        self._watcher = asyncio.create_task(self._watch(), name="flush-database-watch")

    async def _watch(self) -> None:
        lost_at = self._lost_at
        assert lost_at is not None
        tries = PROBES.tries(deadline=lost_at + self.limit_s)
        reason = ""
        while True:
            delay = tries.again()
            if delay is None:
                self.gave_up = errors.OutageTooLong(
                    f"PostgreSQL unavailable for more than {self.limit_s:g} s (RELAY_OUTAGE_LIMIT)"
                )
                logger.error("flush_database_gone", limit_s=self.limit_s, reason=reason)
                self._up.set()  # the waiting operations raise gave_up
                return
            await asyncio.sleep(delay)
            try:
                await db.ping(self._pool)
                if self._on_back is not None:
                    await self._on_back()
            except errors.DatabaseUnavailable as exc:
                reason = str(exc)
                continue
            except Exception as exc:  # a bug must not leave every operation waiting forever
                reason = f"{type(exc).__name__}: {exc}"
                logger.error("flush_database_back_failed", reason=reason, exc_info=True)
                continue
            break
        down_s = time.monotonic() - lost_at
        self.outages.append(down_s)
        self._lost_at = None
        self._up.set()
        logger.warning("flush_database_back", down_s=round(down_s, 2))

    async def close(self) -> None:
        """Stop the watcher (the flush is over)."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher


async def run(guard: Guard | None, what: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Run ``operation`` through ``guard`` when there is one (a flush), else once (a lone scan)."""
    if guard is None:
        return await operation()
    return await guard.run(what, operation)
