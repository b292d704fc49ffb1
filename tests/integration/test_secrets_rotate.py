"""`relay secrets rotate`: with RELAY_SECRET_KEY="new,old", every stored secret is re-sealed under the
new key, and the relay then works with the new key alone."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import uuid

import asyncpg
import httpx

from relay import config, crypto
from relay.domain import credentials, invitations
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories, processes


def _relay(settings: config.Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**os.environ, **factories.environment(settings)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _sealed(pool: asyncpg.Pool) -> list[bytes]:
    rows = await pool.fetch(
        "SELECT qonto_credentials AS v FROM connections UNION ALL "
        "SELECT cegid_credentials FROM connections UNION ALL "
        "SELECT secret FROM webhook_secrets UNION ALL "
        "SELECT qonto_tokens FROM invitations WHERE qonto_tokens IS NOT NULL UNION ALL "
        "SELECT cegid_credentials FROM invitations WHERE cegid_credentials IS NOT NULL"
    )
    return [bytes(r["v"]) for r in rows]


async def test_rotation_reseals_everything_and_the_old_key_can_go(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    tmp_path: pathlib.Path,
) -> None:
    """Connections, webhook secrets and an invitation's secrets move under the new key; with the
    new key alone, `connections check` opens the credentials and the intake accepts a webhook."""
    old_box = crypto.Box(upstream_settings.secret_key.reveal())
    connection_id = await factories.connect(upstream_settings, pool, qonto)
    invitation = await invitations.create(upstream_settings, pool, "Later")
    found = await invitations.get(pool, invitation.id)
    assert found is not None
    await invitations.record_key(pool, old_box, found, "firm-key-0001", "firm-secret-0001")
    new_key = crypto.generate_key()
    both = dataclasses.replace(
        upstream_settings,
        secret_key=config.Secret(f"{new_key},{upstream_settings.secret_key.reveal()}"),
    )

    rotated = await asyncio.to_thread(_relay, both, "secrets", "rotate", "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout) == {
        "resealed": {"connections": 1, "webhook_secrets": 1, "invitations": 1},
        "already_under_first_key": 0,
    }
    new_box = crypto.Box(new_key)
    assert all(new_box.sealed_by_first(value) for value in await _sealed(pool))
    again = await asyncio.to_thread(_relay, both, "secrets", "rotate", "--json")
    assert json.loads(again.stdout)["resealed"] == {
        "connections": 0,
        "webhook_secrets": 0,
        "invitations": 0,
    }

    only_new = dataclasses.replace(upstream_settings, secret_key=config.Secret(new_key))
    _, cegid = await credentials.load(pool, new_box, connection_id)
    assert cegid.api_secret.reveal() == "firm-secret-0001"
    checked = await asyncio.to_thread(_relay, only_new, "connections", "check", str(connection_id))
    assert checked.returncode == 0, checked.stderr
    serve = processes.Role(only_new, "serve", log_path=tmp_path / "serve.log")
    try:
        await serve.ready()
        tx, _ = factories.receipt(qonto)
        body, headers = factories.signed(qonto.transaction_event(tx))
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{serve.url}/webhooks/qonto/{connection_id}", content=body, headers=headers
            )
        assert answer.status_code == 202
    finally:
        serve.close()
    refused = await asyncio.to_thread(
        _relay,
        dataclasses.replace(upstream_settings, secret_key=config.Secret(crypto.generate_key())),
        "secrets",
        "rotate",
    )
    assert refused.returncode == 2
    assert "cannot be decrypted" in refused.stderr
    assert uuid.UUID(str(connection_id))
