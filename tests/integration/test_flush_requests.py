"""A flush asked for over HTTP: the admin API records it (202), a scheduler runs it under the lock of
scheduled runs and links its run; requests never make two flushes run at once."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from consumers import scheduler
from relay import config, errors, models
from relay.domain import connections, report
from relay.sandbox import qonto as qonto_sandbox
from relay.store import flush_requests, runs
from tests.integration import factories, processes
from tests.integration.web import conftest as web


@pytest.fixture
async def relay(upstream_settings: config.Settings) -> AsyncIterator[tuple[config.Settings, str]]:
    port = processes.free_port()
    settings = dataclasses.replace(
        upstream_settings, port=port, public_url=f"http://127.0.0.1:{port}"
    )
    async with web.serving(settings) as url:
        yield settings, url


async def _today_ran(pool: asyncpg.Pool, settings: config.Settings) -> None:
    """The day's scheduled run is done (so only the requested run can happen)."""
    day = scheduler.latest_slot(dt.datetime.now(dt.UTC), settings.flush_at).date()
    await pool.execute(
        "INSERT INTO runs (kind, scheduled_for, finished_at) VALUES ('scheduled', $1, now())", day
    )


async def test_a_flush_asked_over_http_is_run_by_the_scheduler_and_its_report_shown(
    relay: tuple[config.Settings, str],
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """POST /admin/flush answers 202 with a URL and runs nothing; the scheduler runs it; the URL
    then shows the run's report with the document uploaded."""
    settings, url = relay
    tx, _ = factories.receipt(qonto)
    await factories.ingest_transaction(pool, connection_id, tx)
    await _today_ran(pool, settings)
    token = {"Authorization": f"Bearer {settings.admin_token.reveal()}"}  # type: ignore[union-attr]
    async with httpx.AsyncClient(headers=token, timeout=10) as client:
        asked = await client.post(f"{url}/admin/flush", json={})
        assert asked.status_code == 202, asked.text
        follow = asked.json()["url"]
        assert asked.headers["location"] == follow
        assert asked.json()["state"] == "waiting"
        for garbage in ("%C2%B2", "99999999999999999999", "-1", "1%20OR%201=1"):
            assert (await client.get(f"{url}/admin/flush/{garbage}")).status_code == 404, garbage
        assert await pool.fetchval("SELECT count(*) FROM runs WHERE kind = 'manual'") == 0
        assert await pool.fetchval("SELECT state FROM documents") == "pending"

        stop = asyncio.Event()
        running = asyncio.create_task(
            scheduler.run_forever(settings, pool, stop=stop, dossier_check_every=None)
        )
        try:
            seen: dict[str, object] = {}

            async def finished() -> bool:
                seen.update((await client.get(follow)).json())
                return seen["state"] == "finished"

            deadline = asyncio.get_running_loop().time() + 30
            while not await finished():
                assert asyncio.get_running_loop().time() < deadline, seen
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await running
    assert isinstance(seen["report"], dict)
    assert seen["report"]["totals"]["uploaded"] == 1
    assert await pool.fetchval("SELECT state FROM documents") == "uploaded"
    run = await pool.fetchrow(
        "SELECT id, kind, finished_at FROM runs WHERE id = $1", seen["run_id"]
    )
    assert run["kind"] == "manual"
    assert run["finished_at"] is not None


async def test_an_unknown_connection_is_refused_and_nothing_is_asked(
    relay: tuple[config.Settings, str], pool: asyncpg.Pool
) -> None:
    """A flush of a connection that does not exist: 404, no request recorded."""
    settings, url = relay
    token = {"Authorization": f"Bearer {settings.admin_token.reveal()}"}  # type: ignore[union-attr]
    async with httpx.AsyncClient(headers=token) as client:
        answer = await client.post(f"{url}/admin/flush", json={"connection_id": str(uuid.uuid4())})
        missing = await client.get(f"{url}/admin/flush/999")
    assert answer.status_code == 404
    assert missing.status_code == 404
    assert await flush_requests.list_open(pool) == []


class Blocking:
    """A requested-flush stand-in that holds until released, counting flushes at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.running = 0
        self.most = 0
        self.run_ids: list[int | None] = []

    async def __call__(
        self,
        settings: config.Settings,
        pool: asyncpg.Pool,
        *,
        connection_id: uuid.UUID | None,
        since: dt.datetime | None,
        run_kind: str,
        run_id: int | None,
    ) -> report.RunReport:
        self.running += 1
        self.most = max(self.most, self.running)
        self.run_ids.append(run_id)
        self.entered.set()
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        now = dt.datetime.now(dt.UTC)
        return report.RunReport(kind=run_kind, started_at=now, finished_at=now)


async def test_two_requests_while_one_runs_wait_and_then_share_one_run(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """While a requested run holds the lock, two more requests run nothing; once it ends, one run
    serves both of them, and never two flushes at once."""
    flush = Blocking()
    first = await flush_requests.insert(
        pool, connection_id=None, since=None, requested_by="console"
    )
    running = asyncio.create_task(scheduler.run_requested(settings, pool, flush=flush))
    await asyncio.wait_for(flush.entered.wait(), 10)
    second = await flush_requests.insert(
        pool, connection_id=None, since=None, requested_by="console"
    )
    third = await flush_requests.insert(
        pool, connection_id=None, since=None, requested_by="admin API"
    )
    assert await scheduler.run_requested(settings, pool, flush=flush) is False
    flush.release.set()
    assert await running is True
    assert await scheduler.run_requested(settings, pool, flush=flush) is True
    assert await scheduler.run_requested(settings, pool, flush=flush) is False
    assert flush.most == 1
    assert len(flush.run_ids) == 2
    done = [await flush_requests.get(pool, r.id) for r in (first, second, third)]
    assert [d.state for d in done if d] == ["finished"] * 3
    runs = [d.run_id for d in done if d]
    assert runs[0] == flush.run_ids[0]
    assert runs[1] == runs[2] == flush.run_ids[1]


async def test_a_request_for_a_disconnected_connection_fails_with_the_reason(
    upstream_settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """The scheduler runs the real flush, which refuses a disconnected connection: the request is
    failed with that reason, its run row finished, and it is not tried again."""
    await connections.disconnect(pool, connection_id)
    asked = await flush_requests.insert(
        pool, connection_id=connection_id, since=None, requested_by="console"
    )
    assert await scheduler.run_requested(upstream_settings, pool) is True
    done = await flush_requests.get(pool, asked.id)
    assert done is not None
    assert done.state == "failed"
    assert done.error is not None
    assert models.ConnectionState.DISCONNECTED in done.error
    assert await pool.fetchval("SELECT finished_at FROM runs WHERE id = $1", done.run_id)
    assert await scheduler.run_requested(upstream_settings, pool) is False


async def test_a_request_for_a_connection_deleted_meanwhile_fails_with_the_reason(
    upstream_settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A connection deleted while its request waits: the request stays, and the scheduler fails it
    saying the connection is gone (never lost, never widened to every connection)."""
    asked = await flush_requests.insert(
        pool, connection_id=connection_id, since=None, requested_by="console"
    )
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM uploads WHERE document_id IN "
            "(SELECT id FROM documents WHERE connection_id = $1)",
            connection_id,
        )
        await conn.execute("DELETE FROM documents WHERE connection_id = $1", connection_id)
        await conn.execute("DELETE FROM events WHERE connection_id = $1", connection_id)
        await conn.execute("DELETE FROM resources WHERE connection_id = $1", connection_id)
        await conn.execute("DELETE FROM connections WHERE id = $1", connection_id)
    assert await scheduler.run_requested(upstream_settings, pool) is True
    done = await flush_requests.get(pool, asked.id)
    assert done is not None
    assert done.state == "failed"
    assert done.connection_id == connection_id
    assert done.error is not None
    assert str(connection_id) in done.error
    assert await scheduler.run_requested(upstream_settings, pool) is False


