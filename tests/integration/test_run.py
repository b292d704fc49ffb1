"""`relay run` as a process: one role ending stops the whole process, loudly; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika.abc
import asyncpg
import httpx
import orjson
import pytest

from relay import amqp, config, dlq
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Run:
    """A `relay run` subprocess, its address and its log lines (JSON on standard error)."""

    def __init__(self, settings: config.Settings, log_path: pathlib.Path) -> None:
        self.port = _free_port()
        self.log_path = log_path
        env = {
            **os.environ,
            **factories.environment(settings),
            "RELAY_HOST": "127.0.0.1",
            "RELAY_PORT": str(self.port),
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                found.append(value)
        return found

    async def ready(self) -> None:
        """Poll /readyz until it answers 200 (the intake, PostgreSQL and RabbitMQ are up)."""
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"relay run exited: {self.log()}"
                try:
                    if (await client.get("/readyz", timeout=2)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"relay run not ready within 30 s: {self.log()}")

    async def exit_code(self, within_s: float) -> int:
        deadline = time.monotonic() + within_s
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay run still running after {within_s} s: {self.log()}")
            await asyncio.sleep(0.05)
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._log.close()


@pytest.fixture
async def run(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    tmp_path: pathlib.Path,
) -> AsyncIterator[Run]:
    """`relay run` with a connection, started and ready."""
    await factories.connect(upstream_settings, pool, qonto)
    process = Run(upstream_settings, tmp_path / "relay-run.log")
    try:
        await process.ready()
        yield process
    finally:
        process.close()


async def test_a_role_that_dies_stops_relay_run_with_exit_1_naming_it(
    run: Run,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """The consumer dies (its table is gone): relay run logs run_role_failed for it, stops the
    intake and the scheduler, and exits 1, rather than answering 202 for events nothing processes."""
    await pool.execute("ALTER TABLE events RENAME TO events_gone")
    connection_id = await pool.fetchval("SELECT id FROM connections")
    publisher = await amqp.Publisher.open(amqp_connection, upstream_settings)
    try:
        event = {"id": "evt-1", "type": "v1/transactions", "data": {"id": "tx-1"}}
        await publisher.publish_event(
            orjson.dumps(event), connection_id=str(connection_id), event_id=str(uuid.uuid4())
        )
    finally:
        await publisher.close()
    assert await run.exit_code(within_s=45) == 1
    failures = [line for line in run.lines() if line.get("event") == "run_role_failed"]
    assert [(f["role"], f["level"]) for f in failures] == [("consume", "error")], run.log()
    assert 'relation "events" does not exist' in failures[0]["error"]
    assert (
        await dlq.list_messages(upstream_settings, amqp_connection) == []
    )  # not the event's fault
    with pytest.raises(httpx.TransportError):  # the intake stopped with it
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{run.port}/healthz", timeout=2)


async def test_sigterm_stops_every_role_and_exits_0(run: Run) -> None:
    """SIGTERM: the intake, the consumer and the scheduler stop, and the process exits 0."""
    run.process.send_signal(signal.SIGTERM)
    assert await run.exit_code(within_s=45) == 0, run.log()
    assert not [line for line in run.lines() if line.get("event") == "run_role_failed"]
