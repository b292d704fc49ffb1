"""The scheduler: when a day runs, what a failed run leaves, and the periodic dossier check.

Complements tests/integration/test_scan_and_schedule.py (two schedulers → one run, a missed day runs
at start, a crashed run is resumed, the real flush wired in).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import pytest

from consumers import scheduler
from relay import config, errors
from relay.domain import report
from relay.sandbox import cegid as cegid_sandbox
from relay.upstreams import cegid
from tests.integration import factories

DAY = dt.date(2026, 11, 24)


class FakeClock:
    """A clock the scheduler reads and its injected wait moves forward."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        self.waits: list[float] = []

    def __call__(self) -> dt.datetime:
        return self.now

    async def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += dt.timedelta(seconds=seconds)
        await asyncio.sleep(0)


class Recorder:
    """A flush stand-in recording when (by the fake clock) it was called."""

    def __init__(self, clock: FakeClock | None = None, fail: errors.RelayError | None = None):
        self.clock, self.fail = clock, fail
        self.called_at: list[dt.datetime] = []

    async def __call__(
        self, settings: config.Settings, pool: asyncpg.Pool, *, run_kind: str, run_id: int | None
    ) -> report.RunReport:
        assert run_kind == "scheduled"
        assert run_id is not None
        self.called_at.append(self.clock() if self.clock else dt.datetime.now(dt.UTC))
        if self.fail is not None:
            raise self.fail
        now = dt.datetime.now(dt.UTC)
        return report.RunReport(kind=run_kind, started_at=now, finished_at=now)


async def _finished_run(pool: asyncpg.Pool, day: dt.date) -> None:
    await pool.execute(
        "INSERT INTO runs (kind, scheduled_for, finished_at) VALUES ('scheduled', $1, now())", day
    )


async def test_the_scheduler_fires_at_flush_at_and_not_before(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """Yesterday ran; started at 19:58:30, the day's run starts at 20:00, within one poll."""
    await _finished_run(pool, DAY - dt.timedelta(days=1))
    clock = FakeClock(dt.datetime(2026, 11, 24, 19, 58, 30, tzinfo=dt.UTC))
    stop = asyncio.Event()
    recorder = Recorder(clock)

    async def wait(seconds: float) -> None:
        await clock.wait(seconds)
        if recorder.called_at or len(clock.waits) > 10:
            stop.set()

    await scheduler.run_forever(
        settings,
        pool,
        stop=stop,
        now=clock,
        flush=recorder,
        wait=wait,
        dossier_check_every=None,
    )
    slot = dt.datetime(2026, 11, 24, 20, 0, tzinfo=dt.UTC)
    assert len(recorder.called_at) == 1
    assert slot <= recorder.called_at[0] < slot + dt.timedelta(seconds=scheduler.POLL_S)
    assert all(0 < w <= scheduler.POLL_S for w in clock.waits)
    days = await pool.fetch("SELECT scheduled_for FROM runs WHERE finished_at IS NOT NULL")
    assert sorted(r["scheduled_for"] for r in days) == [DAY - dt.timedelta(days=1), DAY]


def test_the_wait_is_capped_by_the_poll_and_ends_at_the_slot() -> None:
    """Far from the slot the scheduler polls every POLL_S; 10 s before it, it waits 10 s."""
    at = dt.time(20, 0)
    morning = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)
    close = dt.datetime(2026, 11, 24, 19, 59, 50, tzinfo=dt.UTC)
    assert scheduler.seconds_until_next_check(morning, at) == scheduler.POLL_S
    assert scheduler.seconds_until_next_check(close, at) == 10.0


async def test_nothing_runs_when_the_latest_slot_already_ran(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """At 21:00 after today's run finished, run_due does nothing."""
    await _finished_run(pool, DAY)
    recorder = Recorder()
    now = dt.datetime(2026, 11, 24, 21, 0, tzinfo=dt.UTC)
    assert await scheduler.run_due(settings, pool, now, flush=recorder) is False
    assert recorder.called_at == []


async def test_a_failed_flush_leaves_the_day_to_be_run_again(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """Cegid unavailable during the flush: the day's row stays unfinished and the next poll reruns it."""
    now = dt.datetime(2026, 11, 24, 20, 0, 1, tzinfo=dt.UTC)
    failing = Recorder(fail=errors.CegidUnavailable("Cegid Loop answered HTTP 503"))
    with pytest.raises(errors.CegidUnavailable):
        await scheduler.run_due(settings, pool, now, flush=failing)
    assert await pool.fetchval("SELECT finished_at FROM runs WHERE scheduled_for = $1", DAY) is None
    working = Recorder()
    assert await scheduler.run_due(settings, pool, now, flush=working) is True
    assert len(working.called_at) == 1
    rows = await pool.fetch("SELECT finished_at, report FROM runs WHERE kind = 'scheduled'")
    assert len(rows) == 1
    assert rows[0]["finished_at"] is not None
    assert rows[0]["report"]["kind"] == "scheduled"


async def test_run_forever_survives_a_failed_run(
    settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """A flush that raises is logged; the scheduler keeps polling and retries the day."""
    clock = FakeClock(dt.datetime(2026, 11, 24, 20, 0, 1, tzinfo=dt.UTC))
    stop = asyncio.Event()
    recorder = Recorder(clock, fail=errors.CegidUnavailable("down"))

    async def wait(seconds: float) -> None:
        await clock.wait(seconds)
        if len(recorder.called_at) >= 2:
            stop.set()

    await scheduler.run_forever(
        settings,
        pool,
        stop=stop,
        now=clock,
        flush=recorder,
        wait=wait,
        dossier_check_every=None,
    )
    assert len(recorder.called_at) == 2
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE finished_at IS NULL") == 1


async def test_the_dossier_check_flags_a_lost_dossier_and_clears_it_once_restored(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Key unlinked from the dossier: needs attention; linked again: active, checked time set."""
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=7)
    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=["OTHER002"])
    async with cegid.http_client(upstream_settings) as http:
        refused = await scheduler.check_dossiers(upstream_settings, pool, http, now=later)
        flagged = await pool.fetchrow("SELECT state, state_reason FROM connections")
        assert flagged is not None
        state, reason = flagged
        assert refused["refused"] == 1
        assert state == "needs_attention"
        assert reason.startswith(scheduler.CEGID_REASON)
        assert "ACME001" in reason

        loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=["ACME001"])
        passed = await scheduler.check_dossiers(upstream_settings, pool, http, now=later)
    row = await pool.fetchrow("SELECT state, state_reason, dossier_checked_at FROM connections")
    assert row is not None
    state, reason, checked = row
    assert passed["checked"] == 1
    assert (state, reason) == ("active", None)
    assert checked > later - dt.timedelta(hours=7)


async def test_a_recently_checked_dossier_is_not_checked_again(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Checked when the connection was added: within six hours nothing is asked of Cegid."""
    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=["OTHER002"])
    async with cegid.http_client(upstream_settings) as http:
        counts = await scheduler.check_dossiers(upstream_settings, pool, http)
    assert counts == {"checked": 0, "refused": 0, "unavailable": 0}
    assert await pool.fetchval("SELECT state FROM connections") == "active"