async def test_a_requested_run_that_finds_an_upstream_down_fails_once_with_the_reason(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """Qonto unavailable for the whole requested run: the request fails saying so and its run row is
    finished, instead of staying open to be run again at every poll with one more unfinished run."""
    calls: list[int | None] = []

    async def unavailable(*args: object, run_id: int | None, **kwargs: object) -> report.RunReport:
        calls.append(run_id)
        raise errors.QontoUnavailable("Qonto answered 503 three times")

    asked = await flush_requests.insert(
        pool, connection_id=None, since=None, requested_by="admin API"
    )
    assert await scheduler.run_requested(settings, pool, flush=unavailable) is True
    assert await scheduler.run_requested(settings, pool, flush=unavailable) is False
    assert len(calls) == 1
    done = await flush_requests.get(pool, asked.id)
    assert done is not None
    assert done.state == "failed"
    assert done.error is not None
    assert "Qonto answered 503" in done.error
    assert await pool.fetchval("SELECT finished_at FROM runs WHERE id = $1", calls[0])


async def test_a_request_whose_scheduler_died_is_run_again_and_its_first_run_closed(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """A scheduler killed during a requested run (request started, run row open, lock gone): the
    next scheduler runs it again as a new run, and the dead run is finished saying so, not left
    running forever on the Runs page."""
    asked = await flush_requests.insert(
        pool, connection_id=None, since=None, requested_by="console"
    )
    dead_run = await runs.insert_manual(pool)
    assert await flush_requests.start(pool, asked.id, dead_run) == [asked.id]
    flush = Blocking()
    flush.release.set()
    assert await scheduler.run_requested(settings, pool, flush=flush) is True
    done = await flush_requests.get(pool, asked.id)
    assert done is not None
    assert done.state == "finished"
    assert done.run_id == flush.run_ids[0] != dead_run
    dead = await runs.get(pool, dead_run)
    assert dead is not None
    assert dead.finished_at is not None
    assert "stopped" in str(dead.report)
