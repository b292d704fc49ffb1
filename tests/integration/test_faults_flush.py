"""`relay flush --now` losing PostgreSQL under uploads in flight (fault tests, run apart).

Sixty receipts, the Cegid sandbox answering each deposit in half a second (four in flight per firm),
and PostgreSQL stopped for five seconds, or every backend of the flush's database terminated, while
deposits are out: the flush stops claiming, lets its deposits finish, records their answers once
PostgreSQL is back and claims the rest. Past RELAY_OUTAGE_LIMIT it stops with one line; a later
flush sends nothing twice and leaves in doubt only the deposits whose answers were not recorded.

A relay in front of PostgreSQL (:class:`Partition`) cuts one flush off while the database stays up
for another (which then takes the first for dead), or cuts right after a statement's execution was
sent, so that it commits and its answer is lost (a claim, an attempt row).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import pathlib
import re
import time
import urllib.parse
import uuid

import asyncpg
import pytest

from consumers import flusher, recovery
from relay import config
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from relay.store import db
from tests import services
from tests.integration import factories, processes

pytestmark = pytest.mark.fault

DOCUMENTS = 60
CEGID_ANSWERS_IN_S = 0.5
OUTAGE_S = 5.0


async def _seed(
    pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox, connection_id: uuid.UUID
) -> set[str]:
    """Sixty pending receipts; the sha256 of each file."""
    shas = set()
    for seed in range(DOCUMENTS):
        content = files.pdf(seed=1000 + seed)
        tx, _ = factories.receipt(qonto, content, seed=seed)
        await factories.ingest_transaction(pool, connection_id, tx)
        shas.add(hashlib.sha256(content).hexdigest())
    return shas


async def _deposits_in_flight(loop: cegid_sandbox.CegidSandbox, flush: processes.Role) -> None:
    """Until the flush has deposits out and has recorded a few before (it is mid-run)."""
    await factories.until(
        lambda: not flush.alive() or (len(loop.stored) >= 8 and loop.in_flight >= 3),
        within_s=60,
        what="deposits in flight",
    )
    assert flush.alive(), flush.log()


async def _states(settings: config.Settings) -> dict[str, int]:
    conn = await asyncpg.connect(settings.database_url.reveal(), timeout=10)
    try:
        rows = await conn.fetch("SELECT state, count(*) AS n FROM documents GROUP BY state")
    finally:
        await conn.close()
    return {r["state"]: r["n"] for r in rows}


async def _shas(settings: config.Settings, state: str) -> set[str]:
    conn = await asyncpg.connect(settings.database_url.reveal(), timeout=10)
    try:
        rows = await conn.fetch("SELECT sha256 FROM documents WHERE state = $1", state)
    finally:
        await conn.close()
    return {r["sha256"] for r in rows}


def _not_json(role: processes.Role) -> list[str]:
    """What the process printed on standard error besides its JSON log lines."""
    lines = role.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("{")]


def _answered_between(loop: cegid_sandbox.CegidSandbox, start: float, end: float) -> int:
    """Deposits Loop stored (and answered) between two time.time() values."""
    return sum(1 for s in loop.stored if start < s.received_at.timestamp() < end)


async def test_postgresql_stopped_for_seconds_mid_flush_loses_no_answer(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """PostgreSQL stopped 5 s while deposits are out: their answers are recorded once it is back,
    the run claims the rest; every file in Loop once, none in doubt, exit 0."""
    shas = await _seed(pool, qonto, connection_id)
    loop.latency_s = CEGID_ANSWERS_IN_S
    flush = processes.Role(upstream_settings, "flush", "--now", log_path=tmp_path / "flush.log")
    try:
        await _deposits_in_flight(loop, flush)
        stopping = time.time()
        await faults.postgres_stop()
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for something
        await faults.postgres_start()
        restarted = time.time()
        code = await flush.exit_code(within_s=180)
        assert code == 0, flush.log()
        assert flush.events("flush_database_lost")
        assert flush.events("flush_database_back")
    finally:
        flush.close()
    assert loop.duplicates() == []
    assert {s.sha256 for s in loop.stored} == shas
    assert len(loop.stored) == DOCUMENTS
    assert await _states(upstream_settings) == {"uploaded": DOCUMENTS}
    back = dt.datetime.fromisoformat(flush.events("flush_database_back")[0]["timestamp"])
    answered = _answered_between(loop, stopping, min(restarted, back.timestamp()))
    assert answered >= 1, "no deposit was out when PostgreSQL stopped"
    assert _not_json(flush) == []
    print(  # the figures of the report (pytest -s)
        f"\n[stop] answered while the flush was without PostgreSQL: {answered}; outage seen "
        f"{flush.events('flush_database_back')[0]['down_s']} s; uploaded {DOCUMENTS}, in doubt 0"
    )


async def test_terminated_backends_mid_flush_lose_no_answer(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """Every backend of the flush's database terminated twice while deposits are out (its lease
    included): the same, every file in Loop once, none in doubt, exit 0."""
    shas = await _seed(pool, qonto, connection_id)
    loop.latency_s = CEGID_ANSWERS_IN_S
    database = db.database_name(upstream_settings.database_url.reveal())
    flush = processes.Role(upstream_settings, "flush", "--now", log_path=tmp_path / "flush.log")
    try:
        await _deposits_in_flight(loop, flush)
        terminated = [await faults.postgres_terminate(database)]
        seen = len(loop.stored)
        await factories.until(
            lambda: not flush.alive() or len(loop.stored) >= seen + 8, within_s=60
        )
        terminated.append(await faults.postgres_terminate(database))
        code = await flush.exit_code(within_s=180)
        assert code == 0, flush.log()
        assert flush.events("flush_database_back")
    finally:
        flush.close()
    assert loop.duplicates() == []
    assert {s.sha256 for s in loop.stored} == shas
    assert len(loop.stored) == DOCUMENTS
    assert await _states(upstream_settings) == {"uploaded": DOCUMENTS}
    assert _not_json(flush) == []
    print(f"\n[terminate] backends terminated {terminated}; uploaded {DOCUMENTS}, in doubt 0")


async def test_an_outage_past_the_limit_stops_with_one_line_and_nothing_goes_twice(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """PostgreSQL gone longer than RELAY_OUTAGE_LIMIT: exit 1 with one line saying what was left;
    the next flush sends nothing twice, and only deposits whose answers were not recorded are in
    doubt."""
    shas = await _seed(pool, qonto, connection_id)
    loop.latency_s = CEGID_ANSWERS_IN_S
    settings = dataclasses.replace(upstream_settings, outage_limit_s=2)
    flush = processes.Role(settings, "flush", "--now", log_path=tmp_path / "flush.log")
    try:
        await _deposits_in_flight(loop, flush)
        await faults.postgres_stop()
        code = await flush.exit_code(within_s=120)
    finally:
        flush.close()
    await faults.postgres_start()
    assert code == 1, flush.log()
    [line] = _not_json(flush)
    assert line.startswith("relay: PostgreSQL unavailable for more than 2 s"), line
    assert "in_doubt at the next flush's recovery" in line, line
    stored_first = {s.sha256 for s in loop.stored}
    recorded = await _shas(upstream_settings, "uploaded")
    unrecorded = stored_first - recorded
    sent = re.search(r"(\d+) document\(s\) sent to Cegid Loop", line)
    assert (int(sent.group(1)) if sent else 0) == len(unrecorded), line

    await pool.expire_connections()
    later = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert later.recovered["in_doubt"] == len(unrecorded)
    assert loop.duplicates() == []
    assert {s.sha256 for s in loop.stored} == shas
    assert len(loop.stored) == DOCUMENTS
    assert await _shas(upstream_settings, "in_doubt") == unrecorded
    states = await _states(upstream_settings)
    assert states == {"uploaded": DOCUMENTS - len(unrecorded), "in_doubt": len(unrecorded)} or (
        not unrecorded and states == {"uploaded": DOCUMENTS}
    )
    print(
        f"\n[limit] first flush: {len(recorded)} recorded, {len(unrecorded)} answers unrecorded; "
        f"after the next flush: uploaded {states.get('uploaded', 0)}, in doubt "
        f"{states.get('in_doubt', 0)}"
    )


SSL_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: they precede the startup message


class _Statements:
    """One client connection's messages to PostgreSQL, read as they pass: the text of each
    prepared statement, and the Sync that ends an execution of one whose text holds a pattern."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False
        self._texts: dict[bytes, bytes] = {}
        self._executing = False

    def feed(self, data: bytes, pattern: bytes | None) -> int | None:
        """Read ``data``; the offset in it just past such a Sync, when there is one."""
        before = len(self._buffer)
        buffer = self._buffer + data
        at = 0
        while True:
            if not self._started:  # untyped: the startup message, after any SSL request
                if len(buffer) - at < 8:
                    break
                length = int.from_bytes(buffer[at : at + 4], "big")
                if len(buffer) - at < length:
                    break
                code = int.from_bytes(buffer[at + 4 : at + 8], "big")
                self._started = code not in SSL_REQUESTS
                at += length
                continue
            if len(buffer) - at < 5:
                break
            kind = buffer[at : at + 1]
            end = at + 1 + int.from_bytes(buffer[at + 1 : at + 5], "big")
            if len(buffer) < end:
                break
            body = buffer[at + 5 : end]
            if kind == b"P":  # Parse: statement name, text
                name, _, rest = body.partition(b"\0")
                self._texts[name] = rest.partition(b"\0")[0]
            elif kind == b"B":  # Bind: portal, statement name
                name = body.partition(b"\0")[2].partition(b"\0")[0]
                self._executing = pattern is not None and pattern in self._texts.get(name, b"")
            elif kind == b"S" and self._executing:
                return end - before
            at = end
        self._buffer = buffer[at:]
        return None


