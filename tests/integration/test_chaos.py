"""Fault injection: every eligible file reaches Loop exactly once, whatever fails, or is in doubt.

Per seed, on the real PostgreSQL and RabbitMQ, with both sandboxes injecting faults at random
(Qonto: 429, 5xx, slow answers, expired URLs; Cegid: 429, 5xx, slow answers, "stored then dropped",
"dropped before storing"), a day of signed webhooks goes through a real `relay serve` (each one sent
again while it is answered 503, as Qonto retries) to a real `relay consume`, then `relay flush --now`
processes run until one completes. Meanwhile the services themselves fail under the roles, at random
points of the intake (the consumer consuming alongside) and of the flush: RabbitMQ restarted
(``stop_app``/``start_app``), its connections closed, PostgreSQL restarted, the relay's backends
terminated; and the consumer and the flushes are SIGKILLed at random moments. After each service
fault, a webhook through the intake must land in PostgreSQL (the recovery time). Then the faults
stop, a last webhook must become a document, the consumer must be subscribed, and a last flush runs.
Afterwards:

- Loop holds no content twice in the dossier (0 duplicates);
- every eligible file is uploaded and in Loop exactly once, or in doubt and in Loop at most once;
  in-doubt documents are at most the ambiguous answers injected, plus the requests in flight in
  flushes that were killed (0 lost);
- every other document is skipped with its reason; nothing is left uploading or pending;
- `relay serve` and `relay consume` are alive and working; one that exited by itself (an outage it
  did not outlive) was restarted as a supervisor would, and is counted.

Each seed restarts the services (marked ``fault``: it holds the services lock alone, seed by seed).
`make test` runs a few seeds; `make chaos` runs RELAY_CHAOS_SEEDS (50 by default), prints totals and
writes them to RELAY_CHAOS_REPORT.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import pathlib
import random
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import pytest
from prometheus_client import parser as prometheus_parser

from consumers import recovery
from relay import config, models
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from tests import services
from tests.integration import factories, outages, processes

SEEDS = int(os.environ.get("RELAY_CHAOS_SEEDS", "2"))
DOCUMENTS = 24
# the roles' RELAY_OUTAGE_LIMIT: every outage injected is far shorter, so they recover by themselves
OUTAGE_LIMIT_S = 60
# how long a role may take to work again after a service came back before the seed fails
RECOVERY_WITHIN_S = 45.0
SERVICE_FAULTS = (
    "rabbitmq_restart",
    "rabbitmq_connections_closed",
    "postgres_restart",
    "postgres_backends_terminated",
)
TOTALS: collections.Counter[str] = collections.Counter()
WORST: dict[str, float] = {}
EXITS: list[str] = []  # roles that exited by themselves (restarted by the test), with their log

pytestmark = [pytest.mark.chaos, pytest.mark.fault]


def _report(started: float) -> str:
    """The totals so far as one line; written as JSON to RELAY_CHAOS_REPORT when it is set (after
    every seed, so an interrupted run still leaves its figures)."""
    summary: dict[str, Any] = dict(sorted(TOTALS.items()))
    summary.update({key: round(value, 2) for key, value in sorted(WORST.items())})
    summary["wall_s"] = round(time.monotonic() - started, 1)
    line = ", ".join(f"{k} {v}" for k, v in summary.items())
    summary["role_exits"] = EXITS
    report = os.environ.get("RELAY_CHAOS_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as out:
            out.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    return line


@pytest.fixture(scope="module")
def chaos_started() -> Iterator[float]:
    # the test's own pool says at every fault that it cannot refill: known, and not the relay's
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    started = time.monotonic()
    yield started
    if TOTALS["seeds_started"]:
        print(f"\nchaos totals: {_report(started)}")
        for exit_ in EXITS:
            print(f"role restarted by the test: {exit_}")


@pytest.fixture(autouse=True)
def chaos_totals(chaos_started: float) -> Iterator[None]:
    TOTALS["seeds_started"] += 1
    yield
    line = _report(chaos_started)
    if SEEDS > 5:
        print(f"\nchaos so far: {line}", flush=True)


@dataclasses.dataclass
class Planned:
    attachment_id: str
    kind: str  # eligible, heic, duplicate, deleted_event, deleted_404
    sha256: str


def _plan_day(
    rng: random.Random, q: qonto_sandbox.QontoSandbox
) -> tuple[list[Planned], list[dict[str, Any]]]:
    planned: list[Planned] = []
    events: list[dict[str, Any]] = []
    contents: list[bytes] = []
    for i in range(DOCUMENTS):
        roll = rng.random()
        kind = "eligible"
        if roll < 0.1:
            kind = "heic"
        elif roll < 0.2 and contents:
            kind = "duplicate"
        elif roll < 0.27:
            kind = "deleted_event"
        elif roll < 0.32:
            kind = "deleted_404"
        seed = rng.randrange(1_000_000)
        if kind == "heic":
            content = files.heic(seed=seed)
        elif kind == "duplicate":
            content = rng.choice(contents)
        else:
            content = rng.choice([files.pdf, files.jpeg, files.png])(
                size=rng.randrange(1024, 65536), seed=seed
            )
            contents.append(content)
        attachment = q.add_attachment(
            content, file_name=f"file-{i}", content_type="application/pdf"
        )
        side = rng.choice(["debit", "credit"])
        tx = q.add_transaction(
            side=side, amount=f"{i}.10", label=f"SHOP {i}", attachment_ids=[attachment]
        )
        events.append(q.transaction_event(tx))
        if kind == "deleted_event":
            q.delete_attachment(attachment)
            events.append(q.transaction_event(q.update_transaction(tx["id"], attachment_ids=[])))
        elif kind == "deleted_404":
            q.delete_attachment(attachment)
        planned.append(Planned(attachment, kind, hashlib.sha256(content).hexdigest()))
    if rng.random() < 0.5:
        events.append(events[0])  # a duplicate delivery
    rng.shuffle(events)  # Qonto does not promise order
    return planned, events


class Roles:
    """`relay serve` and `relay consume` as real processes, kept running as a supervisor would: one
    that exits by itself is started again (counted in ``restarts_<role>``)."""

    def __init__(
        self, settings: config.Settings, logs: pathlib.Path, tally: collections.Counter[str]
    ) -> None:
        self._settings = settings
        self._logs = logs
        self._tally = tally
        self._started: collections.Counter[str] = collections.Counter()
        self.exits: list[str] = []
        self._killing: processes.Role | None = None
        self.serve = self._start("serve")
        self.consume = self._start("consume")

    def _log_path(self, command: str) -> pathlib.Path:
        self._started[command] += 1
        return self._logs / f"{command}-{self._started[command]}.log"

    def _start(self, command: str) -> processes.Role:
        return processes.Role(
            self._settings, command, log_path=self._log_path(command), env={"RELAY_WORKERS": "1"}
        )

    def supervise(self) -> None:
        """Start again a role that exited by itself (not one being SIGKILLed by the test)."""
        for name in ("serve", "consume"):
            role: processes.Role = getattr(self, name)
            if not role.alive() and role is not self._killing:
                self._tally[f"restarts_{name}"] += 1
                self.exits.append(f"relay {name} exited {role.process.returncode}: {role.log()}")
                EXITS.append(self.exits[-1])
                setattr(self, name, role.again(self._log_path(name)))

    async def kill_consumer(self) -> None:
        """SIGKILL `relay consume` and start it again (what it held is redelivered)."""
        self._killing = self.consume
        self.consume.kill()
        await self.consume.exited(10)
        self.consume = self.consume.again(self._log_path("consume"))
        self._killing = None
        self._tally["consumers_killed"] += 1

    def close(self) -> None:
        self.serve.close()
        self.consume.close()


@contextlib.asynccontextmanager
async def supervised(roles: Roles) -> Any:
    async def watch() -> None:
        while True:
            roles.supervise()
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def deliver(
    client: httpx.AsyncClient, roles: Roles, path: str, event: dict[str, Any]
) -> None:
    """POST a signed webhook to `relay serve`, sent again while it is answered 503 or not at all,
    as Qonto retries; only a 202 ends it (Qonto never replays an accepted webhook)."""
    body, headers = factories.signed(event)
    deadline = time.monotonic() + RECOVERY_WITHIN_S
    while True:
        try:
            answer = await client.post(
                roles.serve.url + path, content=body, headers=headers, timeout=10
            )
            status: int | None = answer.status_code
        except httpx.TransportError:
            status = None
        if status == 202:
            return
        assert status in (503, None), f"webhook {event['id']} answered {status}"
        assert time.monotonic() < deadline, f"webhook {event['id']} not accepted (last {status})"
        await asyncio.sleep(0.1)


async def _intake_messages(client: httpx.AsyncClient, url: str) -> tuple[int, int]:
    """The messages `relay serve` (one worker) published, and those that held several events."""
    text = (await client.get(url + "/metrics", timeout=10)).text
    [family] = [
        f
        for f in prometheus_parser.text_string_to_metric_families(text)
        if f.name == "relay_events_per_message"
    ]
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    messages = int(values[("relay_events_per_message_count", None)])
    return messages, messages - int(values[("relay_events_per_message_bucket", "1.0")])


async def _fetch(pool: asyncpg.Pool, sql: str, *args: object) -> list[asyncpg.Record]:
    """``pool.fetch``, tried again while the pool replaces connections a fault cut."""
    deadline = time.monotonic() + RECOVERY_WITHIN_S
    while True:
        try:
            return list(await pool.fetch(sql, *args))
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _recorded(pool: asyncpg.Pool, sql: str, *args: object) -> bool:
    """Whether the query finds a row; False while PostgreSQL or the pool is coming back."""
    try:
        return bool(await pool.fetchval(sql, *args))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False


class Chaos:
    """Service faults under the running roles, and the time each role took to work again."""

    def __init__(
        self,
        rng: random.Random,
        faults: services.Services,
        roles: Roles,
        client: httpx.AsyncClient,
        pool: asyncpg.Pool,
        settings: config.Settings,
        webhook_path: str,
        tally: collections.Counter[str],
    ) -> None:
        self._rng = rng
        self._faults = faults
        self._roles = roles
        self._client = client
        self._pool = pool
        self._settings = settings
        self._database = settings.database_url.reveal().rsplit("/", 1)[-1]
        self._path = webhook_path
        self._tally = tally
        self.recoveries: list[float] = []
        # the kinds in a random order, each once before any comes again (few faults per seed)
        self._next: list[str] = []
        # a SIGKILL waits while a service is away or a recovery is measured (one disruption at once)
        self.disruption = asyncio.Lock()

    async def inject(self, phase: str) -> None:
        """Inject one service fault (each kind in turn, in a random order), then send a webhook
        through the intake that must land in PostgreSQL; the seconds from the service's return to
        that row are the recovery time."""
        if not self._next:
            self._next = self._rng.sample(SERVICE_FAULTS, len(SERVICE_FAULTS))
        fault = self._next.pop()
        async with self.disruption:
            if fault == "rabbitmq_restart":
                await self._faults.rabbitmq_restart(down_s=self._rng.uniform(0.2, 3.0))
            elif fault == "rabbitmq_connections_closed":
                await self._faults.rabbitmq_close_connections()
            elif fault == "postgres_restart":
                await self._faults.postgres_restart(down_s=self._rng.uniform(0.2, 3.0))
            else:
                await self._faults.postgres_terminate(self._database)
            back = time.monotonic()
            self._tally[f"faults_during_{phase}"] += 1
            probe = outages.card_event()
            await deliver(self._client, self._roles, self._path, probe)
            await factories.until(
                lambda: _recorded(
                    self._pool, "SELECT 1 FROM events WHERE event_id = $1", probe["id"]
                ),
                within_s=RECOVERY_WITHIN_S,
                what=f"a webhook accepted after {fault} landing in PostgreSQL",
                every_s=0.05,
            )
            self.recoveries.append(time.monotonic() - back)

    async def during(
        self, phase: str, work: asyncio.Task[Any], count: int, *, after: str | None = None
    ) -> None:
        """Up to ``count`` faults at random moments while ``work`` runs; with ``after``, the first
        once that query finds a row (the work has begun: a flush has an attempt recorded)."""
        if after is not None:
            while not await _recorded(self._pool, after):
                if work.done():
                    return
                await asyncio.sleep(0.02)
        for _ in range(count):
            await asyncio.wait({work}, timeout=self._rng.uniform(0.0, 1.0))
            if work.done():
                return
            await self.inject(phase)

    async def kill_consumer_during(self, work: asyncio.Task[Any]) -> None:
        """SIGKILL the consumer once at a random moment while ``work`` runs (7 seeds in 10)."""
        if self._rng.random() < 0.7:
            await asyncio.wait({work}, timeout=self._rng.uniform(0.3, 2.0))
            if not work.done():
                async with self.disruption:
                    await self._roles.kill_consumer()
                    # no service fault before the new consumer is subscribed: one that cannot
                    # start exits 1 at once, by design, and would need a supervisor
                    await factories.until(
                        lambda: _consumers(self._settings),
                        within_s=RECOVERY_WITHIN_S,
                        what="the restarted consumer subscribed",
                        every_s=0.1,
                    )


async def _intake(
    rng: random.Random,
    client: httpx.AsyncClient,
    roles: Roles,
    pool: asyncpg.Pool,
    path: str,
    events: list[dict[str, Any]],
) -> None:
    """Every webhook of the day accepted, then every event recorded by the consumer.

    They go in bursts of one to eight at once (so the intake also puts several events in one
    message), paced as if one by one (the faults and kills land while the intake runs).
    """
    sent = 0
    while sent < len(events):
        burst = events[sent : sent + rng.randint(1, 8)]
        sent += len(burst)
        await asyncio.gather(*(deliver(client, roles, path, event) for event in burst))
        await asyncio.sleep(rng.uniform(0.0, 0.12) * len(burst))
    wanted = sorted({str(e["id"]) for e in events})
    await factories.until(
        lambda: _recorded(
            pool, "SELECT count(*) = $2 FROM events WHERE event_id = ANY($1)", wanted, len(wanted)
        ),
        within_s=2 * RECOVERY_WITHIN_S,
        what="every accepted webhook recorded",
        every_s=0.05,
    )


async def _flush_with_crashes(
    rng: random.Random,
    settings: config.Settings,
    logs: pathlib.Path,
    tally: collections.Counter[str],
) -> None:
    """`relay flush --now` processes SIGKILLed at random moments until one ends by itself."""
    for attempt in range(6):
        flush = processes.Role(settings, "flush", "--now", log_path=logs / f"flush-{attempt}.log")
        try:
            if rng.random() < 0.6 and await flush.exited(rng.uniform(0.5, 2.5)) is None:
                flush.kill()
                await flush.exited(10)
                tally["flushes_killed"] += 1
                continue
            code = await flush.exited(120)
            assert code is not None, f"a flush still runs after 120 s: {flush.log()}"
            return
        finally:
            flush.close()


async def _consumers(settings: config.Settings) -> int:
    """How many consumers RabbitMQ lists on the events queue."""
    connection = await aio_pika.connect(settings.amqp_url.reveal(), timeout=5)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.events_queue, passive=True)
        return int(queue.declaration_result.consumer_count or 0)


async def _last_webhook_becomes_a_document(
    client: httpx.AsyncClient,
    roles: Roles,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    path: str,
    seed: int,
) -> Planned:
    """After the last fault, a new receipt's webhook is accepted and becomes a document."""
    content = files.pdf(size=4096, seed=1_000_000 + seed)
    attachment = qonto.add_attachment(
        content, file_name="after-the-faults", content_type="application/pdf"
    )
    tx = qonto.add_transaction(
        side="debit", amount="99.10", label="LAST SHOP", attachment_ids=[attachment]
    )
    await deliver(client, roles, path, qonto.transaction_event(tx))
    await factories.until(
        lambda: _recorded(
            pool, "SELECT 1 FROM documents WHERE qonto_attachment_id = $1", attachment
        ),
        within_s=RECOVERY_WITHIN_S,
        what="the last webhook becoming a document",
        every_s=0.05,
    )
    return Planned(attachment, "eligible", hashlib.sha256(content).hexdigest())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(SEEDS))
