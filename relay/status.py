"""`relay status`: every role's heartbeat judged, the queues' depths, and what is stalled.

The rows of ``heartbeats`` (:mod:`relay.heartbeat`) and a passive declare of each queue are judged by
:func:`judge`, a pure function of them. A role is

- ``stopped`` when its row says so (a clean stop, or a role that failed and left);
- ``gone`` when it is not stopped and known dead: no heartbeat for ``GONE_AFTER_S``; or, on the host
  running the check, no process with its pid; or a later process with the same host and pid (a
  restarted container) started after its last beat;
- ``stalled`` when it is not stopped and its heartbeat is more than ``STALE_BEATS`` beats old (hung,
  or dead in a way that cannot be told yet); or a consumer that has held messages, or had no
  subscription while messages wait, without settling any for ``stall_after_s``; or a live consumer
  while messages are ready and no live consumer holds any;
- ``ok`` otherwise.

The events queue is ``stalled`` when messages are ready and no live consumer holds any: the age of
its oldest message is then unknown, and the output says so. Otherwise its oldest message is the
oldest one a live consumer holds (a quorum queue delivers in order), as of that consumer's last beat.
A message seen ready at one instant may be delivered the next, and a consumer's row is up to a beat
old, so :func:`check` looks again for up to a beat before calling the queue stalled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import aio_pika.abc
import asyncpg

from relay import amqp, config, console, db, errors, models, queries

STALE_BEATS: Final = 3  # a heartbeat older than this many beats is stale
GONE_AFTER_S: Final = 600.0  # a role silent this long is taken for dead
SHOWN_FOR_S: Final = 3600.0  # stopped and gone roles are listed this long after their last beat
CONFIRM_POLL_S: Final = 0.25

OK, STALLED, STOPPED, GONE, UNKNOWN = "ok", "stalled", "stopped", "gone", "unknown"

Source = asyncpg.Pool | db.Conn


@dataclasses.dataclass(frozen=True, slots=True)
class Role:
    """One role's heartbeat row, with its ages in seconds on the database's clock."""

    id: uuid.UUID
    role: str
    command: str
    host: str
    pid: int
    started_at: dt.datetime
    beat_at: dt.datetime
    beat_age_s: float
    interval_s: float
    stopped_at: dt.datetime | None = None
    stop_reason: str | None = None
    work_unit: str = "events"
    work_done: int = 0
    last_work_at: dt.datetime | None = None
    work_age_s: float | None = None
    subscribed: bool | None = None
    in_hand: int | None = None
    oldest_held_at: dt.datetime | None = None
    oldest_held_age_s: float | None = None
    waiting_s: float | None = None

    @classmethod
    def from_record(cls, record: models.Row) -> Role:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})

    @property
    def label(self) -> str:
        inside = f", in relay {self.command}" if self.command != self.role else ""
        return f"{self.role} on {self.host} (pid {self.pid}{inside})"

    @property
    def stale(self) -> bool:
        return self.beat_age_s > STALE_BEATS * self.interval_s

    @property
    def live(self) -> bool:
        """Not stopped, and beating."""
        return self.stopped_at is None and not self.stale


@dataclasses.dataclass(frozen=True, slots=True)
class Queues:
    events: amqp.Depth
    retry: tuple[amqp.Depth, ...]
    dead_letter: amqp.Depth


@dataclasses.dataclass(frozen=True, slots=True)
class Judged:
    role: Role
    state: str
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        row = self.role
        value: dict[str, Any] = {
            "id": str(row.id),
            "role": row.role,
            "command": row.command,
            "host": row.host,
            "pid": row.pid,
            "since": row.started_at.isoformat(),
            "last_heartbeat": row.beat_at.isoformat(),
            "heartbeat_age_s": _round(row.beat_age_s),
            "heartbeat_interval_s": row.interval_s,
            "state": self.state,
            "reason": self.reason,
            "stopped_at": row.stopped_at.isoformat() if row.stopped_at else None,
            "work": {
                "unit": row.work_unit,
                "done": row.work_done,
                "last_at": row.last_work_at.isoformat() if row.last_work_at else None,
                "age_s": _round(row.work_age_s),
            },
        }
        if row.role == "consume":
            value["consumer"] = {
                "subscribed": row.subscribed,
                "in_hand": row.in_hand,
                "oldest_held_at": row.oldest_held_at.isoformat() if row.oldest_held_at else None,
                "oldest_held_age_s": _round(row.oldest_held_age_s),
                "waiting_s": _round(row.waiting_s),
            }
        return value


@dataclasses.dataclass(frozen=True, slots=True)
class Events:
    """The events queue judged: its state, and its oldest waiting message when it can be known."""

    state: str  # ok, stalled, unknown (RabbitMQ not read, or the queue missing)
    reason: str | None
    in_hand: int  # held by live consumers (delivered, not settled)
    oldest_age_s: float | None
    oldest: str  # "held" (age known), "none waiting", "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    checked_at: dt.datetime
    roles: tuple[Judged, ...]
    queues: Queues | None
    queues_error: str | None
    events: Events
    # stalled by an instant's view (ready messages nobody holds): worth a second look
    suspect: bool = False

    def matching(self, role: str | None = None, host: str | None = None) -> list[Judged]:
        return [
            j
            for j in self.roles
            if (role is None or j.role.role == role) and (host is None or j.role.host == host)
        ]

    def outcome(self, role: str | None = None, host: str | None = None) -> tuple[str, int]:
        """("ok" | "stalled" | "unknown" | "missing", exit code).

        Without a filter: 1 when any role or the events queue is stalled, or the queues could not
        be read. With one (a health check): 0 only when a live, non-stalled role matches and no
        matching role is stalled ("missing" when none is live).
        """
        if role is None and host is None:
            if any(j.state == STALLED for j in self.roles) or self.events.state == STALLED:
                return STALLED, console.EXIT_FAILED
            if self.events.state == UNKNOWN:
                return UNKNOWN, console.EXIT_FAILED
            return OK, console.EXIT_OK
        chosen = self.matching(role, host)
        if any(j.state == STALLED for j in chosen):
            return STALLED, console.EXIT_FAILED
        if not any(j.state == OK for j in chosen):
            return "missing", console.EXIT_FAILED
        return OK, console.EXIT_OK

    def problems(self, role: str | None = None, host: str | None = None) -> list[str]:
        found = [
            f"{j.role.label}: {j.reason}" for j in self.matching(role, host) if j.state == STALLED
        ]
        if role is None and host is None and self.events.state in (STALLED, UNKNOWN):
            found.append(f"events queue: {self.events.reason}")
        if (role is not None or host is not None) and not any(
            j.state == OK for j in self.matching(role, host)
        ):
            found.append(f"no live {role or 'role'}{' on ' + host if host else ''}")
        return found

    def stalled(self, role: str | None = None, host: str | None = None) -> int:
        """Stalled roles (matching the filter), and the events queue when unfiltered."""
        queue = role is None and host is None and self.events.state == STALLED
        return sum(j.state == STALLED for j in self.matching(role, host)) + int(queue)

    def to_json(self, role: str | None = None, host: str | None = None) -> dict[str, Any]:
        state, code = self.outcome(role, host)
        chosen = self.matching(role, host)
        return {
            "status": state,
            "exit_code": code,
            "checked_at": self.checked_at.isoformat(),
            "filter": {"role": role, "host": host},
            "stalled": self.stalled(role, host),
            "roles": [j.to_json() for j in chosen],
            "queues": self._queues_json(),
            "problems": self.problems(role, host),
        }

    def _queues_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {"error": self.queues_error}
        if self.queues is None:
            return {**value, "events": None, "retry": [], "dead_letter": None}
        events = self.queues.events
        return {
            **value,
            "events": {
                "name": events.name,
                "exists": events.ready is not None,
                "ready": events.ready,
                "consumers": events.consumers,
                "in_hand": self.events.in_hand,
                "oldest_age_s": _round(self.events.oldest_age_s),
                "oldest": self.events.oldest,
                "state": self.events.state,
                "reason": self.events.reason,
            },
            "retry": [_depth_json(d) for d in self.queues.retry],
            "dead_letter": _depth_json(self.queues.dead_letter),
        }

    def render(self, role: str | None = None, host: str | None = None) -> str:
        """The readable form: the roles' table, the queues, the problems."""
        state, _ = self.outcome(role, host)
        chosen = self.matching(role, host)
        lines = [f"status: {state} (checked {self.checked_at.isoformat(timespec='seconds')})", ""]
        if chosen:
            lines.append(
                console.table(
                    [_row(j) for j in chosen],
                    ["ROLE", "HOST", "PID", "SINCE", "HEARTBEAT", "LAST WORK", "STATE"],
                )
            )
        else:
            lines.append("no role has reported a heartbeat in the last hour")
        lines.append("")
        lines.extend(self._render_queues())
        problems = self.problems(role, host)
        if problems:
            lines += ["", "problems:", *(f"  - {p}" for p in problems)]
        return "\n".join(lines)

    def _render_queues(self) -> list[str]:
        if self.queues is None:
            return [f"queues: unknown ({self.queues_error})"]
        events, ev = self.queues.events, self.events
        if events.ready is None:
            head = f"{events.name}: does not exist"
        else:
            oldest = {
                "held": f"oldest waiting {_ago(ev.oldest_age_s)}",
                "none waiting": "nothing waiting",
                "unknown": "oldest waiting: unknown (no live consumer holds a message)",
            }[ev.oldest]
            head = (
                f"{events.name}: {events.ready} ready, {ev.in_hand} in hand, "
                f"{events.consumers} consumer(s); {oldest}"
            )
        retry = ", ".join(
            f"{d.name.rsplit('.', 1)[-1]} {'-' if d.ready is None else d.ready}"
            for d in self.queues.retry
        )
        dlq = self.queues.dead_letter
        dead = "-" if dlq.ready is None else str(dlq.ready)
        return [
            f"queue {head}",
            f"retry queues: {retry}",
            f"dead letters ({dlq.name}): {dead}" + (" (see relay dlq list)" if dlq.ready else ""),
        ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _row(judged: Judged) -> list[Any]:
    row = judged.role
    work = f"{row.work_done} {row.work_unit}"
    if row.work_age_s is not None:
        work += f", last {_ago(row.work_age_s)}"
    if row.role == "consume" and row.in_hand:
        work += f"; {row.in_hand} in hand"
    role = row.role if row.command == row.role else f"{row.role} (run)"
    state = judged.state if judged.reason is None else f"{judged.state}: {judged.reason}"
    return [
        role,
        row.host,
        row.pid,
        row.started_at.isoformat(timespec="seconds"),
        _ago(row.beat_age_s),
        work,
        state,
    ]


def _depth_json(depth: amqp.Depth) -> dict[str, Any]:
    return {"name": depth.name, "exists": depth.ready is not None, "ready": depth.ready}


# ------------------------------------------------------------------------------------ the rules


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (any user's)."""
    if pid <= 0:
        return True  # not a process id: no conclusion
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _role_state(
    row: Role,
    rows: Sequence[Role],
    ready: int | None,
    *,
    stall_after_s: float,
    this_host: str,
    alive: Callable[[int], bool],
) -> tuple[str, str | None]:
    if row.stopped_at is not None:
        return STOPPED, row.stop_reason
    if row.stale:
        silent = f"no heartbeat for {row.beat_age_s:.0f} s"
        if row.beat_age_s >= GONE_AFTER_S:
            return GONE, silent
        if row.host == this_host and not alive(row.pid):
            return GONE, f"{silent}; process {row.pid} no longer exists on this host"
        if any(
            other.id != row.id
            and other.host == row.host
            and other.pid == row.pid
            and other.started_at > row.beat_at
            for other in rows
        ):
            return GONE, f"{silent}; process {row.pid} of {row.host} was started again since"
        return STALLED, f"{silent} (one expected every {row.interval_s:g} s): hung, or dead"
    if row.role == "consume" and row.waiting_s is not None and row.waiting_s >= stall_after_s:
        if row.in_hand:
            return (
                STALLED,
                f"holds {row.in_hand} message(s) and has settled none for {row.waiting_s:.0f} s",
            )
        if not row.subscribed and ready:
            return (
                STALLED,
                f"not subscribed to the events queue for {row.waiting_s:.0f} s while "
                f"{ready} message(s) wait",
            )
    return OK, None


def judge(
    rows: Sequence[Role],
    queues: Queues | None,
    *,
    checked_at: dt.datetime,
    stall_after_s: float,
    this_host: str,
    alive: Callable[[int], bool] = pid_alive,
    queues_error: str | None = None,
) -> Report:
    """Each role's state and the events queue's, from the rows and the queues' depths."""
    ready = None if queues is None else queues.events.ready
    judged = [
        Judged(
            row,
            *_role_state(
                row, rows, ready, stall_after_s=stall_after_s, this_host=this_host, alive=alive
            ),
        )
        for row in rows
    ]
    consumers = [r for r in rows if r.role == "consume" and r.live]
    silent = [
        j.role for j in judged if j.role.role == "consume" and j.state == STALLED and j.role.stale
    ]
    holders = [r for r in consumers if r.in_hand]
    in_hand = sum(r.in_hand or 0 for r in consumers)
    suspect = False
    if queues is None:
        events = Events(
            UNKNOWN, f"RabbitMQ could not be read ({queues_error})", in_hand, None, UNKNOWN
        )
    elif queues.events.ready is None:
        events = Events(
            UNKNOWN,
            f"{queues.events.name} does not exist (no role declared it: RELAY_AMQP_PREFIX?)",
            in_hand,
            None,
            UNKNOWN,
        )
    elif holders:
        ages = [r.oldest_held_age_s for r in holders if r.oldest_held_age_s is not None]
        events = Events(OK, None, in_hand, max(ages) if ages else None, "held" if ages else UNKNOWN)
    elif queues.events.ready > 0:
        waiting = queues.events.ready
        subscribed = queues.events.consumers or 0
        why = (
            "no consumer is subscribed"
            if subscribed == 0
            else f"{subscribed} subscribed consumer(s) receive nothing"
        )
        events = Events(
            STALLED,
            f"{waiting} message(s) ready and no live consumer holds any ({why}); "
            "the oldest one's age is unknown",
            0,
            None,
            UNKNOWN,
        )
        suspect = True
        live = {r.id for r in consumers}
        judged = [
            Judged(j.role, STALLED, "messages are ready and it holds none")
            if j.role.id in live and j.state == OK
            else j
            for j in judged
        ]
    elif silent:
        events = Events(
            OK,
            f"the oldest message's age is unknown: {silent[0].label} has no heartbeat and may "
            "hold messages",
            in_hand,
            None,
            UNKNOWN,
        )
    else:
        events = Events(OK, None, in_hand, None, "none waiting")
    return Report(
        checked_at=checked_at,
        roles=tuple(judged),
        queues=queues,
        queues_error=queues_error,
        events=events,
        suspect=suspect,
    )


# ------------------------------------------------------------------------------------ reading


async def _read_queues(
    settings: config.Settings, broker: aio_pika.abc.AbstractConnection
) -> Queues:
    retry = [amqp.retry_queue_name(settings, delay) for delay in amqp.RETRY_DELAYS_S]
    names = [settings.events_queue, *retry, settings.dead_letter_queue]
    try:
        found = await asyncio.wait_for(amqp.depths(broker, names), timeout=5)
    except TimeoutError as exc:
        raise errors.BrokerUnavailable("queue depths: RabbitMQ did not answer in 5 s") from exc
    return Queues(events=found[0], retry=tuple(found[1:-1]), dead_letter=found[-1])


async def snapshot(
    settings: config.Settings,
    source: Source,
    broker: aio_pika.abc.AbstractConnection | None,
    *,
    broker_error: str | None = None,
    this_host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> Report:
    """One look: the rows, the queues' depths, judged (PostgreSQL unavailable raises)."""
    with db.translate("status"):
        records = await source.fetch(queries.get("list_heartbeats"), SHOWN_FOR_S)
        checked_at = await source.fetchval(queries.get("database_now"))
    queues: Queues | None = None
    error = broker_error
    if broker is not None:
        try:
            queues = await _read_queues(settings, broker)
        except errors.BrokerUnavailable as exc:
            error = str(exc)
    elif error is None:
        error = "not connected"
    return judge(
        [Role.from_record(r) for r in records],
        queues,
        checked_at=checked_at,
        stall_after_s=settings.stall_after_s,
        this_host=this_host or socket.gethostname(),
        alive=alive,
        queues_error=error,
    )


async def check(
    settings: config.Settings,
    source: Source,
    broker: aio_pika.abc.AbstractConnection | None,
    *,
    broker_error: str | None = None,
    confirm: bool = True,
    this_host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Report:
    """:func:`snapshot`; when only an instant's view calls the events queue stalled (messages ready
    that no live consumer holds) and ``confirm``, look again for up to a beat (and a second): the
    messages may be on their way, and the consumers' rows up to a beat old."""

    async def look() -> Report:
        return await snapshot(
            settings, source, broker, broker_error=broker_error, this_host=this_host, alive=alive
        )

    report = await look()
    if not confirm:
        return report
    return await look_again(report, look, default_beat_s=settings.heartbeat_interval_s, sleep=sleep)


async def look_again(
    report: Report,
    look: Callable[[], Awaitable[Report]],
    *,
    default_beat_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Report:
    """While ``report`` is stalled only by an instant's view, look again, for up to the live
    consumers' beat and a second; the last report stands."""
    if not report.suspect:
        return report
    beat = max(
        (j.role.interval_s for j in report.roles if j.role.role == "consume" and j.role.live),
        default=float(default_beat_s),
    )
    deadline = time.monotonic() + beat + 1.0
    while report.suspect and time.monotonic() < deadline:
        await sleep(CONFIRM_POLL_S)
        report = await look()
    return report
