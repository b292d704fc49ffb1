"""Recovery of the documents a flush worker left ``uploading``, settled by the ledger's one rule.

Such a document becomes ``in_doubt`` if its attempt row exists (the request may have gone out) and
``pending`` if not (it provably never left). :func:`recover` settles what dead workers left before
each run, :func:`settle_own` what this worker still holds after an error; :class:`Lease` says who
is alive.
"""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import Sequence
from typing import Final

import asyncpg

from relay import errors, log, models, store
from relay.domain import report
from relay.store import db

logger = log.get(__name__)

WORKER_LOCK_SPACE: Final = 0x52454C59  # advisory lock namespace of flush workers ("RELY")
IN_DOUBT_REASON: Final = (
    "sent to Cegid Loop but no answer came back ({detail}): check the client's Loop inbox, then "
    "`relay documents resolve {id} --uploaded` or `--resend`"
)
DIED_REASON: Final = "the flush worker stopped during the upload"
DIED_UNSENT: Final = models.Why(
    models.Reason.FLUSH_STOPPED, "the previous flush stopped before sending it"
)
ERROR_SENT_REASON: Final = "an error stopped the flush before the outcome was recorded"
ERROR_UNSENT: Final = models.Why(
    models.Reason.FLUSH_ERROR, "an error stopped the flush before sending it, retried next run"
)


async def _settle(
    conn: db.Conn, worker: int, *, sent: str, unsent: models.Why
) -> list[tuple[uuid.UUID, models.DocumentState, models.Why]]:
    """Settle the documents ``worker`` left uploading, in the caller's transaction.

    Each becomes in doubt when an attempt may have gone out (``sent`` says why), pending with
    reason ``unsent`` when provably not. Returns (connection, state, reason) for each.
    """
    held = {o.id: o.connection_id for o in await store.documents.orphaned(conn, worker)}
    if not held:
        return []
    attempts = await store.uploads.orphaned_attempts(conn, list(held))
    settled = []
    for document_id, connection_id in held.items():
        upload_id = attempts.get(document_id)
        if upload_id is not None:
            state = models.DocumentState.IN_DOUBT
            why = models.Why(
                models.Reason.IN_DOUBT, IN_DOUBT_REASON.format(detail=sent, id=document_id)
            )
            await store.uploads.finish(conn, upload_id, "in_doubt", None, None, sent)
        else:
            state, why = models.DocumentState.PENDING, unsent
        await store.documents.finish(conn, document_id, state, why, worker)
        settled.append((connection_id, state, why))
    return settled


async def recover(pool: asyncpg.Pool) -> dict[str, int]:
    """Settle documents left ``uploading`` by workers that died (their advisory lock is free).

    A recovery settles a document under the row lock the worker takes to record an attempt, so a
    worker taken for dead cannot send a document someone else recovered.
    """
    result = {"in_doubt": 0, "pending": 0}
    for worker in await store.documents.uploading_workers(pool):
        async with db.connection(pool, "recover") as conn:
            if not await store.server.try_worker_lock(conn, WORKER_LOCK_SPACE, worker):
                continue  # alive
            try:
                async with conn.transaction():
                    for _, state, _ in await _settle(
                        conn, worker, sent=DIED_REASON, unsent=DIED_UNSENT
                    ):
                        result[str(state)] += 1
            finally:
                await store.server.worker_unlock(conn, WORKER_LOCK_SPACE, worker)
    if any(result.values()):
        logger.warning("flush_recovered", **result)
    return result


async def settle_own(
    pool: asyncpg.Pool, worker: int, reports: Sequence[report.ConnectionReport]
) -> None:
    """Settle at the end of a run what this worker still holds, and count it into the report.

    What it holds are documents whose processing hit an error; they are settled in one
    transaction. DatabaseUnavailable when the database is gone: the caller waits for it, or
    leaves it to the next run's recovery.
    """
    async with db.transaction(pool, "settle") as conn:
        settled = await _settle(conn, worker, sent=ERROR_SENT_REASON, unsent=ERROR_UNSENT)
    by_connection = {r.connection_id: r for r in reports}
    for connection_id, state, why in settled:
        found = by_connection.get(connection_id)
        if found is None:
            continue
        if state == models.DocumentState.IN_DOUBT:
            found.in_doubt += 1
        else:
            found.pending[report.group(why.code, why.detail)] += 1


class Lease:
    """This worker's id and the advisory lock that says it is alive, held for the whole run.

    The lock is in ``WORKER_LOCK_SPACE``, held by a connection of its own: a worker is dead when
    its lock is free. A PostgreSQL restart or a terminated backend frees the lock: another flush
    may then take this worker for dead, so :meth:`keep` re-takes it as soon as it can (the
    documents a recovery settled meanwhile are not this worker's any more: its writes to them do
    not land).
    """

    def __init__(self, pool: asyncpg.Pool, worker: int, conn: asyncpg.pool.PoolConnectionProxy):
        self._pool = pool
        self.worker = worker
        self._conn: asyncpg.pool.PoolConnectionProxy | None = conn

    @classmethod
    async def take(cls, pool: asyncpg.Pool) -> Lease:
        """Take a new worker id whose lock this process holds."""
        conn = await db.acquire(pool, "worker lease")
        try:
            while True:
                worker = secrets.randbelow(2**31 - 1) + 1
                if await store.server.try_worker_lock(conn, WORKER_LOCK_SPACE, worker):
                    return cls(pool, worker, conn)
        except BaseException:
            await pool.release(conn)
            raise

    @property
    def lost(self) -> bool:
        """Whether the connection holding the lock is known to be gone (no round trip)."""
        return not _alive(self._conn)

    async def keep(self) -> None:
        """Make sure the lock is held, re-taking it on a new connection if need be.

        On a live connection that holds it, there is nothing to do. DatabaseUnavailable when it
        cannot be held now (the database is gone, or a recovery holds it for a moment while it
        settles this worker).
        """
        if _alive(self._conn):
            assert self._conn is not None
            held = False
            with contextlib.suppress(errors.DatabaseUnavailable):
                held = await store.server.worker_lock_held(
                    self._conn, WORKER_LOCK_SPACE, self.worker, timeout=5
                )
            if held:
                return
        await self._drop()
        conn = await db.acquire(self._pool, "worker lease")
        try:
            taken = await store.server.try_worker_lock(conn, WORKER_LOCK_SPACE, self.worker)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)
            raise
        if not taken:
            await db.release(self._pool, conn, "worker lease")
            raise errors.DatabaseUnavailable(
                f"worker {self.worker}: its lock is held by a recovery, retried"
            )
        self._conn = conn
        logger.warning("flush_lease_retaken", worker=self.worker)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    async def release(self) -> None:
        """Give the lock up (the run is over)."""
        if self._conn is not None and _alive(self._conn):
            with contextlib.suppress(Exception):
                await store.server.worker_unlock(self._conn, WORKER_LOCK_SPACE, self.worker)
        await self._drop()


def _alive(conn: asyncpg.pool.PoolConnectionProxy | None) -> bool:
    """Tell whether a connection is not known to be closed.

    A closed pool connection's proxy is detached, and says nothing.
    """
    if conn is None:
        return False
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