class Partition:
    """A TCP relay to PostgreSQL for one process: :meth:`cut` closes its connections and refuses
    new ones (PostgreSQL ends those sessions, freeing their advisory locks), :meth:`heal` lets
    it through again; :meth:`trip_on` cuts right after PostgreSQL was sent the execution of a
    statement, so that it commits and its answer is lost. The database stays up for the others."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = processes.free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pattern: bytes | None = None
        self._dropping = False
        self.tripped = asyncio.Event()

    def dsn(self, url: str) -> str:
        """``url`` through this relay, in clear (its messages are read)."""
        parts = urllib.parse.urlsplit(url)
        netloc = f"{parts.username}@127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc, query="sslmode=disable").geturl()

    def trip_on(self, text: bytes) -> None:
        self._pattern = text

    async def heal(self) -> None:
        self._dropping = False
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()

    async def _handle(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            server, to_server = await asyncio.open_connection(*self._target)
        except OSError:
            to_client.close()
            return
        self._writers |= {to_client, to_server}
        await asyncio.gather(self._up(client, to_server), self._down(server, to_client))
        self._writers -= {to_client, to_server}

    async def _up(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        statements = _Statements()
        try:
            while data := await source.read(65536):
                cut_at = statements.feed(data, self._pattern)
                if cut_at is not None:
                    self._pattern, self._dropping = None, True  # its answer never goes back
                    sink.write(data[:cut_at])
                    await sink.drain()
                    self.tripped.set()
                    await self.cut()
                    return
                sink.write(data)
                await sink.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            sink.close()

    async def _down(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while (data := await source.read(65536)) and not self._dropping:
                sink.write(data)
                await sink.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            sink.close()


async def _through(
    partition: Partition, settings: config.Settings, tmp_path: pathlib.Path
) -> processes.Role:
    """`relay flush --now` reaching PostgreSQL through ``partition``."""
    await partition.heal()
    proxied = partition.dsn(settings.database_url.reveal())
    return processes.Role(
        dataclasses.replace(settings, database_url=config.Secret(proxied)),
        "flush",
        "--now",
        log_path=tmp_path / "flush.log",
    )


def _partition(settings: config.Settings) -> Partition:
    url = urllib.parse.urlsplit(settings.database_url.reveal())
    return Partition(url.hostname or "127.0.0.1", url.port or 5432)


async def test_a_flush_cut_off_from_postgresql_and_taken_for_dead_sends_nothing_twice(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    tmp_path: pathlib.Path,
) -> None:
    """A flush cut off from PostgreSQL while deposits are out loses its lease; another flush takes
    its worker for dead, recovers its documents (in doubt when an attempt was committed) and sends
    the rest. Once the first one is back it sends none of what the other took, and Loop's 2xx to
    its deposits still land: every file in Loop once, and in doubt only an attempt it committed
    without learning it (never sent), which it names."""
    shas = await _seed(pool, qonto, connection_id)
    loop.latency_s = CEGID_ANSWERS_IN_S
    partition = _partition(upstream_settings)
    first = await _through(partition, upstream_settings, tmp_path)
    try:
        await _deposits_in_flight(loop, first)
        await partition.cut()
        await factories.until(lambda: bool(first.events("flush_database_lost")), within_s=30)
        second = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
        await partition.heal()
        code = await first.exit_code(within_s=180)
    finally:
        first.close()
        await partition.cut()
    assert second.recovered["in_doubt"] >= 1, second.recovered  # deposits of the first, out
    assert first.events("flush_lease_retaken")
    assert first.events("document_transition_lost")  # what the second one took: not sent
    assert loop.duplicates() == []
    # the ledger's rule stands: what the second flush settled in doubt stays so, unless the first
    # one's deposit landed (Loop's 2xx is recorded); in doubt is then only an attempt row the
    # first one committed without learning it, never sent, and the first one says so
    in_doubt = await _shas(upstream_settings, "in_doubt")
    stored = {s.sha256 for s in loop.stored}
    assert stored | in_doubt == shas
    assert not stored & in_doubt
    assert len(first.events("document_in_doubt_never_sent")) == len(in_doubt)
    assert await _states(upstream_settings) == {
        "uploaded": DOCUMENTS - len(in_doubt),
        **({"in_doubt": len(in_doubt)} if in_doubt else {}),
    }
    print(
        f"\n[taken for dead] the second flush recovered {second.recovered} and uploaded "
        f"{second.totals()['uploaded']}; the first one exited {code}, found "
        f"{len(first.events('document_transition_lost'))} documents taken; in Loop "
        f"{len(loop.stored)}, in doubt (never sent, said so) {len(in_doubt)}"
    )


async def _lock_holder(pool: asyncpg.Pool, worker: int) -> int | None:
    """The backend holding a worker's advisory lock, if any."""
    pid = await pool.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2",
        recovery.WORKER_LOCK_SPACE,
        worker,
    )
    return int(pid) if pid is not None else None


