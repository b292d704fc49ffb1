"""Judgement of which roles are stalled, from the heartbeat rows and the queues' depths.

Pure functions: :mod:`relay.domain.status` reads the rows and the queues and reports.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from relay import models
from relay.broker import amqp

STALE_BEATS: Final = 3  # a heartbeat older than this many beats is stale
GONE_AFTER_S: Final = 600.0  # a role silent this long is taken for dead

OK, STALLED, STOPPED, GONE, UNKNOWN = "ok", "stalled", "stopped", "gone", "unknown"


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
            "heartbeat_age_s": round_s(row.beat_age_s),
            "heartbeat_interval_s": row.interval_s,
            "state": self.state,
            "reason": self.reason,
            "stopped_at": row.stopped_at.isoformat() if row.stopped_at else None,
            "work": {
                "unit": row.work_unit,
                "done": row.work_done,
                "last_at": row.last_work_at.isoformat() if row.last_work_at else None,
                "age_s": round_s(row.work_age_s),
            },
        }
        if row.role == "consume":
            value["consumer"] = {
                "subscribed": row.subscribed,
                "in_hand": row.in_hand,
                "oldest_held_at": row.oldest_held_at.isoformat() if row.oldest_held_at else None,
                "oldest_held_age_s": round_s(row.oldest_held_age_s),
                "waiting_s": round_s(row.waiting_s),
            }
        return value


@dataclasses.dataclass(frozen=True, slots=True)
class Events:
    """The events queue judged, with its oldest waiting message when that can be known."""

    state: str  # ok, stalled, unknown (RabbitMQ not read, or the queue missing)
    reason: str | None
    in_hand: int  # held by live consumers (delivered, not settled)
    oldest_age_s: float | None
    oldest: str  # "held" (age known), "none waiting", "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class Judgement:
    roles: tuple[Judged, ...]
    events: Events
    # stalled by an instant's view (ready messages nobody holds): worth a second look
    suspect: bool = False


def round_s(value: float | None) -> float | None:
    """Round seconds to a tenth, as shown."""
    return None if value is None else round(value, 1)


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists on this host (any user's)."""
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
    """Judge one role's state, with the reason shown beside it.

    A role is

    - ``stopped`` when its row says so (a clean stop, or a role that failed and left);
    - ``gone`` when it is not stopped and known dead: no heartbeat for ``GONE_AFTER_S``; or, on
      the host running the check, no process with its pid; or a later process with the same host
      and pid (a restarted container) started after its last beat;
    - ``stalled`` when it is not stopped and its heartbeat is more than ``STALE_BEATS`` beats old
      (hung, or dead in a way that cannot be told yet); or a consumer that has held messages, or
      had no subscription while messages wait, without settling any for ``stall_after_s``; or
      (in :func:`judge`) a live consumer while messages are ready and no live consumer holds any;
    - ``ok`` otherwise.
    """
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
    stall_after_s: float,
    this_host: str,
    alive: Callable[[int], bool] = pid_alive,
    queues_error: str | None = None,
) -> Judgement:
    """Judge each role's state and the events queue's, from the rows and the queues' depths."""
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
    events, suspect = _events_state(queues, queues_error, consumers, silent)
    if suspect:
        live = {r.id for r in consumers}
        judged = [
            Judged(j.role, STALLED, "messages are ready and it holds none")
            if j.role.id in live and j.state == OK
            else j
            for j in judged
        ]
    return Judgement(roles=tuple(judged), events=events, suspect=suspect)


def _events_state(
    queues: Queues | None,
    queues_error: str | None,
    consumers: Sequence[Role],
    silent: Sequence[Role],
) -> tuple[Events, bool]:
    """Judge the events queue, and whether its live consumers are suspect (ready, none held).

    The events queue is ``stalled`` when messages are ready and no live consumer holds any: the
    age of its oldest message is then unknown, and the output says so. Otherwise its oldest
    message is the oldest one a live consumer holds (a quorum queue delivers in order), as of
    that consumer's last beat. Ready messages nobody holds may be an instant's view
    (``Judgement.suspect``): the reader looks again.
    """
    in_hand = sum(r.in_hand or 0 for r in consumers)
    if queues is None:
        why = f"RabbitMQ could not be read ({queues_error})"
        return Events(UNKNOWN, why, in_hand, None, UNKNOWN), False
    if queues.events.ready is None:
        why = f"{queues.events.name} does not exist (no role declared it: RELAY_AMQP_PREFIX?)"
        return Events(UNKNOWN, why, in_hand, None, UNKNOWN), False
    holders = [r for r in consumers if r.in_hand]
    if holders:
        return _held(holders, in_hand), False
    if queues.events.ready > 0:
        return _nobody_consuming(queues.events.ready, queues.events.consumers or 0), True
    if silent:
        why = (
            f"the oldest message's age is unknown: {silent[0].label} has no heartbeat and may "
            "hold messages"
        )
        return Events(OK, why, in_hand, None, UNKNOWN), False
    return Events(OK, None, in_hand, None, "none waiting"), False


def _held(holders: Sequence[Role], in_hand: int) -> Events:
    """Judge the events queue while consumers hold messages, aged by the oldest one held."""
    ages = [r.oldest_held_age_s for r in holders if r.oldest_held_age_s is not None]
    if ages:
        return Events(OK, None, in_hand, max(ages), "held")
    why = f"the messages held carry no {amqp.HEADER_RECEIVED_AT} header"
    return Events(OK, why, in_hand, None, UNKNOWN)


def _nobody_consuming(waiting: int, subscribed: int) -> Events:
    """Mark the events queue stalled, its ready messages held by no live consumer."""
    why = (
        "no consumer is subscribed"
        if subscribed == 0
        else f"{subscribed} subscribed consumer(s) receive nothing"
    )
    return Events(
        STALLED,
        f"{waiting} message(s) ready and no live consumer holds any ({why}); "
        "the oldest one's age is unknown",
        0,
        None,
        UNKNOWN,
    )
