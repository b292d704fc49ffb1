"""Starting up: a start that cannot succeed fails the command with one clear line (exit 1, or 2 for
configuration), whatever the number of workers, so that a supervisor sees the failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from relay import config
from tests.integration import conftest, factories


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(settings: config.Settings, **overrides: str) -> dict[str, str]:
    return {
        **os.environ,
        **factories.environment(settings),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(_free_port()),
        **overrides,
    }


def _relay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _one_clear_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("relay: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("down", ["postgresql", "rabbitmq"])
def test_serve_exits_1_when_a_dependency_is_down_at_start(
    settings: config.Settings, workers: str, down: str
) -> None:
    """PostgreSQL or RabbitMQ unreachable: exit 1 with one line naming it, with 1 worker or 2."""
    closed = _free_port()
    override = (
        {"RELAY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/relay"}
        if down == "postgresql"
        else {"RELAY_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed}/"}
    )
    result = _relay(_env(settings, RELAY_WORKERS=workers, **override), "serve")
    assert result.returncode == 1, result.stderr
    line = _one_clear_line(result.stderr)
    assert ("PostgreSQL" if down == "postgresql" else "RabbitMQ") in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_1_when_the_port_is_taken(
    settings: config.Settings, workers: str, listening: int
) -> None:
    """A port in use is a failed start (exit 1), not uvicorn's exit 3 with a traceback."""
    result = _relay(_env(settings, RELAY_WORKERS=workers, RELAY_PORT=str(listening)), "serve")
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{listening}" in _one_clear_line(result.stderr)


async def test_a_missing_or_unmigrated_database_is_a_configuration_error(
    settings: config.Settings,
) -> None:
    """exit 2 and what to do (`relay migrate`), for serve and for the other commands alike."""
    name = f"relay_test_empty_{uuid.uuid4().hex[:12]}"
    missing = _env(settings, RELAY_DATABASE_URL=f"{conftest.BASE_DSN.rstrip('/')}/{name}_missing")
    for command in (["serve"], ["connections", "list"]):
        result = _relay(missing, *command)
        assert result.returncode == 2, result.stderr
        assert "does not exist" in _one_clear_line(result.stderr)
        assert "run `relay migrate`" in result.stderr
    admin = await asyncpg.connect(f"{conftest.BASE_DSN.rstrip('/')}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        empty = _env(settings, RELAY_DATABASE_URL=f"{conftest.BASE_DSN.rstrip('/')}/{name}")
        for command in (["serve"], ["connections", "list"], ["documents", "list", "--json"]):
            result = _relay(empty, *command)
            assert result.returncode == 2, result.stderr
            assert "run `relay migrate`" in _one_clear_line(result.stderr)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_credentials_postgresql_refuses_are_a_configuration_error(
    settings: config.Settings,
) -> None:
    """A role PostgreSQL does not know (or a wrong password): exit 2, naming RELAY_DATABASE_URL."""
    url = settings.database_url.reveal().replace("postgres@", "no_such_role_x@", 1)
    assert "no_such_role_x@" in url
    result = _relay(_env(settings, RELAY_DATABASE_URL=url), "connections", "list")
    assert result.returncode == 2, result.stderr
    assert "PostgreSQL refused RELAY_DATABASE_URL's credentials" in _one_clear_line(result.stderr)


def test_serve_with_two_workers_starts_and_stops_cleanly(settings: config.Settings) -> None:
    """The usual path still works: ready with 2 workers, exit 0 on SIGTERM."""
    env = _env(settings, RELAY_WORKERS="2")
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                ready = httpx.get(f"http://127.0.0.1:{env['RELAY_PORT']}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "relay serve did not become ready"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