async def test_the_worker_lease_is_kept_while_held_and_re_taken_once_its_backend_is_gone(
    settings: config.Settings, pool: asyncpg.Pool, faults: services.Services
) -> None:
    """A lease whose connection still holds the lock is left as it is; once its backend is
    terminated (the lock is free: a recovery would take the worker for dead) it is re-taken."""
    lease = await recovery.Lease.take(pool)
    try:
        holder = await _lock_holder(pool, lease.worker)
        assert holder is not None
        await lease.keep()
        assert await _lock_holder(pool, lease.worker) == holder
        await faults.postgres_terminate(db.database_name(settings.database_url.reveal()))
        await factories.until(lambda: lease.lost, within_s=10, what="the lease seen lost")
        await pool.expire_connections()
        assert await _lock_holder(pool, lease.worker) is None
        await lease.keep()
        assert not lease.lost
        retaken = await _lock_holder(pool, lease.worker)
        assert retaken not in (None, holder)
        assert not await pool.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", recovery.WORKER_LOCK_SPACE, lease.worker
        )
    finally:
        await lease.release()
    assert await _lock_holder(pool, lease.worker) is None


async def test_a_claim_whose_answer_is_lost_is_taken_up_once_postgresql_answers(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    tmp_path: pathlib.Path,
) -> None:
    """A claim commits and the connection goes before its answer: once PostgreSQL answers again
    the flush takes up the documents it holds without knowing it, and sends them in this run."""
    shas = await _seed(pool, qonto, connection_id)
    partition = _partition(upstream_settings)
    partition.trip_on(b"attempts = attempts + 1")  # claim_documents
    flush = await _through(partition, upstream_settings, tmp_path)
    try:
        await asyncio.wait_for(partition.tripped.wait(), 60)
        await factories.until(lambda: bool(flush.events("flush_database_lost")), within_s=30)
        await partition.heal()
        code = await flush.exit_code(within_s=180)
    finally:
        flush.close()
        await partition.cut()
    assert code == 0, flush.log()
    adopted = sum(e["count"] for e in flush.events("documents_adopted"))
    assert adopted >= 1, flush.log()
    assert loop.duplicates() == []
    assert {s.sha256 for s in loop.stored} == shas
    assert await _states(upstream_settings) == {"uploaded": DOCUMENTS}
    print(f"\n[claim answer lost] taken up {adopted}; uploaded {DOCUMENTS}, in doubt 0")


