"""The ``relay status`` report of every role's heartbeat, the queues' depths, and what is stalled.

Reads the rows of ``heartbeats`` (:mod:`relay.domain.heartbeat`) and the queues' depths (a passive
declare), has them judged (:mod:`relay.domain.stalls`: ok, stalled, stopped, gone) and reports: the
exit code, one JSON document, a readable table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import aio_pika.abc
import asyncpg

from relay import config, errors, store
from relay.broker import amqp
from relay.cli import console
from relay.domain import stalls
from relay.store import db

SHOWN_FOR_S: Final = 3600.0  # stopped and gone roles are listed this long after their last beat
CONFIRM_POLL_S: Final = 0.25

Source = asyncpg.Pool | db.Conn


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """What one look found, with every role judged, the queues, and the verdict for any filter."""

    checked_at: dt.datetime
    roles: tuple[stalls.Judged, ...]
    queues: stalls.Queues | None
    queues_error: str | None
    events: stalls.Events
    suspect: bool = False  # see stalls.Judgement

    def matching(self, role: str | None = None, host: str | None = None) -> list[stalls.Judged]:
        return [
            j
            for j in self.roles
            if (role is None or j.role.role == role) and (host is None or j.role.host == host)
        ]

    def outcome(self, role: str | None = None, host: str | None = None) -> tuple[str, int]:
        """Judge the report as ("ok" | "stalled" | "unknown" | "missing", exit code).

        Without a filter: 1 when any role or the events queue is stalled, or the queues could not
        be read. With one (a health check): 0 only when a live, non-stalled role matches and no
        matching role is stalled ("missing" when none is live).
        """
        if role is None and host is None:
            if (
                any(j.state == stalls.STALLED for j in self.roles)
                or self.events.state == stalls.STALLED
            ):
                return stalls.STALLED, console.EXIT_FAILED
            if self.events.state == stalls.UNKNOWN:
                return stalls.UNKNOWN, console.EXIT_FAILED
            return stalls.OK, console.EXIT_OK
        chosen = self.matching(role, host)
        if any(j.state == stalls.STALLED for j in chosen):
            return stalls.STALLED, console.EXIT_FAILED
        if not any(j.state == stalls.OK for j in chosen):
            return "missing", console.EXIT_FAILED
        return stalls.OK, console.EXIT_OK

    def problems(self, role: str | None = None, host: str | None = None) -> list[str]:
        found = [
            f"{j.role.label}: {j.reason}"
            for j in self.matching(role, host)
            if j.state == stalls.STALLED
        ]
        if role is None and host is None and self.events.state in (stalls.STALLED, stalls.UNKNOWN):
            found.append(f"events queue: {self.events.reason}")
        if (role is not None or host is not None) and not any(
            j.state == stalls.OK for j in self.matching(role, host)
        ):
            found.append(f"no live {role or 'role'}{' on ' + host if host else ''}")
        return found

    def stalled(self, role: str | None = None, host: str | None = None) -> int:
        """Count the stalled roles (matching the filter), and the events queue when unfiltered."""
        queue = role is None and host is None and self.events.state == stalls.STALLED
        return sum(j.state == stalls.STALLED for j in self.matching(role, host)) + int(queue)

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
                "oldest_age_s": stalls.round_s(self.events.oldest_age_s),
                "oldest": self.events.oldest,
                "state": self.events.state,
                "reason": self.events.reason,
            },
            "retry": [_depth_json(d) for d in self.queues.retry],
            "dead_letter": _depth_json(self.queues.dead_letter),
        }

    def render(self, role: str | None = None, host: str | None = None) -> str:
        """Render the readable form, with the roles' table, the queues and the problems."""
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
                "unknown": f"oldest waiting: unknown ({ev.reason or 'no live consumer holds one'})",
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


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _row(judged: stalls.Judged) -> list[Any]:
    row = judged.role
    work = f"{row.work_done} {row.work_unit}"
    if row.work_age_s is not None:
        work += f", last {_ago(row.work_age_s)}"
    if row.role == "consume" and row.in_hand:
        work += f"; {row.in_hand} in hand"
    role = row.role if row.command == row.role else f"{row.role} (run)"
    said = judged.reason not in (None, judged.state)  # a clean stop's reason is "stopped"
    state = f"{judged.state}: {judged.reason}" if said else judged.state
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


def judge(
    rows: Sequence[stalls.Role],
    queues: stalls.Queues | None,
    *,
    checked_at: dt.datetime,
    stall_after_s: float,
    this_host: str,
    alive: Callable[[int], bool] = stalls.pid_alive,
    queues_error: str | None = None,
) -> Report:
    """Build the report of one look (see :func:`relay.domain.stalls.judge`)."""
    judgement = stalls.judge(
        rows,
        queues,
        stall_after_s=stall_after_s,
        this_host=this_host,
        alive=alive,
        queues_error=queues_error,
    )
    return Report(
        checked_at=checked_at,
        roles=judgement.roles,
        queues=queues,
        queues_error=queues_error,
        events=judgement.events,
        suspect=judgement.suspect,
    )


# ------------------------------------------------------------------------------------ reading


async def _read_queues(
    settings: config.Settings, broker: aio_pika.abc.AbstractConnection
) -> stalls.Queues:
    retry = [amqp.retry_queue_name(settings, delay) for delay in amqp.RETRY_DELAYS_S]
    names = [settings.events_queue, *retry, settings.dead_letter_queue]
    try:
        found = await asyncio.wait_for(amqp.depths(broker, names), timeout=5)
    except TimeoutError as exc:
        raise errors.BrokerUnavailable("queue depths: RabbitMQ did not answer in 5 s") from exc
    return stalls.Queues(events=found[0], retry=tuple(found[1:-1]), dead_letter=found[-1])


async def snapshot(
    settings: config.Settings,
    source: Source,
    broker: aio_pika.abc.AbstractConnection | None,
    *,
    broker_error: str | None = None,
    this_host: str | None = None,
    alive: Callable[[int], bool] = stalls.pid_alive,
) -> Report:
    """Take one look at the rows and the queues' depths, judged (PostgreSQL unavailable raises)."""
    rows = await store.heartbeats.recent(source, SHOWN_FOR_S)
    checked_at = await store.server.now(source)
    queues: stalls.Queues | None = None
    error = broker_error
    if broker is not None:
        try:
            queues = await _read_queues(settings, broker)
        except errors.BrokerUnavailable as exc:
            error = str(exc)
    elif error is None:
        error = "not connected"
    return judge(
        rows,
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
    alive: Callable[[int], bool] = stalls.pid_alive,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Report:
    """Take a :func:`snapshot`, and look again before calling the events queue stalled.

    When only an instant's view calls the events queue stalled (messages ready that no live
    consumer holds) and ``confirm``, it looks again for up to a beat (and a second): the messages
    may be on their way, and the consumers' rows up to a beat old.
    """

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
    """Look again while ``report`` is stalled only by an instant's view.

    The last report stands. It looks for up to the live consumers' beat and a second.
    """
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
