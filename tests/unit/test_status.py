"""The rules of `relay status` on built rows: what is ok, stalled, stopped or gone, and the exit code."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import orjson

from relay.broker import amqp
from relay.domain import stalls, status

NOW = dt.datetime(2024, 6, 1, 12, 0, tzinfo=dt.UTC)
HERE, THERE = "this-host", "other-host"


def role(
    kind: str = "consume",
    *,
    host: str = THERE,
    pid: int = 100,
    age: float = 1.0,
    interval: float = 5.0,
    started_ago: float = 3600.0,
    stopped: bool = False,
    **fields: Any,
) -> stalls.Role:
    """A heartbeat row, its last beat ``age`` seconds before NOW."""
    consumer = (
        {"subscribed": True, "in_hand": 0, "waiting_s": None, "work_unit": "events"}
        if kind == "consume"
        else {"work_unit": "documents" if kind in ("scheduler", "flush") else "webhooks"}
    )
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "role": kind,
        "command": kind,
        "host": host,
        "pid": pid,
        "started_at": NOW - dt.timedelta(seconds=started_ago),
        "beat_at": NOW - dt.timedelta(seconds=age),
        "beat_age_s": age,
        "interval_s": interval,
        "stopped_at": NOW - dt.timedelta(seconds=age) if stopped else None,
        "stop_reason": "stopped" if stopped else None,
        **consumer,
        **fields,
    }
    return stalls.Role(**values)


def queues(ready: int = 0, consumers: int = 1, dead: int = 0) -> stalls.Queues:
    return stalls.Queues(
        events=amqp.Depth("relay.events", ready, consumers),
        retry=tuple(amqp.Depth(f"relay.events.retry.{d}s", 0, 0) for d in amqp.RETRY_DELAYS_S),
        dead_letter=amqp.Depth("relay.events.dlq", dead, 0),
    )


def judge(
    rows: list[stalls.Role],
    found: stalls.Queues | None = None,
    *,
    dead_pids: tuple[int, ...] = (),
    queues_error: str | None = None,
) -> status.Report:
    return status.judge(
        rows,
        queues() if found is None and queues_error is None else found,
        checked_at=NOW,
        stall_after_s=60,
        this_host=HERE,
        alive=lambda pid: pid not in dead_pids,
        queues_error=queues_error,
    )


def states(report: status.Report) -> list[str]:
    return [j.state for j in report.roles]


def test_roles_beating_with_nothing_waiting_are_ok() -> None:
    """Fresh heartbeats, an empty events queue: every role ok, exit 0, nothing waiting."""
    report = judge([role("serve"), role("consume"), role("scheduler")])
    assert states(report) == ["ok", "ok", "ok"]
    assert report.outcome() == ("ok", 0)
    assert report.events.oldest == "none waiting"


def test_a_stale_heartbeat_of_a_role_not_stopped_is_stalled() -> None:
    """No heartbeat for more than three beats, and no stop recorded: stalled, exit 1."""
    report = judge([role("consume", age=16, interval=5), role("scheduler", age=14, interval=5)])
    assert states(report) == ["stalled", "ok"]
    assert "no heartbeat for 16 s" in str(report.roles[0].reason)
    assert report.outcome() == ("stalled", 1)
    assert report.stalled() == 1


def test_a_stopped_role_is_stopped_however_old_its_heartbeat() -> None:
    """A clean stop marks the row: never stalled, never counted."""
    report = judge([role("consume", age=500, stopped=True)])
    assert states(report) == ["stopped"]
    assert report.outcome() == ("ok", 0)


def test_a_role_silent_for_ten_minutes_is_gone() -> None:
    """Past GONE_AFTER_S without a heartbeat the role is taken for dead: gone, not stalled."""
    report = judge([role("scheduler", age=stalls.GONE_AFTER_S + 1)])
    assert states(report) == ["gone"]
    assert report.outcome() == ("ok", 0)


def test_a_stale_role_of_this_host_whose_process_is_dead_is_gone() -> None:
    """On the host running the check, a stale row whose pid no longer exists is gone at once;
    the same row from another host stays stalled (nothing there proves it dead)."""
    here = role("consume", host=HERE, pid=4242, age=30)
    there = role("consume", host=THERE, pid=4242, age=30)
    report = judge([here, there], dead_pids=(4242,))
    assert states(report) == ["gone", "stalled"]
    assert "no longer exists" in str(report.roles[0].reason)


def test_a_role_restarted_with_the_same_host_and_pid_leaves_the_old_row_gone() -> None:
    """A container restarted (same host name, pid 1): the row it left behind is gone."""
    old = role("consume", host=THERE, pid=1, age=100, started_ago=3600)
    new = role("consume", host=THERE, pid=1, age=1, started_ago=50)
    assert states(judge([old, new])) == ["gone", "ok"]


def test_roles_of_one_relay_run_are_not_restarts_of_each_other() -> None:
    """`relay run`'s roles share a host and pid: a stale one among them is stalled, not gone."""
    serve = role("serve", host=THERE, pid=7, age=1, started_ago=100, command="run")
    consume = role("consume", host=THERE, pid=7, age=30, started_ago=100, command="run")
    assert states(judge([serve, consume])) == ["ok", "stalled"]


