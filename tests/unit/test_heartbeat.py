"""A role's heartbeat: what it reports, and that it never disturbs the role when PostgreSQL is away."""

from __future__ import annotations

import dataclasses

import pytest

from consumers import consume
from relay import config
from relay.domain import heartbeat


@pytest.fixture
def unreachable(unit_settings: config.Settings) -> config.Settings:
    """Settings whose PostgreSQL refuses connections (nothing listens on port 1)."""
    return dataclasses.replace(
        unit_settings, database_url=config.Secret("postgresql://postgres@127.0.0.1:1/relay")
    )


def test_a_consumer_holding_messages_without_settling_any_counts_its_wait(
    unit_settings: config.Settings,
) -> None:
    """Waiting starts at the first beat that sees messages in hand and restarts whenever a batch
    was settled since the previous beat; holding nothing (and subscribed) is no wait."""
    now = [1_000.0]
    progress = consume.Progress(subscribed=True)
    heart = heartbeat.Heartbeat(unit_settings, "consume", consumer=progress, clock=lambda: now[0])
    assert heart.row()["waiting_s"] is None
    progress.in_hand, progress.oldest_held_ms = 5, 1_700_000_000_000
    first = heart.row()
    assert first["waiting_s"] == 0.0
    assert first["in_hand"] == 5
    assert first["oldest_held_ms"] == 1_700_000_000_000
    now[0] += 90  # 90 s and nothing settled
    assert heart.row()["waiting_s"] == 90.0
    now[0] += 5
    progress.events += 5  # a batch settled since: the wait starts again
    assert heart.row()["waiting_s"] == 0.0
    progress.in_hand = 0
    assert heart.row()["waiting_s"] is None
    progress.subscribed = False  # no subscription is a wait too
    assert heart.row()["waiting_s"] == 0.0
    now[0] += 30
    assert heart.row()["waiting_s"] == 30.0
    progress.subscribed, progress.in_hand = True, 1  # messages now: a wait of its own
    assert heart.row()["waiting_s"] == 0.0


def test_the_other_roles_report_their_work_unit_and_count(unit_settings: config.Settings) -> None:
    """serve counts webhooks, the scheduler and flush documents; no consumer fields."""
    work = heartbeat.Work()
    heart = heartbeat.Heartbeat(unit_settings, "scheduler", command="run", work=work)
    assert heart.row()["work_age_s"] is None
    work.add(3)
    row = heart.row()
    assert (row["role"], row["command"], row["work_unit"], row["work_done"]) == (
        "scheduler",
        "run",
        "documents",
        3,
    )
    assert row["work_age_s"] is not None
    assert row["in_hand"] is None
    assert heartbeat.Heartbeat(unit_settings, "serve").row()["work_unit"] == "webhooks"


async def test_a_beat_postgresql_cannot_take_is_dropped_without_disturbing_the_role(
    unreachable: config.Settings,
) -> None:
    """PostgreSQL down: beats fail quietly (False), the role's block runs and ends normally."""
    ran = False
    async with heartbeat.beating(unreachable, "flush", interval_s=1) as heart:
        assert await heart.beat() is False
        assert await heart.beat() is False
        ran = True
    assert ran
    assert heart.beats == 0


async def test_a_role_failing_inside_the_heartbeat_keeps_its_own_error(
    unreachable: config.Settings,
) -> None:
    """The role's exception comes out unchanged; the heartbeat records why it stopped."""
    with pytest.raises(RuntimeError, match="the role's own"):
        async with heartbeat.beating(unreachable, "consume", interval_s=1):
            raise RuntimeError("the role's own")
    assert heartbeat.stop_reason(RuntimeError()) == "failed (RuntimeError)"
    assert heartbeat.stop_reason(None) == "stopped"
