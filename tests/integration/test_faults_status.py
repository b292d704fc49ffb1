"""Heartbeats under a PostgreSQL that stops beneath a role (fault tests, run apart)."""

from __future__ import annotations

import dataclasses
import pathlib
import socket
import time

import asyncpg
import httpx
import pytest

from relay import config, errors
from relay.domain import stalls, status
from relay.store import db
from tests import services
from tests.integration import factories, processes

pytestmark = pytest.mark.fault


async def _served(
    settings: config.Settings, host: str, pid: int, within_s: float = 60
) -> stalls.Judged:
    """The serve role of this process once it is ok again (polled through status.check)."""
    last: list[stalls.Judged] = []

    async def back() -> bool:
        try:
            conn = await db.connect(settings)
        except errors.DatabaseUnavailable:
            return False
        try:
            report = await status.check(settings, conn, None, broker_error="not read")
        finally:
            await conn.close()
        last[:] = [j for j in report.matching("serve", host) if j.role.pid == pid]
        return bool(last) and last[0].state == stalls.OK and last[0].role.beat_age_s < 2

    await factories.until(
        back,
        within_s=within_s,
        what=lambda: f"the serve role's heartbeat coming back (last: {last})",
        every_s=0.2,
    )
    return last[0]


async def test_a_heartbeat_postgresql_cannot_take_never_disturbs_its_role(
    settings: config.Settings,
    pool: asyncpg.Pool,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """PostgreSQL stopped under `relay serve`: its beats fail (said once), webhooks are still
    accepted; PostgreSQL back, the beats resume by themselves, with the work done meanwhile."""
    beating = dataclasses.replace(settings, heartbeat_interval_s=1)
    connection_id = await factories.make_connection(pool, beating)
    serve = processes.Role(
        beating,
        "serve",
        log_path=tmp_path / "serve.log",
        env={"RELAY_WORKERS": "1", "RELAY_LOG_LEVEL": "info"},
    )
    try:
        await serve.ready()
        path = beating.webhook_path(str(connection_id))
        async with httpx.AsyncClient(base_url=serve.url) as client:

            async def accepted() -> int:
                body, headers = factories.signed(
                    {
                        "id": f"evt-{time.monotonic_ns()}",
                        "type": "v1/cards",
                        "organization_id": "org-test",
                        "data": {},
                    }
                )
                return (await client.post(path, content=body, headers=headers)).status_code

            assert await accepted() == 202
            await faults.postgres_stop()
            await serve.logged("heartbeat_failed")
            assert [await accepted() for _ in range(3)] == [202, 202, 202]
            await faults.postgres_start()
            await serve.logged("heartbeat_restored")
        assert serve.alive()
        assert len(serve.events("heartbeat_failed")) == 1  # once per outage, not once per beat
        # one worker: the serve role runs in the command's own process
        judged = await _served(beating, socket.gethostname(), serve.process.pid)
        assert judged.role.work_done == 4
    finally:
        serve.close()