def test_a_consumer_holding_messages_without_settling_any_for_a_minute_is_stalled() -> None:
    """Alive (fresh heartbeat) but stuck on a batch: stalled after stall_after_s, not before."""
    stuck = role("consume", in_hand=12, waiting_s=61, oldest_held_age_s=70)
    busy = role("consume", in_hand=12, waiting_s=30, oldest_held_age_s=40)
    assert states(judge([stuck], queues(ready=5))) == ["stalled"]
    assert "holds 12 message(s)" in str(judge([stuck]).roles[0].reason)
    assert states(judge([busy], queues(ready=5))) == ["ok"]


def test_a_consumer_without_subscription_for_a_minute_while_messages_wait_is_stalled() -> None:
    """Alive but unsubscribed: stalled when messages wait, ok when none does."""
    idle = role("consume", subscribed=False, in_hand=0, waiting_s=90)
    other = role("consume", in_hand=3, waiting_s=1, oldest_held_age_s=2)
    assert states(judge([idle, other], queues(ready=4, consumers=1))) == ["stalled", "ok"]
    assert states(judge([idle], queues(ready=0, consumers=0))) == ["ok"]


def test_messages_waiting_with_no_consumer_at_all_stall_the_queue_with_an_unknown_age() -> None:
    """Ready messages and no consumer: the events queue is stalled, its oldest age unknown."""
    report = judge([role("serve")], queues(ready=3, consumers=0))
    assert report.events.state == "stalled"
    assert report.events.oldest == "unknown"
    assert report.events.oldest_age_s is None
    assert "no consumer is subscribed" in str(report.events.reason)
    assert report.outcome() == ("stalled", 1)
    assert report.suspect  # an instant's view: check() looks again


def test_live_consumers_that_hold_nothing_while_messages_are_ready_are_stalled() -> None:
    """Subscribed consumers receiving nothing while messages wait: they and the queue stall."""
    report = judge([role("consume"), role("consume", pid=101)], queues(ready=2, consumers=2))
    assert states(report) == ["stalled", "stalled"]
    assert "2 subscribed consumer(s) receive nothing" in str(report.events.reason)


def test_the_oldest_waiting_message_is_the_oldest_a_live_consumer_holds() -> None:
    """Its age is the oldest held by a live consumer; a stale consumer's rows do not count."""
    report = judge(
        [
            role("consume", in_hand=5, waiting_s=1, oldest_held_age_s=12.34),
            role("consume", pid=101, in_hand=2, waiting_s=1, oldest_held_age_s=3.0),
            role("consume", pid=102, age=40, in_hand=9, oldest_held_age_s=500.0),
        ],
        queues(ready=100, consumers=3),
    )
    assert report.events.state == "ok"
    assert report.events.oldest == "held"
    assert report.events.oldest_age_s == 12.34
    assert report.events.in_hand == 7
    assert report.to_json()["queues"]["events"]["oldest_age_s"] == 12.3


