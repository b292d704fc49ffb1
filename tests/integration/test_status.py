"""`relay status` over real roles (subprocesses): who runs, what they did, and a stalled role shown
as such, by the command, the admin API and /metrics alike."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika.abc
import asyncpg
import httpx
import orjson
import pytest

from relay import config
from relay.broker import amqp
from tests.integration import factories, processes

ADMIN_TOKEN = "test-admin-token-0123456789"
Status = dict[str, Any]


@pytest.fixture
def beating(upstream_settings: config.Settings) -> config.Settings:
    """The test's settings with a heartbeat every second and a stall after 3 s of no progress."""
    return dataclasses.replace(upstream_settings, heartbeat_interval_s=1, stall_after_s=3)


@pytest.fixture
def start(
    beating: config.Settings, tmp_path: pathlib.Path
) -> Iterator[Callable[..., processes.Role]]:
    """Start `relay <command>` subprocesses; every one is killed at the end of the test."""
    started: list[processes.Role] = []

    def run(*command: str, **env: str) -> processes.Role:
        role = processes.Role(
            beating,
            *command,
            log_path=tmp_path / f"relay-{command[0]}-{len(started)}.log",
            env={"RELAY_ADMIN_TOKEN": ADMIN_TOKEN, **env},
        )
        started.append(role)
        return role

    yield run
    for role in started:
        with contextlib.suppress(ProcessLookupError):
            role.process.send_signal(signal.SIGCONT)
        role.close()


