"""`relay serve` under a broker and a database that restart beneath it (fault tests, run apart)."""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid

import asyncpg
import httpx
import pytest

from relay import config
from tests import services
from tests.integration import factories, processes

pytestmark = pytest.mark.fault


def _event(connection_org: str = "org-test") -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "subscription_id": "sub-1",
        "organization_id": connection_org,
        "membership_id": "m-1",
        "type": "v1/cards",
        "created_at": "2026-12-05T10:00:00Z",
        "data": {"id": str(uuid.uuid4())},
    }


async def _post_until(
    client: httpx.AsyncClient, path: str, status: int, *, within_s: float
) -> float:
    """Send signed webhooks until one answers ``status``; the seconds it took."""
    started = time.monotonic()
    while True:
        body, headers = factories.signed(_event())
        try:
            answer = (await client.post(path, content=body, headers=headers, timeout=5)).status_code
        except httpx.TransportError:
            answer = None
        if answer == status:
            return time.monotonic() - started
        assert time.monotonic() - started < within_s, (
            f"no {status} within {within_s} s (last {answer})"
        )
        await asyncio.sleep(0.1)


async def test_the_intake_answers_503_while_rabbitmq_is_down_and_202_once_it_is_back(
    settings: config.Settings,
    pool: asyncpg.Pool,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """Never a 202 for an event that could not be queued; intake resumes by itself after the restart."""
    connection_id = await factories.make_connection(pool, settings)
    serve = processes.Role(
        settings, "serve", log_path=tmp_path / "serve.log", env={"RELAY_WORKERS": "1"}
    )
    try:
        await serve.ready()
        path = settings.webhook_path(str(connection_id))
        async with httpx.AsyncClient(base_url=serve.url) as client:
            await _post_until(client, path, 202, within_s=10)
            await faults.rabbitmq_stop()
            await _post_until(client, path, 503, within_s=10)
            await faults.rabbitmq_start()
            await _post_until(client, path, 202, within_s=30)
        assert serve.alive()
    finally:
        serve.close()