async def test_exactly_once_under_faults(
    seed: int,
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """Service faults, upstream faults and SIGKILLs: 0 duplicates in Loop, 0 lost, in doubt
    bounded by ambiguity, and every role alive and working at the end."""
    rng = random.Random(seed)
    settings = dataclasses.replace(
        upstream_settings,
        upload_concurrency=4,
        upload_concurrency_per_firm=2,
        outage_limit_s=OUTAGE_LIMIT_S,
    )
    connection_id = await factories.connect(settings, pool, qonto)
    path = settings.webhook_path(str(connection_id))
    planned, events = _plan_day(rng, qonto)
    qonto.faults.random_plan(seed, 0.08)
    loop.faults.random_plan(seed, 0.2)
    loop.faults.retry_after = "0.05"
    tally: collections.Counter[str] = collections.Counter()

    roles = Roles(settings, tmp_path, tally)
    try:
        async with httpx.AsyncClient() as client, supervised(roles):
            await roles.serve.ready()
            chaos = Chaos(rng, faults, roles, client, pool, settings, path, tally)
            intake = asyncio.create_task(_intake(rng, client, roles, pool, path, events))
            await asyncio.gather(
                intake,
                chaos.during("intake", intake, rng.choice([1, 1, 2])),
                chaos.kill_consumer_during(intake),
            )
            flush = asyncio.create_task(_flush_with_crashes(rng, settings, tmp_path, tally))
            await asyncio.gather(
                flush,
                chaos.during(
                    "flush", flush, rng.choice([1, 1, 2]), after="SELECT 1 FROM uploads LIMIT 1"
                ),
            )
            qonto.faults.random_plan(seed, 0.0)
            loop.faults.random_plan(seed, 0.0)
            planned.append(
                await _last_webhook_becomes_a_document(client, roles, pool, qonto, path, seed)
            )
            await factories.until(
                lambda: _consumers(settings),
                within_s=RECOVERY_WITHIN_S,
                what="a consumer subscribed to the events queue",
            )
            assert roles.serve.alive(), roles.exits
            assert roles.consume.alive(), roles.exits
            messages, several = await _intake_messages(client, roles.serve.url)
            tally["intake_messages"] += messages
            tally["intake_messages_of_several_events"] += several
        stdout = tmp_path / "final-flush.json"
        final = processes.Role(
            settings,
            "flush",
            "--now",
            "--json",
            log_path=tmp_path / "final-flush.log",
            stdout_path=stdout,
        )
        code = await final.exited(120)
        final.close()
    finally:
        roles.close()
    stderr = final.log()
    assert code in (0, 1), f"the last flush did not finish (exit {code}):\n{stderr}"
    report = orjson.loads(stdout.read_bytes())  # it ran to its report
    assert report["connections"], stderr

    rows = await _fetch(
        pool, "SELECT connection_id, qonto_attachment_id, state, reason, sha256 FROM documents"
    )
    docs = {r["qonto_attachment_id"]: r for r in rows}
    stored = collections.Counter(s.sha256 for s in loop.stored_by_dossier("ACME001"))
    lost: list[tuple[str, list[Any]]] = []
    groups: dict[str, list[Planned]] = collections.defaultdict(list)
    for item in planned:
        if item.kind in ("eligible", "duplicate"):
            groups[item.sha256].append(item)  # the same bytes: whichever comes first is sent
        elif item.kind == "heic":
            doc = docs[item.attachment_id]
            assert (doc["state"], doc["reason"]) == ("skipped", "unsupported type: HEIC image")
        elif item.kind == "deleted_404":
            doc = docs[item.attachment_id]
            assert (doc["state"], doc["reason"]) == ("skipped", models.SKIP_DELETED), (
                dict(doc),
                report,
                stderr,
            )
        else:  # deleted_event: never a document, or one skipped as deleted
            doc = docs.get(item.attachment_id)
            assert doc is None or (doc["state"], doc["reason"]) == ("skipped", models.SKIP_DELETED)
    for sha, items in groups.items():
        group = [docs.get(i.attachment_id) for i in items]
        sent = [d for d in group if d is not None and d["state"] in ("uploaded", "in_doubt")]
        if len(sent) != 1:
            lost.append((sha, [dict(d) if d else None for d in group]))
            continue
        if sent[0]["state"] == "uploaded":
            assert stored[sha] == 1, f"uploaded but stored {stored[sha]} times"
        for d in group:
            if d is not sent[0]:
                assert d is not None
                assert d["reason"].startswith(models.SKIP_DUPLICATE)
    in_doubt = sum(1 for r in rows if r["state"] == "in_doubt")
    unsettled = [r for r in rows if r["state"] in ("uploading", "pending", "failed")]
    duplicates = [sha for sha, n in stored.items() if n > 1]
    TOTALS.update(
        seeds=1,
        documents=len(planned),
        duplicates=len(duplicates),
        lost=len(lost),
        in_doubt=in_doubt,
        faults_injected=sum(qonto.faults.injected.values()) + sum(loop.faults.injected.values()),
        ambiguous_faults=loop.faults.ambiguous,
        **tally,
        **faults.injected,
    )
    if chaos.recoveries:
        WORST["worst_recovery_s"] = max(WORST.get("worst_recovery_s", 0.0), *chaos.recoveries)
    assert duplicates == []
    assert lost == []
    assert unsettled == []
    # each in-doubt document comes from an ambiguous answer or from a flush killed mid-request
    # (at most upload_concurrency requests in flight when it died)
    [died] = await _fetch(
        pool,
        "SELECT count(DISTINCT document_id) FROM uploads WHERE outcome = 'in_doubt' AND error = $1",
        recovery.DIED_REASON,
    )
    killed_mid_request = int(died[0])
    TOTALS.update(in_doubt_from_kills=killed_mid_request)
    assert in_doubt - killed_mid_request <= loop.faults.ambiguous
    assert killed_mid_request <= tally["flushes_killed"] * settings.upload_concurrency
    assert all(r["reason"] for r in rows if r["state"] != "uploaded")
    assert {r["connection_id"] for r in rows} == {connection_id}
