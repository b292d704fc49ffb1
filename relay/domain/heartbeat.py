"""Heartbeats, by which every running role records who it is and what it last did.

Each role instance has a row, judged by :mod:`relay.domain.status`; a role runs in :func:`beating`::

    work = heartbeat.Work()
    async with heartbeat.beating(settings, "scheduler", work=work):
        ...  # work.add(n) whenever n units are done
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Literal, Protocol

import asyncpg

from relay import config, errors, log, store
from relay.store import db

logger = log.get(__name__)

RoleName = Literal["serve", "consume", "scheduler", "flush"]
ROLES: Final[tuple[RoleName, ...]] = ("serve", "consume", "scheduler", "flush")
UNITS: Final[dict[str, str]] = {
    "serve": "webhooks",  # accepted (202)
    "consume": "events",  # settled: applied, duplicate, ignored, retried or dead-lettered
    "scheduler": "documents",  # uploaded
    "flush": "documents",  # uploaded
}
KEEP_S: Final = 7 * 24 * 3600
PRUNE_EVERY_S: Final = 3600.0
STOP_TIMEOUT_S: Final = 3.0  # the last beat of a stopping role gets this long
# the ``heartbeat`` query's $1..$15
_PARAMS: Final = (
    "id",
    "role",
    "command",
    "host",
    "pid",
    "running_s",
    "interval_s",
    "work_unit",
    "work_done",
    "work_age_s",
    "subscribed",
    "in_hand",
    "oldest_held_ms",
    "waiting_s",
    "stop_reason",
)


@dataclasses.dataclass
class Work:
    """What a role has done for its heartbeat, in units, and when the last ones were done."""

    done: int = 0
    last_work_at: float | None = None  # time.time()

    def add(self, count: int = 1) -> None:
        self.done += count
        self.last_work_at = time.time()


class ConsumerProgress(Protocol):
    """What the consumer's loop keeps up to date (:class:`consumers.consume.Progress`)."""

    events: int
    last_work_at: float | None
    subscribed: bool
    in_hand: int
    oldest_held_ms: int | None


