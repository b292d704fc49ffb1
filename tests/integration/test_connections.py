"""Connections: set up against both upstreams, stored sealed, managed from the command line."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import uuid

import asyncpg
import httpx
import pytest

from relay import config, crypto, errors, models
from relay.domain import connections, credentials, eligibility, inputs
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import http as http_sandbox
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories

DOSSIER = "ACME001"
CEGID_KEY, CEGID_SECRET = "firm-key-0001", "firm-secret-0001"
WEBHOOK_SECRET = "webhook-secret-do-not-leak-0123456789"


def _new(sandbox: qonto_sandbox.QontoSandbox, **overrides: object) -> inputs.NewConnection:
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
    return inputs.NewConnection(**values)  # type: ignore[arg-type]


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
    assert value["webhook_subscriptions_created"] == 0  # the secret was given: none created
    assert value["warnings"] == []  # the sandbox's plan is Business
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


# ------------------------------------------------------------------------------------ review fixes


async def _subscriptions_in_qonto(sandbox: qonto_sandbox.QontoSandbox) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        response = await http.get(
            "/v2/webhook_subscriptions", headers={"Authorization": sandbox.api_key_header}
        )
    assert response.status_code == 200
    return list(response.json()["subscriptions"])


def _fail_every_post_after_the_first(sandbox: qonto_sandbox.QontoSandbox) -> None:
    """Qonto accepts the first subscription, then refuses the next one (422, not retried)."""
    subscribe = sandbox._subscribe

    def then_fail(body: bytes) -> http_sandbox.Response:
        response = subscribe(body)
        sandbox.faults.fail_next("/v2/webhook_subscriptions", 422)
        return response

    sandbox._subscribe = then_fail  # type: ignore[method-assign]


async def test_a_refused_second_subscription_deletes_the_first_one(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """--subscribe: when a later subscription fails, the ones created are deleted from Qonto (it
    would call a connection that was never stored for days), and the error says so."""
    settings = dataclasses.replace(upstream_settings, public_url="https://relay.example.com")
    _fail_every_post_after_the_first(qonto)
    with pytest.raises(errors.QontoProtocolError) as caught:
        await connections.add(settings, pool, _new(qonto, webhook_secrets=(), subscribe=True))
    assert "1 webhook subscription(s) already created in Qonto were deleted" in str(caught.value)
    assert await _subscriptions_in_qonto(qonto) == []
    deletes = [path for method, path, _ in qonto.requests if method == "DELETE"]
    assert len(deletes) == 1
    assert await pool.fetchval("SELECT count(*) FROM connections") == 0


async def test_a_connection_that_cannot_be_stored_leaves_no_subscription_in_qonto(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """The subscriptions are created before the insert: if the insert fails, they are deleted."""
    settings = dataclasses.replace(upstream_settings, public_url="https://relay.example.com")
    await pool.execute("ALTER TABLE webhook_secrets ADD CONSTRAINT refuse_all CHECK (false)")
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await connections.add(settings, pool, _new(qonto, webhook_secrets=(), subscribe=True))
    assert any("were deleted" in note for note in caught.value.__notes__)
    assert await _subscriptions_in_qonto(qonto) == []
    assert await pool.fetchval("SELECT count(*) FROM connections") == 0


async def test_subscriptions_created_counts_qonto_subscriptions_not_secrets(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """Secrets given with --subscribe create nothing in Qonto: 0 created, 1 secret stored."""
    created = await connections.add(upstream_settings, pool, _new(qonto, subscribe=True))
    assert (created.subscriptions, created.webhook_secrets) == (0, 1)
    assert created.to_json()["webhook_subscriptions_created"] == 0
    assert await _subscriptions_in_qonto(qonto) == []


async def test_an_unnamed_plan_is_accepted_but_said_unverified(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """GET /v2/subscription answers {"plan": null}: the setup says the plan was not verified."""
    qonto.plan = None
    created = await connections.add(upstream_settings, pool, _new(qonto))
    assert created.to_json()["warnings"] == [eligibility.PLAN_UNVERIFIED]
    checked = await connections.check(upstream_settings, pool, created.connection.id)
    assert eligibility.PLAN_UNVERIFIED in checked["warnings"]


async def test_a_plan_outside_the_eligible_ones_is_refused_and_nothing_is_stored(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """The plan comes from GET /v2/subscription (Solo Basic): refused, with the eligible plans."""
    qonto.plan = qonto_sandbox.plan("Solo Basic")
    with pytest.raises(eligibility.PlanRefused, match="Smart, Premium, Essential"):
        await connections.add(upstream_settings, pool, _new(qonto))
    assert await connections.list_all(pool) == []
    assert ("GET", "/v2/subscription", True) in qonto.requests


async def test_reconnect_checks_first_and_changes_nothing_when_the_check_cannot_run(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """Loop unreachable: reconnect fails and the connection stays disconnected, not active unchecked."""
    created = await connections.add(upstream_settings, pool, _new(qonto))
    await connections.disconnect(pool, created.connection.id)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    down = dataclasses.replace(upstream_settings, cegid_api_url=unreachable)
    with pytest.raises(errors.CegidUnavailable):
        await connections.reconnect(down, pool, created.connection.id)
    after = await connections.get(pool, created.connection.id)
    assert (after.state, after.state_reason) == ("disconnected", "disconnected by an operator")
    missing_key = dataclasses.replace(upstream_settings, cegid_subscription_key=None)
    with pytest.raises(errors.ConfigurationError, match="RELAY_CEGID_SUBSCRIPTION_KEY"):
        await connections.reconnect(missing_key, pool, created.connection.id)
    assert (await connections.get(pool, created.connection.id)).state == "disconnected"


async def test_reconnect_sets_the_state_from_the_check_and_restarts_the_folder_clock(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Documents waiting a day after setup get the advice; after the advised disconnect and
    reconnect it is gone (counted from the reconnection); a refused check leaves it flagged."""
    created = await connections.add(upstream_settings, pool, _new(qonto))
    connection_id = created.connection.id
    tx, _ = factories.receipt(qonto)
    await factories.ingest_transaction(pool, connection_id, tx)
    await pool.execute(
        "UPDATE connections SET created_at = now() - interval '25 hours', "
        "connected_at = now() - interval '25 hours' WHERE id = $1",
        connection_id,
    )
    [warning] = (await connections.describe(pool, connection_id))["warnings"]
    assert "has not appeared in Loop 24 hours after setup" in warning
    await connections.disconnect(pool, connection_id)
    again = await connections.reconnect(upstream_settings, pool, connection_id)
    assert (again["state"], again["problems"]) == ("active", [])
    assert again["warnings"] == []  # no folder advice any more
    assert dt.datetime.fromisoformat(again["connected_at"]) > dt.datetime.now(
        dt.UTC
    ) - dt.timedelta(minutes=1)
    loop.add_firm(CEGID_KEY, CEGID_SECRET, dossiers=[], domain="CABINET")  # dossier dissociated
    await connections.disconnect(pool, connection_id)
    refused = await connections.reconnect(upstream_settings, pool, connection_id)
    assert refused["state"] == "needs_attention"
    assert refused["state_reason"].startswith("Cegid")


