"""`relay run` (intake, consumer and scheduler in one process) under a broker that goes away
beneath it (fault tests, run apart): webhooks accepted before and after become documents, with no
restart by hand; a broker away past RELAY_OUTAGE_LIMIT ends the process with exit 1."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from relay import config
from relay.sandbox import qonto as qonto_sandbox
from tests import services
from tests.integration import factories, processes

pytestmark = pytest.mark.fault


class Webhooks:
    """Card receipts in the Qonto sandbox, announced to `relay run` by signed webhooks."""

    def __init__(
        self, client: httpx.AsyncClient, path: str, qonto: qonto_sandbox.QontoSandbox
    ) -> None:
        self._client = client
        self._path = path
        self._qonto = qonto
        self._seed = 0
        self.attachments: list[str] = []  # of the webhooks answered 202

    async def send(self, count: int, *, within_s: float = 30) -> None:
        """``count`` new receipts, each webhook sent again until it is answered 202."""
        for _ in range(count):
            self._seed += 1
            tx, attachment = factories.receipt(self._qonto, seed=self._seed)
            body, headers = factories.signed(self._qonto.transaction_event(tx))
            deadline = time.monotonic() + within_s
            while True:
                try:
                    answer = await self._client.post(
                        self._path, content=body, headers=headers, timeout=10
                    )
                    status: int | None = answer.status_code
                except httpx.TransportError:
                    status = None
                if status == 202:
                    self.attachments.append(attachment)
                    break
                assert status in (503, None), status
                assert time.monotonic() < deadline, f"no 202 within {within_s} s (last {status})"
                await asyncio.sleep(0.1)


async def _documents(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch("SELECT qonto_attachment_id FROM documents")
    return [r["qonto_attachment_id"] for r in rows]


async def _until_documents(pool: asyncpg.Pool, attachments: list[str], within_s: float) -> None:
    async def became() -> bool:
        return set(attachments) <= set(await _documents(pool))

    await factories.until(
        became, within_s=within_s, what="the accepted webhooks becoming documents", every_s=0.1
    )


@pytest.fixture
async def run(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    tmp_path: pathlib.Path,
) -> AsyncIterator[tuple[processes.Role, Webhooks]]:
    connection_id = await factories.connect(upstream_settings, pool, qonto)
    process = processes.Role(
        upstream_settings, "run", log_path=tmp_path / "run.log", env={"RELAY_OUTAGE_LIMIT": "20"}
    )
    try:
        await process.ready()
        async with httpx.AsyncClient(base_url=process.url) as client:
            yield (
                process,
                Webhooks(client, upstream_settings.webhook_path(str(connection_id)), qonto),
            )
    finally:
        process.close()


@pytest.mark.parametrize("fault", ["rabbitmq_restart", "close_all_connections"])
async def test_webhooks_accepted_after_rabbitmq_went_away_become_documents(
    fault: str,
    pool: asyncpg.Pool,
    run: tuple[processes.Role, Webhooks],
    faults: services.Services,
) -> None:
    """RabbitMQ restarted, or every connection closed, under `relay run`: the intake accepts
    webhooks again and the consumer turns them into documents, each once, by itself."""
    process, webhooks = run
    await webhooks.send(3)
    await _until_documents(pool, webhooks.attachments, within_s=30)
    if fault == "rabbitmq_restart":
        await faults.rabbitmq_restart(down_s=2)
    else:
        await faults.rabbitmq_close_connections()
    await webhooks.send(3)
    await _until_documents(pool, webhooks.attachments, within_s=30)
    assert sorted(await _documents(pool)) == sorted(webhooks.attachments)
    assert process.alive()
    assert not process.events("run_role_failed")


async def test_rabbitmq_away_past_the_limit_ends_relay_run_with_exit_1(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    faults: services.Services,
    tmp_path: pathlib.Path,
) -> None:
    """RELAY_OUTAGE_LIMIT=3: RabbitMQ away longer than that, the consumer gives up and `relay run`
    exits 1 naming it, rather than accepting webhooks that nothing would process."""
    process = processes.Role(
        upstream_settings, "run", log_path=tmp_path / "run.log", env={"RELAY_OUTAGE_LIMIT": "3"}
    )
    try:
        await process.ready()
        await faults.rabbitmq_stop()
        assert await process.exit_code(within_s=45) == 1
        [failed] = process.events("run_role_failed")
        assert failed["role"] == "consume", failed
        assert "RabbitMQ unavailable for more than 3 s" in failed["error"], failed
    finally:
        process.close()
