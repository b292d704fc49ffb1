"""Connections: set up against both upstreams, stored sealed, managed from the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest

from relay import config, connections, credentials, crypto, errors, models
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import qonto as qonto_sandbox

DOSSIER = "ACME001"
CEGID_KEY, CEGID_SECRET = "firm-key-0001", "firm-secret-0001"
WEBHOOK_SECRET = "webhook-secret-do-not-leak-0123456789"


def _new(sandbox: qonto_sandbox.QontoSandbox, **overrides: object) -> connections.NewConnection:
    login, _, secret = sandbox.api_key_header.partition(":")
    values: dict[str, object] = {
        "client_name": "Acme",
        "qonto_organization_id": sandbox.organization_id,
        "qonto": credentials.QontoApiKey(login=login, secret=config.Secret(secret)),
        "cegid": credentials.CegidCredentials(
            api_key=config.Secret(CEGID_KEY), api_secret=config.Secret(CEGID_SECRET)
        ),
        "cegid_dossier": DOSSIER,
        "cegid_domain": "CABINET",
        "webhook_secrets": (WEBHOOK_SECRET,),
    }
    values.update(overrides)
    return connections.NewConnection(**values)  # type: ignore[arg-type]


async def test_add_checks_both_sides_and_stores_secrets_sealed(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """A new connection is stored with its credentials and webhook secret encrypted, never in clear."""
    created = await connections.add(upstream_settings, pool, _new(qonto))
    assert created.webhook_path == f"/webhooks/qonto/{created.connection.id}"
    assert created.connection.state == models.ConnectionState.ACTIVE
    rows = []
    for table in ("connections", "webhook_secrets"):
        rows += await pool.fetch(f"SELECT * FROM {table}")  # noqa: S608 - fixed table names
    dump = "\n".join(repr(dict(r)) for r in rows)
    secret = qonto.api_key_header.partition(":")[2]
    for clear in (CEGID_SECRET, WEBHOOK_SECRET, secret, CEGID_KEY):
        assert clear not in dump


async def test_a_member_without_setup_rights_is_refused(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """Only owners, admins and reporting members can begin the setup."""
    qonto.membership_role = "employee"
    with pytest.raises(errors.Refused, match="only owners, admins and reporting"):
        await connections.add(upstream_settings, pool, _new(qonto))
    assert await pool.fetchval("SELECT count(*) FROM connections") == 0


async def test_credentials_of_another_organization_are_refused(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """The Qonto credentials must belong to the organization being connected."""
    with pytest.raises(errors.Refused, match="another organization"):
        await connections.add(
            upstream_settings, pool, _new(qonto, qonto_organization_id=str(uuid.uuid4()))
        )


async def test_a_dossier_the_key_cannot_read_is_refused(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """Loop silently drops deposits into a wrong dossier, so setup checks the dossier first."""
    with pytest.raises(errors.CegidAccessRefused):
        await connections.add(upstream_settings, pool, _new(qonto, cegid_dossier="WRONG42"))
    assert await pool.fetchval("SELECT count(*) FROM connections") == 0


async def test_disconnect_then_reconnect(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """Disconnect stops the connection; reconnect re-checks both sides and makes it active again."""
    created = await connections.add(upstream_settings, pool, _new(qonto))
    disconnected = await connections.disconnect(pool, created.connection.id)
    assert disconnected.state == models.ConnectionState.DISCONNECTED
    again = await connections.reconnect(upstream_settings, pool, created.connection.id)
    assert again["state"] == "active"
    assert again["problems"] == []


async def test_check_flags_a_refused_dossier_and_clears_when_fixed(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """When Loop refuses the key, the connection needs attention with a message to act on."""
    created = await connections.add(upstream_settings, pool, _new(qonto))
    loop.add_firm(CEGID_KEY, CEGID_SECRET, dossiers=[], domain="CABINET")  # dossier dissociated
    checked = await connections.check(upstream_settings, pool, created.connection.id)
    assert checked["state"] == "needs_attention"
    assert checked["problems"]
    assert "Cegid" in checked["problems"][0]
    loop.add_firm(CEGID_KEY, CEGID_SECRET, dossiers=[DOSSIER], domain="CABINET")
    checked = await connections.check(upstream_settings, pool, created.connection.id)
    assert checked["state"] == "active"
    assert checked["problems"] == []


def _relay(settings: config.Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        RELAY_SECRET_KEY=settings.secret_key.reveal(),
        RELAY_DATABASE_URL=settings.database_url.reveal(),
        RELAY_AMQP_URL=settings.amqp_url.reveal(),
        RELAY_AMQP_PREFIX=settings.amqp_prefix,
        RELAY_QONTO_API_URL=settings.qonto_api_url,
        RELAY_QONTO_OAUTH_URL=settings.qonto_oauth_url,
        RELAY_CEGID_API_URL=settings.cegid_api_url,
        RELAY_CEGID_SUBSCRIPTION_KEY=(
            settings.cegid_subscription_key or config.Secret("")
        ).reveal(),
    )
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


async def test_command_line_add_list_show_and_documents(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """`relay connections add --json` prints the id and webhook URL; secrets appear nowhere."""
    added = _relay(
        upstream_settings,
        "connections",
        "add",
        "--json",
        "--client-name",
        "Acme",
        "--qonto-organization-id",
        qonto.organization_id,
        "--qonto-api-key",
        qonto.api_key_header,
        "--webhook-secret",
        WEBHOOK_SECRET,
        "--cegid-api-key",
        CEGID_KEY,
        "--cegid-api-secret",
        CEGID_SECRET,
        "--cegid-dossier",
        DOSSIER,
        "--cegid-domain",
        "CABINET",
    )
    assert added.returncode == 0, added.stderr
    value = json.loads(added.stdout)
    assert value["webhook_path"] == f"/webhooks/qonto/{value['id']}"
    assert value["webhook_url"].endswith(value["webhook_path"])
    listed = _relay(upstream_settings, "connections", "list", "--json")
    assert [c["id"] for c in json.loads(listed.stdout)] == [value["id"]]
    shown = _relay(upstream_settings, "connections", "show", value["id"], "--json")
    assert json.loads(shown.stdout)["cegid_dossier"] == DOSSIER
    docs = _relay(upstream_settings, "documents", "list", "--json")
    assert docs.returncode == 0
    assert json.loads(docs.stdout) == []
    for output in (added, listed, shown, docs):
        for secret in (CEGID_SECRET, WEBHOOK_SECRET, qonto.api_key_header.partition(":")[2]):
            assert secret not in output.stdout + output.stderr
    unknown = _relay(upstream_settings, "connections", "show", str(uuid.uuid4()))
    assert unknown.returncode == 2
    assert "no connection" in unknown.stderr


async def test_subscribe_registers_webhooks_and_keeps_their_secrets(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """--subscribe: one Qonto subscription per topic, to the relay's HTTPS URL, secrets sealed."""
    settings = dataclasses.replace(upstream_settings, public_url="https://relay.example.com")
    created = await connections.add(settings, pool, _new(qonto, webhook_secrets=(), subscribe=True))
    assert created.subscriptions == len(connections.WEBHOOK_TOPICS)
    rows = await pool.fetch("SELECT qonto_subscription_id, topics FROM webhook_secrets")
    assert sorted(r["topics"][0] for r in rows) == sorted(connections.WEBHOOK_TOPICS)
    assert all(r["qonto_subscription_id"] for r in rows)
    assert created.webhook_url.startswith("https://relay.example.com/webhooks/qonto/")


async def test_oauth_connection_stores_the_rotated_refresh_token(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """Qonto rotates the refresh token at each refresh: the stored one is the new one."""
    refresh = qonto.add_oauth_client("relay-app", "relay-app-secret")
    settings = dataclasses.replace(
        upstream_settings,
        qonto_client_id="relay-app",
        qonto_client_secret=config.Secret("relay-app-secret"),
    )
    created = await connections.add(
        settings,
        pool,
        _new(qonto, qonto=credentials.QontoOAuth(refresh_token=config.Secret(refresh))),
    )
    box = crypto.Box(settings.secret_key.reveal())
    stored, _ = await credentials.load(pool, box, created.connection.id)
    assert isinstance(stored, credentials.QontoOAuth)
    assert stored.refresh_token.reveal() != refresh
    assert stored.access_token is not None