class Heartbeat:
    """One role's heartbeat row and the beats that rewrite it (see :func:`beating`).

    The row holds role, command, host, pid, start, last beat, the work done (webhooks accepted,
    events settled, documents uploaded) and when, and for the consumer what it holds.

    The heartbeat never disturbs its role: it has its own task and its own PostgreSQL connection,
    a beat that cannot be written (PostgreSQL down, slow) is dropped and the next one tries again,
    and every error stays inside it (logged once per outage). A clean stop writes a last beat
    marking the row stopped; a role that fails marks it stopped with the error's type. Rows whose
    last beat is older than ``KEEP_S`` (stopped, or dead without a word) are pruned by any role,
    at most once an hour.
    """

    def __init__(
        self,
        settings: config.Settings,
        role: RoleName,
        *,
        command: str | None = None,
        work: Work | None = None,
        consumer: ConsumerProgress | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prepare a new role instance's row.

        ``clock`` is the one ``Work`` and ``Progress`` use (``time.time``).
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.id = uuid.uuid4()
        self.role = role
        self.command = command or role
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.interval_s = float(interval_s or settings.heartbeat_interval_s)
        self._settings = settings
        self._work = work
        self._consumer = consumer
        self._clock = clock
        self._started = clock()
        self._conn: asyncpg.Connection | None = None
        self._failing = False
        self._pruned_at: float | None = None
        self._waiting_since: float | None = None
        self._events_seen = 0
        self._waiting_for: str | None = None
        self.beats = 0  # beats written

    def row(self, stop_reason: str | None = None) -> dict[str, Any]:
        """Build the beat to write now, ages in seconds (see the ``heartbeat`` query)."""
        now = self._clock()
        consumer = self._consumer
        value: dict[str, Any] = {
            "subscribed": None,
            "in_hand": None,
            "oldest_held_ms": None,
            "waiting_s": None,
        }
        if consumer is not None:
            done, last = consumer.events, consumer.last_work_at
            # Since when it holds messages (or, holding none, has no subscription) without settling
            # any: a batch settled since the previous beat, or the other kind of wait, starts the
            # count again.
            waiting_for = (
                "messages" if consumer.in_hand else None if consumer.subscribed else "subscription"
            )
            if waiting_for is None:
                self._waiting_since = None
            elif (
                self._waiting_since is None
                or done != self._events_seen
                or waiting_for != self._waiting_for
            ):
                self._waiting_since = now
            self._events_seen, self._waiting_for = done, waiting_for
            value = {
                "subscribed": consumer.subscribed,
                "in_hand": consumer.in_hand,
                "oldest_held_ms": consumer.oldest_held_ms,
                "waiting_s": None
                if self._waiting_since is None
                else max(0.0, now - self._waiting_since),
            }
        elif self._work is not None:
            done, last = self._work.done, self._work.last_work_at
        else:
            done, last = 0, None
        return {
            "id": self.id,
            "role": self.role,
            "command": self.command,
            "host": self.host,
            "pid": self.pid,
            "running_s": max(0.0, now - self._started),
            "interval_s": self.interval_s,
            "work_unit": UNITS[self.role],
            "work_done": done,
            "work_age_s": None if last is None else max(0.0, now - last),
            **value,
            "stop_reason": stop_reason,
        }

    async def beat(self, *, stop_reason: str | None = None, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - a beat is bounded by the interval, not by its caller
        """Write one beat, returning False when that failed (logged once per outage)."""
        row = self.row(stop_reason)
        beat = store.heartbeats.Beat(**{name: row[name] for name in _PARAMS})
        try:
            await asyncio.wait_for(self._write(beat), timeout=timeout or self.interval_s)
        except asyncio.CancelledError:
            self._drop_connection()  # cancelled mid-statement: the connection cannot be reused
            raise
        except Exception as exc:  # a heartbeat never disturbs its role
            self._drop_connection()
            if not self._failing:
                self._failing = True
                logger.warning(
                    "heartbeat_failed",
                    role=self.role,
                    error=type(exc).__name__,
                    reason=str(exc) if isinstance(exc, errors.RelayError) else None,
                )
            return False
        if self._failing:
            self._failing = False
            logger.info("heartbeat_restored", role=self.role)
        self.beats += 1
        return True

    async def _write(self, beat: store.heartbeats.Beat) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await db.connect(self._settings)
        await store.heartbeats.beat(self._conn, beat)
        now = time.monotonic()
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY_S:
            await store.heartbeats.prune(self._conn, float(KEEP_S))
            self._pruned_at = now

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()
            self._conn = None

    async def run(self) -> None:
        """Beat now, then every ``interval_s`` (a late beat does not delay the next ones)."""
        due = time.monotonic()
        while True:
            await self.beat()
            due += self.interval_s
            now = time.monotonic()
            if due < now:  # the beat took longer than the interval: skip the missed ones
                due = now + self.interval_s
            await asyncio.sleep(due - now)

    async def stop(self, reason: str) -> None:
        """Write the last beat, which says the role stopped, and why."""
        if not await self.beat(stop_reason=reason, timeout=STOP_TIMEOUT_S):
            logger.warning("heartbeat_stop_not_recorded", role=self.role, stop_reason=reason)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=STOP_TIMEOUT_S)


def stop_reason(exc: BaseException | None) -> str:
    """Say how a role ended, for its row (stopped, cancelled, or failed with the error's type)."""
    if exc is None or isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
        return "stopped"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"failed ({type(exc).__name__})"


@contextlib.asynccontextmanager
async def beating(
    settings: config.Settings,
    role: RoleName,
    *,
    command: str | None = None,
    work: Work | None = None,
    consumer: ConsumerProgress | None = None,
    interval_s: float | None = None,
) -> AsyncIterator[Heartbeat]:
    """Beat for ``role`` while the block runs, and mark the row stopped when it ends.

    ``work`` (serve, scheduler, flush) or ``consumer`` (consume) is read at each beat. ``command``
    is the relay command running the role when it differs from the role (``run``).
    """
    heart = Heartbeat(
        settings, role, command=command, work=work, consumer=consumer, interval_s=interval_s
    )
    task = asyncio.create_task(heart.run(), name=f"heartbeat-{role}")
    ended: BaseException | None = None
    try:
        yield heart
    except BaseException as exc:
        ended = exc
        raise
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await heart.stop(stop_reason(ended))