async def test_failed_documents_do_not_count_as_waiting_for_the_folder(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """A file Loop refused is no sign of a missing folder; nor are documents held by Qonto's refusal."""
    created = await connections.add(upstream_settings, pool, _new(qonto))
    connection_id = created.connection.id
    tx, _ = factories.receipt(qonto)
    await factories.ingest_transaction(pool, connection_id, tx)
    await pool.execute(
        "UPDATE documents SET state = 'failed', reason = 'Cegid refused the file (415)'"
    )
    await pool.execute(
        "UPDATE connections SET connected_at = now() - interval '25 hours' WHERE id = $1",
        connection_id,
    )
    assert (await connections.describe(pool, connection_id))["warnings"] == []
    await pool.execute("UPDATE documents SET state = 'pending', reason = NULL")
    await pool.execute(
        "UPDATE connections SET state = 'needs_attention', refused_by = '{qonto}', "
        "state_reason = 'Qonto refused the credentials: reconnect the organization' WHERE id = $1",
        connection_id,
    )
    assert (await connections.describe(pool, connection_id))["warnings"] == []


async def test_admin_input_is_validated_like_the_command_line(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """The admin API refuses what the CLI refuses, with 400 (bad input), never 409."""
    from relay.edge import app

    application = app.create_app(upstream_settings)
    headers = {"Authorization": "Bearer test-admin-token-0123456789"}
    body = {
        "client_name": "Acme",
        "qonto_organization_id": qonto.organization_id,
        "cegid_api_key": CEGID_KEY,
        "cegid_api_secret": CEGID_SECRET,
        "cegid_dossier": DOSSIER,
        "cegid_domain": "CABINET",
        "webhook_secrets": [WEBHOOK_SECRET],
    }
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://relay"
        ) as http,
    ):
        for bad in (
            {"qonto_api_key": ":secret"},
            {"qonto_api_key": "login:"},
            {"qonto_api_key": qonto.api_key_header, "webhook_secrets": ["short"]},
            {"qonto_api_key": qonto.api_key_header, "webhook_secrets": []},
            {"qonto_api_key": qonto.api_key_header, "qonto_refresh_token": "t"},
        ):
            response = await http.post("/admin/connections", json={**body, **bad}, headers=headers)
            assert response.status_code == 400, (bad, response.text)
        good = await http.post(
            "/admin/connections",
            json={**body, "qonto_api_key": qonto.api_key_header},
            headers=headers,
        )
        assert good.status_code == 201, good.text
    assert await pool.fetchval("SELECT count(*) FROM connections") == 1