async def test_an_attempt_row_whose_answer_is_lost_is_closed_as_never_sent(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    tmp_path: pathlib.Path,
) -> None:
    """The attempt row commits and the connection goes before its answer (so nothing is sent
    under it): once PostgreSQL answers again that row is closed as never sent and the document
    goes under a new one; no attempt is left 'sending', nothing in doubt."""
    shas = await _seed(pool, qonto, connection_id)
    partition = _partition(upstream_settings)
    partition.trip_on(b"INSERT INTO uploads")  # start_upload
    flush = await _through(partition, upstream_settings, tmp_path)
    try:
        await asyncio.wait_for(partition.tripped.wait(), 60)
        await factories.until(lambda: bool(flush.events("flush_database_lost")), within_s=30)
        await partition.heal()
        code = await flush.exit_code(within_s=180)
    finally:
        flush.close()
        await partition.cut()
    assert code == 0, flush.log()
    assert loop.duplicates() == []
    assert {s.sha256 for s in loop.stored} == shas
    assert await _states(upstream_settings) == {"uploaded": DOCUMENTS}
    conn = await asyncpg.connect(upstream_settings.database_url.reveal(), timeout=10)
    try:
        outcomes = await conn.fetch("SELECT outcome, error FROM uploads")
    finally:
        await conn.close()
    never_sent = [r for r in outcomes if (r["error"] or "").startswith("never sent")]
    assert len(never_sent) >= 1
    assert {r["outcome"] for r in never_sent} == {"retry"}
    assert not [r for r in outcomes if r["outcome"] == "sending"]
    print(f"\n[attempt answer lost] closed as never sent {len(never_sent)}; uploaded {DOCUMENTS}")