async def relay_status(settings: config.Settings, *flags: str) -> tuple[int, Status]:
    """`relay status --json [flags]`: its exit code and its one JSON document."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "status",
        "--json",
        *flags,
        env={**os.environ, **factories.environment(settings)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    try:
        return process.returncode, orjson.loads(out)
    except orjson.JSONDecodeError:
        raise AssertionError(f"not one JSON document: {out!r} {err!r}") from None


async def status_until(
    settings: config.Settings,
    condition: Callable[[int, Status], bool],
    *flags: str,
    within_s: float = 60,
    what: str = "status",
) -> tuple[int, Status]:
    """Run `relay status --json` until ``condition(exit code, document)`` holds."""
    last: list[tuple[int, Status]] = []

    async def reached() -> bool:
        last[:] = [await relay_status(settings, *flags)]
        return condition(*last[0])

    await factories.until(
        reached, within_s=within_s, what=lambda: f"{what} (last: {last})", every_s=0.2
    )
    return last[0]


def roles(value: Status, kind: str, pid: int | None = None) -> list[Status]:
    return [r for r in value["roles"] if r["role"] == kind and (pid is None or r["pid"] == pid)]


def state_of(value: Status, kind: str, pid: int) -> str | None:
    found = roles(value, kind, pid)
    return found[0]["state"] if found else None


async def publish(
    settings: config.Settings,
    broker: aio_pika.abc.AbstractConnection,
    connection_id: uuid.UUID,
    count: int,
) -> None:
    """``count`` transaction events on the events queue, as the intake queues them."""
    publisher = await amqp.Publisher.open(broker, settings)
    try:
        for _ in range(count):
            event = {
                "id": str(uuid.uuid4()),
                "type": "v1/transactions",
                "organization_id": "org",
                "data": {"id": str(uuid.uuid4()), "side": "debit", "attachment_ids": []},
            }
            await publisher.publish_event(
                orjson.dumps(event), connection_id=str(connection_id), event_id=event["id"]
            )
    finally:
        await publisher.close()


@contextlib.asynccontextmanager
async def admin(role: processes.Role) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=role.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as client:
        yield client


def gauge(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text (labels given must all match)."""
    for line in metrics.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_status_lists_the_running_roles_with_fresh_heartbeats_and_their_work(
    beating: config.Settings,
    connection_id: uuid.UUID,
    start: Callable[..., processes.Role],
) -> None:
    """serve (one row per worker process), consume and scheduler are listed ok with host, pid,
    start and last heartbeat; the webhook accepted, the event consumed and the scheduler's run
    are their last work; the admin API and /metrics show the same."""
    serve = start("serve", RELAY_WORKERS="2")
    consume = start("consume")
    scheduler = start("scheduler")
    await serve.ready()
    body, headers = factories.signed(
        {
            "id": "evt-status-1",
            "type": "v1/transactions",
            "organization_id": "org",
            "data": {"id": "tx-status-1", "side": "debit", "attachment_ids": []},
        }
    )
    async with httpx.AsyncClient(base_url=serve.url) as client:
        answer = await client.post(
            f"/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert answer.status_code == 202

    def working(code: int, value: Status) -> bool:
        serving = [r for r in roles(value, "serve") if r["state"] == "ok"]
        consuming = roles(value, "consume", consume.process.pid)
        scheduling = roles(value, "scheduler", scheduler.process.pid)
        return (
            code == 0
            and len(serving) == 2
            and sum(r["work"]["done"] for r in serving) == 1
            and bool(consuming)
            and consuming[0]["state"] == "ok"
            and consuming[0]["work"]["done"] >= 1
            and bool(scheduling)
            and scheduling[0]["state"] == "ok"
            and scheduling[0]["work"]["last_at"] is not None
        )

    code, value = await status_until(beating, working, what="every role ok with its work")
    assert value["status"] == "ok"
    assert value["stalled"] == 0
    assert value["problems"] == []
    (consumer,) = roles(value, "consume")
    assert consumer["host"] == os.uname().nodename
    assert consumer["command"] == "consume"
    assert consumer["work"]["unit"] == "events"
    assert consumer["consumer"]["subscribed"] is True
    assert consumer["since"] <= consumer["last_heartbeat"]
    assert consumer["heartbeat_interval_s"] == 1
    accepted = next(r for r in roles(value, "serve") if r["work"]["done"] == 1)
    assert accepted["work"]["unit"] == "webhooks"
    assert accepted["work"]["last_at"] is not None
    assert {r["pid"] for r in roles(value, "serve")} != {serve.process.pid}  # the workers'
    assert roles(value, "scheduler")[0]["work"]["unit"] == "documents"
    events = value["queues"]["events"]
    assert (events["name"], events["exists"], events["consumers"]) == (
        beating.events_queue,
        True,
        1,
    )
    assert value["queues"]["dead_letter"]["name"] == beating.dead_letter_queue
    assert len(value["queues"]["retry"]) == len(amqp.RETRY_DELAYS_S)

    # the health checks' form
    assert (await relay_status(beating, "--role", "consume", "--this-host"))[0] == 0
    code, missing = await relay_status(beating, "--role", "flush", "--this-host")
    assert (code, missing["status"], missing["roles"]) == (1, "missing", [])

    async with admin(serve) as client:
        over_http = (await client.get("/admin/status")).json()
        only = (await client.get("/admin/status", params={"role": "consume"})).json()
        metrics = (await client.get("/metrics")).text
    assert {r["id"] for r in over_http["roles"]} >= {r["id"] for r in value["roles"]}
    assert over_http["status"] == "ok"
    assert [r["role"] for r in only["roles"]] == ["consume"]
    assert gauge(metrics, "relay_stalled") == 0
    assert gauge(metrics, "relay_roles", role="serve", state="ok") == 2
    assert gauge(metrics, "relay_queue_consumers", queue=beating.events_queue) == 1
    age = gauge(
        metrics, "relay_role_heartbeat_age_seconds", role="consume", pid=str(consume.process.pid)
    )
    assert age is not None
    assert gauge(metrics, "relay_queue_ready_messages", queue=beating.dead_letter_queue) == 0


async def test_a_consumer_stopped_while_events_wait_is_stalled_until_it_resumes(
    beating: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    start: Callable[..., processes.Role],
) -> None:
    """SIGSTOP: its heartbeat goes stale while events wait, it is stalled and status exits 1;
    SIGCONT: it settles them and is ok again (exit 0)."""
    connection_id = await factories.make_connection(pool, beating)
    consume = start("consume")
    pid = consume.process.pid
    await status_until(beating, lambda c, v: state_of(v, "consume", pid) == "ok", what="ok")
    consume.process.send_signal(signal.SIGSTOP)
    await publish(beating, amqp_connection, connection_id, 3)

    code, value = await status_until(
        beating, lambda c, v: state_of(v, "consume", pid) == "stalled", what="stalled"
    )
    assert code == 1
    assert value["status"] == "stalled"
    (stalled,) = roles(value, "consume", pid)
    assert "no heartbeat" in stalled["reason"]
    assert any(f"pid {pid}" in p and "no heartbeat" in p for p in value["problems"])
    code, _ = await relay_status(beating, "--role", "consume", "--this-host")
    assert code == 1

    consume.process.send_signal(signal.SIGCONT)
    code, value = await status_until(
        beating,
        lambda c, v: (
            c == 0
            and bool(roles(v, "consume", pid))
            and roles(v, "consume", pid)[0]["work"]["done"] >= 3
        ),
        what="ok again with the events settled",
    )
    assert state_of(value, "consume", pid) == "ok"
    assert value["queues"]["events"]["ready"] == 0


async def test_a_killed_consumer_is_gone_and_events_waiting_without_one_are_stalled(
    beating: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    start: Callable[..., processes.Role],
) -> None:
    """SIGKILL: its row (never marked stopped) turns gone once stale, this host seeing the process
    dead; events then waiting with no consumer stall the queue, their age unknown, exit 1."""
    connection_id = await factories.make_connection(pool, beating)
    consume = start("consume")
    pid = consume.process.pid
    await status_until(beating, lambda c, v: state_of(v, "consume", pid) == "ok", what="ok")
    consume.process.kill()
    consume.process.wait(10)

    code, value = await status_until(
        beating, lambda c, v: state_of(v, "consume", pid) == "gone", what="gone"
    )
    assert code == 0  # nothing waits: a dead consumer alone stalls nothing
    assert "no longer exists" in roles(value, "consume", pid)[0]["reason"]
    assert roles(value, "consume", pid)[0]["stopped_at"] is None

    await publish(beating, amqp_connection, connection_id, 2)
    code, value = await status_until(
        beating, lambda c, v: (v["queues"]["events"] or {}).get("ready") == 2, what="2 waiting"
    )
    assert code == 1
    events = value["queues"]["events"]
    assert (events["state"], events["oldest"], events["oldest_age_s"]) == (
        "stalled",
        "unknown",
        None,
    )
    assert "no consumer is subscribed" in events["reason"]
    assert value["stalled"] == 1
    assert any(p.startswith("events queue:") for p in value["problems"])


async def test_a_consumer_stuck_on_a_batch_is_stalled_while_its_heartbeat_goes_on(
    beating: config.Settings,
    pool: asyncpg.Pool,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    start: Callable[..., processes.Role],
) -> None:
    """The consumer's write waits on a lock: alive (fresh heartbeat) but holding messages and
    settling none for stall_after, it is stalled, with the oldest message's age known; the admin API
    and /metrics say so too. The lock released, it settles them and is ok again."""
    connection_id = await factories.make_connection(pool, beating)
    serve = start("serve", RELAY_WORKERS="1")
    consume = start("consume")
    pid = consume.process.pid
    await serve.ready()
    await status_until(beating, lambda c, v: state_of(v, "consume", pid) == "ok", what="ok")
    async with pool.acquire() as locker:
        transaction = locker.transaction()
        await transaction.start()
        try:
            await locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            await publish(beating, amqp_connection, connection_id, 2)
            code, value = await status_until(
                beating, lambda c, v: state_of(v, "consume", pid) == "stalled", what="stalled"
            )
            (stuck,) = roles(value, "consume", pid)
            assert "holds 2 message(s) and has settled none" in stuck["reason"]
            assert stuck["heartbeat_age_s"] <= 3  # it still beats
            events = value["queues"]["events"]
            assert events["oldest"] == "held"
            assert stuck["consumer"]["waiting_s"] >= beating.stall_after_s
            assert events["oldest_age_s"] >= stuck["consumer"]["waiting_s"]
            assert code == 1
            async with admin(serve) as client:
                over_http = (await client.get("/admin/status")).json()
                metrics = (await client.get("/metrics")).text
            assert state_of(over_http, "consume", pid) == "stalled"
            assert over_http["status"] == "stalled"
            assert gauge(metrics, "relay_stalled") == 1
            assert gauge(metrics, "relay_roles", role="consume", state="stalled") == 1
            oldest = gauge(metrics, "relay_events_oldest_message_age_seconds")
            assert oldest is not None
            assert oldest >= beating.stall_after_s
        finally:
            await transaction.rollback()
    await status_until(
        beating,
        lambda c, v: c == 0 and state_of(v, "consume", pid) == "ok",
        what="ok once the lock is gone",
    )
