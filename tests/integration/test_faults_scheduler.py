"""`relay scheduler` under a database that goes away beneath it (fault tests, run apart).

Between polls it pings PostgreSQL every few seconds: an outage is noticed within seconds, the
scheduler polls again with backoff and runs the due slot as soon as PostgreSQL answers; an outage
longer than RELAY_OUTAGE_LIMIT ends it with exit 1 and one line saying why.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from relay import config
from relay.sandbox import qonto as qonto_sandbox
from relay.store import db
from tests import services
from tests.integration import factories, outages, processes

pytestmark = pytest.mark.fault


@pytest.fixture
async def role(
    upstream_settings: config.Settings, tmp_path: pathlib.Path
) -> AsyncIterator[Callable[..., Awaitable[processes.Role]]]:
    """Start `relay scheduler` (info logs) and wait for the day's slot, run at once at start."""
    started: list[processes.Role] = []

    async def start(**env: str) -> processes.Role:
        process = processes.Role(
            upstream_settings,
            "scheduler",
            log_path=tmp_path / f"scheduler-{len(started)}.log",
            env={"RELAY_LOG_LEVEL": "info", **env},
        )
        started.append(process)
        await process.logged("scheduled_run_finished")
        return process

    yield start
    for process in started:
        process.close()


async def test_the_scheduler_runs_its_slot_once_postgresql_is_back(
    pool: asyncpg.Pool,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """PostgreSQL restarted while the scheduler waits for its next slot: it notices within seconds
    (a ping between polls), polls again with backoff and runs the due slot (its run row removed
    before the fault) once PostgreSQL answers, with no restart by hand."""
    process = await role()
    await pool.execute("DELETE FROM runs")  # the day's slot is due again
    await faults.postgres_stop()
    await process.logged("outage_started")
    await faults.postgres_start()
    await process.logged("outage_ended", within_s=30)
    await _until_runs(process, 2)
    finished = "SELECT count(*) FROM runs WHERE finished_at IS NOT NULL"
    assert await outages.fetchval(pool, finished) == 1
    assert process.alive()


async def test_backends_terminated_during_the_slot_leave_it_finished_once(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """The scheduler's backends terminated while the day's scan runs (Qonto slow to answer): the
    flush waits for PostgreSQL and the run finishes, once, with no restart by hand."""
    await factories.connect(upstream_settings, pool, qonto)
    qonto.faults.slow("/v2/", seconds=3, count=1)
    process = processes.Role(
        upstream_settings,
        "scheduler",
        log_path=tmp_path / "scheduler.log",
        env={"RELAY_LOG_LEVEL": "info"},
    )
    try:
        await process.logged("scheduled_run_started")
        await faults.postgres_terminate(db.database_name(upstream_settings.database_url.reveal()))
        await _until_runs(process, 1)
        assert process.events("flush_database_lost"), process.log()  # the fault did hit it
        assert process.events("flush_database_back"), process.log()
        finished = "SELECT count(*) FROM runs WHERE finished_at IS NOT NULL"
        assert await outages.fetchval(pool, finished) == 1
        assert process.alive()
    finally:
        process.close()


async def _until_runs(process: processes.Role, count: int) -> None:
    await factories.until(
        lambda: len(process.events("scheduled_run_finished")) >= count,
        within_s=30,
        what=f"{count} scheduled runs",
    )


async def test_postgresql_away_past_the_limit_ends_the_scheduler_with_exit_1(
    pool: asyncpg.Pool,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """RELAY_OUTAGE_LIMIT=3: PostgreSQL away longer than that, the scheduler exits 1 with one line
    naming PostgreSQL, for its supervisor to restart it."""
    process = await role(RELAY_OUTAGE_LIMIT="3")
    await faults.postgres_stop()
    assert await process.exit_code(within_s=30) == 1
    [line] = [
        line for line in process.log_path.read_text().splitlines() if not line.startswith("{")
    ]
    assert line.startswith(
        "relay: PostgreSQL unavailable for more than 3 s (RELAY_OUTAGE_LIMIT): relay scheduler"
    ), line
