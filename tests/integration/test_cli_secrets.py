"""`relay connections add` takes every secret from standard input or the environment, so that none
has to be on the command line (visible in `ps` and shell history)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest

from relay import config, crypto
from relay.domain import credentials
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories


def _add(
    settings: config.Settings, flags: list[str], *, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "connections", "add", "--json", *flags],
        env={**os.environ, **factories.environment(settings), **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _base(qonto: qonto_sandbox.QontoSandbox) -> list[str]:
    return [
        "--client-name",
        "Acme",
        "--qonto-organization-id",
        qonto.organization_id,
        "--cegid-api-key",
        factories.FIRM_KEY,
        "--cegid-dossier",
        "ACME001",
        "--cegid-domain",
        "CABINET",
    ]


async def _stored(
    settings: config.Settings, pool: asyncpg.Pool, connection_id: str
) -> tuple[str, str, list[str]]:
    box = crypto.Box(settings.secret_key.reveal())
    qonto_creds, cegid = await credentials.load(pool, box, uuid.UUID(connection_id))
    assert isinstance(qonto_creds, credentials.QontoApiKey)
    rows = await pool.fetch(
        "SELECT secret FROM webhook_secrets WHERE connection_id = $1 ORDER BY id",
        uuid.UUID(connection_id),
    )
    return (
        f"{qonto_creds.login}:{qonto_creds.secret.reveal()}",
        cegid.api_secret.reveal(),
        [box.open(bytes(r["secret"])) for r in rows],
    )


async def test_secrets_from_standard_input_and_the_environment(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """--cegid-api-secret - reads standard input; --qonto-api-key-env and --webhook-secret-env read
    variables; the connection is created with exactly those values and none is printed."""
    result = _add(
        upstream_settings,
        [
            *_base(qonto),
            "--cegid-api-secret",
            "-",
            "--qonto-api-key-env",
            "QONTO_KEY",
            "--webhook-secret-env",
            "HOOK_ONE",
            "--webhook-secret-env",
            "HOOK_TWO",
        ],
        stdin=factories.FIRM_SECRET + "\n",
        QONTO_KEY=qonto.api_key_header,
        HOOK_ONE="hook-secret-one-0123456789",
        HOOK_TWO="hook-secret-two-0123456789",
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert await _stored(upstream_settings, pool, created["id"]) == (
        qonto.api_key_header,
        factories.FIRM_SECRET,
        ["hook-secret-one-0123456789", "hook-secret-two-0123456789"],
    )
    for secret in (factories.FIRM_SECRET, qonto.api_key_header, "hook-secret-one"):
        assert secret not in result.stdout + result.stderr


async def test_webhook_secrets_one_per_line_on_standard_input(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """--webhook-secret - takes each non-empty line of standard input as one secret."""
    result = _add(
        upstream_settings,
        [
            *_base(qonto),
            "--cegid-api-secret-env",
            "CEGID_SECRET",
            "--qonto-api-key-env",
            "QONTO_KEY",
            "--webhook-secret",
            "-",
        ],
        stdin="hook-a-0123456789abcdef\n\nhook-b-0123456789abcdef\n",
        CEGID_SECRET=factories.FIRM_SECRET,
        QONTO_KEY=qonto.api_key_header,
    )
    assert result.returncode == 0, result.stderr
    _, _, hooks = await _stored(upstream_settings, pool, json.loads(result.stdout)["id"])
    assert hooks == ["hook-a-0123456789abcdef", "hook-b-0123456789abcdef"]


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--cegid-api-secret", "-", "--qonto-api-key", "-"], {}, "only one flag may read"),
        (["--cegid-api-secret-env", "NOPE_UNSET", "--qonto-api-key", "a:b"], {}, "NOPE_UNSET"),
        (
            ["--cegid-api-secret", "x", "--cegid-api-secret-env", "S", "--qonto-api-key", "a:b"],
            {"S": "y"},
            "not both",
        ),
        (["--qonto-api-key", "a:b"], {}, "--cegid-api-secret"),
    ],
    ids=["two-stdin", "empty-variable", "both", "missing"],
)
def test_bad_secret_flags_are_usage_errors(
    upstream_settings: config.Settings,
    qonto: qonto_sandbox.QontoSandbox,
    flags: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    """Exit 2 naming the flag or the variable, before anything is contacted."""
    result = _add(upstream_settings, [*_base(qonto), *flags], stdin="s\n", **env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
