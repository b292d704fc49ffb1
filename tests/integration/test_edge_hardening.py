"""The public edge refuses what an attacker tries: redirects to another host, oversized integers,
guessed admin tokens (logged and counted, never the token), a wrong RELAY_SECRET_KEY."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from relay import config, crypto
from tests.integration import factories, processes

TOKEN = "test-admin-token-0123456789"
HUGE = "99999999999999999999"  # beyond 64 bits


@pytest.fixture
async def serve(
    settings: config.Settings, pool: asyncpg.Pool, tmp_path: pathlib.Path
) -> AsyncIterator[processes.Role]:
    """`relay serve` (one worker) as a subprocess, with one connection, its log in JSON lines."""
    await factories.make_connection(pool, settings)
    role = processes.Role(
        settings,
        "serve",
        log_path=tmp_path / "serve.log",
        env={"RELAY_WORKERS": "1", "RELAY_ADMIN_TOKEN": TOKEN},
    )
    try:
        await role.ready()
        yield role
    finally:
        role.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz/"),
        ("GET", "/readyz/"),
        ("POST", "/webhooks/qonto/00000000-0000-0000-0000-000000000001/"),
        ("GET", "/admin/connections/"),
        ("GET", "/setup/x/"),
    ],
)
async def test_no_redirect_points_at_the_host_header(
    serve: processes.Role, method: str, path: str
) -> None:
    """A trailing slash is not redirected to whatever ``Host`` says: no 3xx, no foreign Location."""
    async with httpx.AsyncClient(base_url=serve.url) as client:
        response = await client.request(
            method,
            path,
            headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"},
            content=b"{}" if method == "POST" else None,
        )
    assert not 300 <= response.status_code < 400, response.headers
    assert "evil.example" not in response.headers.get("location", "")


async def test_integers_beyond_64_bits_are_bad_requests_in_the_admin_api(
    serve: processes.Role,
) -> None:
    """?limit= and a document id past 2**63-1 answer 400 with the reason, never reach PostgreSQL."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=serve.url, headers=headers) as client:
        listed = await client.get("/admin/documents", params={"limit": HUGE})
        resolved = await client.post(
            f"/admin/documents/{HUGE}/resolve", json={"decision": "uploaded"}
        )
    assert listed.status_code == 400, listed.text
    assert "limit" in listed.json()["error"]
    assert resolved.status_code == 400, resolved.text
    assert "document" in resolved.json()["error"]


def _relay(settings: config.Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**os.environ, **factories.environment(settings), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["documents", "list", "--limit", HUGE],
        ["documents", "resolve", HUGE, "--uploaded"],
    ],
)
def test_integers_beyond_64_bits_are_usage_errors_on_the_command_line(
    settings: config.Settings, args: list[str]
) -> None:
    """Exit 2 with argparse's message naming the bound (not exit 1 from PostgreSQL)."""
    result = _relay(settings, *args)
    assert result.returncode == 2, result.stderr
    assert "at most 9223372036854775807" in result.stderr


async def test_failed_admin_authentication_is_logged_and_counted_never_the_token(
    serve: processes.Role,
) -> None:
    """Missing and wrong bearer tokens: one warning line each (path, client, reason; no token) and
    ``relay_admin_auth_failures_total`` counts them."""
    guessed = "guessed-token-abcdefghijkl"
    async with httpx.AsyncClient(base_url=serve.url) as client:
        assert (await client.get("/admin/connections")).status_code == 401
        wrong = await client.post("/admin/flush", headers={"Authorization": f"Bearer {guessed}"})
        assert wrong.status_code == 401
        ok = await client.get("/admin/connections", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        metrics = (await client.get("/metrics")).text
    await serve.logged("admin_auth_failed")
    lines = serve.events("admin_auth_failed")
    assert [(line["path"], line["reason"]) for line in lines] == [
        ("/admin/connections", "missing token"),
        ("/admin/flush", "wrong token"),
    ]
    assert all(line["client"] == "127.0.0.1" for line in lines)
    assert guessed not in serve.log_path.read_text()
    assert 'relay_admin_auth_failures_total{reason="missing token"} 1.0' in metrics
    assert 'relay_admin_auth_failures_total{reason="wrong token"} 1.0' in metrics


@pytest.mark.parametrize(
    "command",
    [["serve"], ["consume"], ["scheduler"], ["run"], ["flush", "--now"]],
    ids=lambda c: c[0],
)
async def test_a_wrong_secret_key_is_one_line_and_exit_2_in_every_role(
    settings: config.Settings, pool: asyncpg.Pool, command: list[str]
) -> None:
    """A valid key that did not seal the stored secrets: one `relay:` line naming RELAY_SECRET_KEY,
    no traceback, exit 2, whatever the role (serve with two workers too)."""
    await factories.make_connection(pool, settings)
    result = _relay(
        settings,
        *command,
        RELAY_SECRET_KEY=crypto.generate_key(),
        RELAY_WORKERS="2",
        RELAY_HOST="127.0.0.1",
        RELAY_PORT=str(processes.free_port()),
        RELAY_CEGID_SUBSCRIPTION_KEY="sub-key-for-tests",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relay: ")
    assert "RELAY_SECRET_KEY" in lines[0]