def test_a_consumer_gone_silent_makes_the_oldest_age_unknown() -> None:
    """Nothing ready, but a stalled consumer may hold messages: the age is unknown, not 'none'."""
    report = judge([role("consume", age=30)], queues(ready=0, consumers=1))
    assert report.events.oldest == "unknown"
    assert "may hold messages" in str(report.events.reason)


def test_queues_that_cannot_be_read_make_the_status_unknown() -> None:
    """RabbitMQ unreadable: status unknown, exit 1 (nothing says the consumers work)."""
    report = judge([role("consume")], None, queues_error="RabbitMQ unavailable")
    assert report.outcome() == ("unknown", 1)
    assert report.to_json()["queues"]["error"] == "RabbitMQ unavailable"


def test_a_health_check_passes_only_with_a_live_role_of_its_kind_on_its_host() -> None:
    """`--role consume --this-host`: 0 only when a live consumer of this host is not stalled."""
    mine = role("consume", host=HERE)
    theirs = role("consume", host=THERE)
    serve_here = role("serve", host=HERE)
    assert judge([mine, theirs]).outcome("consume", HERE) == ("ok", 0)
    assert judge([theirs, serve_here]).outcome("consume", HERE) == ("missing", 1)
    stalled = dataclasses.replace(mine, beat_age_s=60.0)
    assert judge([stalled, theirs]).outcome("consume", HERE) == ("stalled", 1)
    # another host's stalled consumer is not this container's problem
    stalled_there = dataclasses.replace(theirs, beat_age_s=60.0)
    assert judge([mine, stalled_there]).outcome("consume", HERE) == ("ok", 0)
    # a role filter ignores the queues: the serve health check does not depend on RabbitMQ
    assert judge([serve_here], None, queues_error="down").outcome("serve", HERE) == ("ok", 0)


def test_the_json_document_names_every_role_and_queue() -> None:
    """--json: one document with the status, roles (with their work) and the queues."""
    report = judge(
        [role("consume", work_done=42, work_age_s=2.0, in_hand=1, oldest_held_age_s=0.5)],
        queues(ready=0, dead=3),
    )
    value = orjson.loads(orjson.dumps(report.to_json()))
    assert value["status"] == "ok"
    assert value["exit_code"] == 0
    (consumer,) = value["roles"]
    assert {"role", "host", "pid", "since", "last_heartbeat", "state", "work"} <= set(consumer)
    assert consumer["work"] == {"unit": "events", "done": 42, "last_at": None, "age_s": 2.0}
    assert consumer["consumer"]["in_hand"] == 1
    assert value["queues"]["dead_letter"] == {
        "name": "relay.events.dlq",
        "exists": True,
        "ready": 3,
    }
    assert [q["name"] for q in value["queues"]["retry"]] == [
        f"relay.events.retry.{d}s" for d in amqp.RETRY_DELAYS_S
    ]


def test_the_readable_form_says_what_is_stalled_and_why() -> None:
    """The text output lists the roles and ends with the problems."""
    text = judge([role("consume", age=30)], queues(ready=0, dead=2)).render()
    assert text.startswith("status: stalled")
    assert "no heartbeat for 30 s" in text
    assert "dead letters (relay.events.dlq): 2 (see relay dlq list)" in text


async def test_a_queue_stalled_at_one_instant_is_looked_at_again() -> None:
    """Ready messages nobody holds may be on their way: check looks again before saying so."""
    looks = [
        judge([role("consume", interval=1)], queues(ready=0)),  # the second look: delivered
    ]

    async def look() -> status.Report:
        return looks.pop(0)

    async def no_wait(_: float) -> None:
        return None

    first = judge([role("consume", interval=1)], queues(ready=3))
    assert first.suspect
    final = await status.look_again(first, look, default_beat_s=5, sleep=no_wait)
    assert final.outcome() == ("ok", 0)
    assert not looks