async def test_an_unsent_attempt_a_recovery_put_in_doubt_is_named_by_the_flush(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    tmp_path: pathlib.Path,
) -> None:
    """The attempt row commits, its answer is lost, and another flush takes this one for dead
    meanwhile: the document is in doubt (the ledger's rule: an attempt row may have gone out)
    though it was never sent; the first flush writes nothing to it, sends nothing, and names it
    for the operator. Nothing is sent twice."""
    shas = await _seed(pool, qonto, connection_id)
    loop.latency_s = CEGID_ANSWERS_IN_S
    partition = _partition(upstream_settings)
    partition.trip_on(b"INSERT INTO uploads")
    first = await _through(partition, upstream_settings, tmp_path)
    try:
        await asyncio.wait_for(partition.tripped.wait(), 60)
        await factories.until(lambda: bool(first.events("flush_database_lost")), within_s=30)
        second = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
        await partition.heal()
        await first.exit_code(within_s=180)
    finally:
        first.close()
        await partition.cut()
    conn = await asyncpg.connect(upstream_settings.database_url.reveal(), timeout=10)
    try:
        doubted = {
            int(r["id"]): r["sha256"]
            for r in await conn.fetch("SELECT id, sha256 FROM documents WHERE state = 'in_doubt'")
        }
    finally:
        await conn.close()
    named = {int(e["document"]) for e in first.events("document_in_doubt_never_sent")}
    assert doubted, second.recovered
    assert set(doubted) == named
    stored = {s.sha256 for s in loop.stored}
    assert not stored & set(doubted.values())
    assert stored | set(doubted.values()) == shas
    assert loop.duplicates() == []
    print(
        f"\n[unsent attempt taken for dead] recovered {second.recovered}; in doubt, never sent "
        f"and named {len(named)}; in Loop {len(loop.stored)}"
    )
