"""The client's setup driven in headless Chromium, as the Qonto member and the accountant do it:
`relay serve` on a real socket, both sandboxes on theirs, a screenshot of every page.

The happy path ends with Qonto's signed webhook for the new connection accepted (202) and, after a
flush, its file in Loop once; the refusals (role, plan, denied consent, a refused key, an unknown
dossier, a dossier not associated with the key) each end on their page or step; a used or expired
link answers its page; no secret appears in any page or in the relay's log.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
from typing import Any

import asyncpg
import pytest

from consumers import consume, flusher
from relay import config
from relay.domain import connections
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories, processes
from tests.integration.web import conftest as web


def _fill_key(page: Any, key: str, secret: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_label("API secret").fill(secret)
    page.get_by_role("button", name="Next").click()


def _fill_dossier(page: Any, dossier: str, domain: str = "CABINET") -> None:
    page.get_by_label("Code dossier").fill(dossier)
    page.get_by_label("Domain").fill(domain)
    page.get_by_role("button", name="Next").click()


def _connect(page: Any, setup_url: str, *, decision: str = "Authorize") -> None:
    page.goto(setup_url)
    page.get_by_role("button", name="Connect with Qonto").click()
    page.get_by_role("button", name=decision).click()


@pytest.fixture
def serve(web_settings: config.Settings, tmp_path: pathlib.Path) -> Any:
    """`relay serve` (one worker), its log (JSON lines, debug level) kept for the secrets check."""
    role = processes.Role(
        web_settings,
        "serve",
        log_path=tmp_path / "serve.log",
        env={**web.environment(web_settings), "RELAY_LOG_LEVEL": "debug"},
    )
    yield role
    role.close()


async def _ready(role: processes.Role, settings: config.Settings) -> None:
    role.url = settings.public_url  # the port the public URL names (RELAY_PORT)
    await role.ready()


async def test_the_two_people_set_up_a_client_whose_first_file_reaches_loop_once(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    browser: web.Browser,
    serve: processes.Role,
) -> None:
    """Invite, consent, key, dossier, Loop Hub, Create, ready; then a webhook (202) and a flush."""
    await _ready(serve, web_settings)
    invited = await asyncio.to_thread(
        web.relay_command, web_settings, "connections", "invite", "--client-name", "Acme", "--json"
    )
    assert invited.returncode == 0, invited.stderr
    setup_url = json.loads(invited.stdout)["setup_url"]
    token = setup_url.rsplit("/", 1)[1]

    def walk(page: Any) -> list[str]:
        seen: list[str] = []
        page.goto(setup_url)
        assert page.get_by_role("heading", level=1).inner_text().startswith("Send Acme's")
        body = page.inner_text("main")
        for fact in ("20:00 UTC", "receipts", "supplier invoices", "paid and unpaid", "PIA"):
            assert fact in body
        assert "JPEG, PNG and PDF" in body
        assert "owner" in body
        assert "reporting" in body
        assert "Enterprise" in body
        web.shoot(page, "1-qonto-step")
        seen.append(page.content())
        page.get_by_role("button", name="Connect with Qonto").click()
        page.wait_for_url(re.compile(r".*/oauth2/auth.*"))
        web.shoot(page, "2-qonto-consent-sandbox")
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(re.compile(r".*/setup/key$"))
        web.shoot(page, "3-loop-api-key")
        seen.append(page.content())
        _fill_key(page, web.API_KEY, web.API_SECRET)
        page.wait_for_url(re.compile(r".*/setup/dossier$"))
        web.shoot(page, "4-client-file")
        seen.append(page.content())
        _fill_dossier(page, "ACME001")
        page.wait_for_url(re.compile(r".*/setup/hub$"))
        values = page.inner_text("dl")
        assert "Partenaire" in values
        assert "Qonto" in values
        assert web.API_KEY in values
        assert "relay@CABINET.onmicrosoft.com" in values
        web.shoot(page, "5-loop-hub-declaration")
        seen.append(page.content())
        page.set_viewport_size({"width": 390, "height": 844})
        web.shoot(page, "5-loop-hub-declaration-phone")
        page.set_viewport_size({"width": 1280, "height": 800})
        page.get_by_role("button", name="Create").click()
        page.wait_for_url(re.compile(r".*/setup/ready$"))
        assert "Your integration is ready" in page.inner_text("h1")
        assert "after the first deposit" in page.inner_text("main")
        assert "24 hours" in page.inner_text("main")
        web.shoot(page, "6-ready")
        seen.append(page.content())
        page.goto(setup_url)
        assert "This setup link is not valid" in page.inner_text("h1")
        web.shoot(page, "7-link-used")
        seen.append(page.content())
        return seen

    pages = await browser.run(walk)
    [connection] = await connections.list_all(pool)
    assert (connection.client_name, connection.cegid_dossier, connection.state) == (
        "Acme",
        "ACME001",
        "active",
    )
    assert connection.qonto_auth_kind == "oauth"
    listed = await asyncio.to_thread(
        web.relay_command, web_settings, "connections", "list", "--json"
    )
    [item] = json.loads(listed.stdout)
    assert (item["client_name"], item["cegid_dossier"], item["state"]) == (
        "Acme",
        "ACME001",
        "active",
    )

    subscriptions = qonto.subscriptions()
    assert {t for s in subscriptions for t in s["types"]} == {
        "v1/transactions",
        "v1/client-invoices",
        "v1/consent-revocations",
    }
    assert all(
        s["callback_url"].endswith(f"/webhooks/qonto/{connection.id}") for s in subscriptions
    )
    tx, _ = factories.receipt(
        qonto, files.jpeg(seed=3), name="ticket.jpg", content_type="image/jpeg"
    )
    stop = asyncio.Event()
    consumer = asyncio.create_task(consume.consume(web_settings, stop=stop))
    try:
        assert await asyncio.to_thread(qonto.deliver, qonto.transaction_event(tx)) == [202]
        await factories.until(
            lambda: pool.fetchval("SELECT count(*) > 0 FROM documents"),
            within_s=20,
            what="the webhook buffered",
        )
    finally:
        stop.set()
        await consumer
    await flusher.flush(web_settings, pool, sleep=factories.no_wait)
    assert len(loop.stored_by_dossier("ACME001")) == 1
    assert loop.duplicates() == []

    secrets = [web.API_SECRET, token, web.OAUTH_SECRET, *(s["secret"] for s in subscriptions)]
    secrets += _stored_qonto_tokens(qonto)
    for html in pages:
        for secret in secrets:
            assert secret not in html
    log = serve.log_path.read_text()
    assert "setup_completed" in log
    for secret in secrets:
        assert secret not in log


def _stored_qonto_tokens(qonto: qonto_sandbox.QontoSandbox) -> list[str]:
    """Every OAuth token the sandbox handed out (none may appear in a page or a log)."""
    return [*qonto._refresh_tokens, *qonto._access_tokens]


async def test_a_role_a_plan_or_a_refused_consent_ends_on_a_page_saying_who_can_do_it(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    browser: web.Browser,
    relay_url: str,
) -> None:
    """An employee, a Solo plan, Deny: each a refusal page with role="alert"; nothing stored."""
    setup_url = await web.invite(web_settings, pool)

    def refused(page: Any) -> None:
        qonto.membership_role = "employee"
        _connect(page, setup_url)
        alert = page.get_by_role("alert").inner_text()
        assert "'employee'" in alert
        assert "owner, an admin or a reporting member" in alert
        web.shoot(page, "refused-role")
        qonto.membership_role, qonto.plan = "admin", qonto_sandbox.plan("Solo Basic")
        _connect(page, setup_url)
        alert = page.get_by_role("alert").inner_text()
        assert "'Solo Basic'" in alert
        assert "Smart, Premium, Essential, Business or Enterprise" in alert
        assert "change the plan" in alert
        web.shoot(page, "refused-plan")
        qonto.plan = qonto_sandbox.plan("Premium")
        _connect(page, setup_url, decision="Deny")
        alert = page.get_by_role("alert").inner_text()
        assert "not authorized" in page.inner_text("h1")
        assert "choose Authorize" in alert
        web.shoot(page, "refused-consent")
        page.get_by_role("link", name="Back to the Qonto step").click()
        assert page.get_by_role("button", name="Connect with Qonto").is_visible()

    await browser.run(refused)
    row = await pool.fetchrow("SELECT qonto_tokens, qonto_connected_at FROM invitations")
    assert row is not None
    assert tuple(row) == (None, None)
    assert qonto.subscriptions() == []


async def test_loop_refusals_show_on_their_own_step_with_the_values_kept(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    browser: web.Browser,
    relay_url: str,
) -> None:
    """A refused key (step 2), an unknown dossier (step 3), a dossier not associated (step 4):
    each said in role="alert" with the Loop Hub action; nothing is half-created; then it works."""
    setup_url = await web.invite(web_settings, pool)

    def walk(page: Any) -> list[str]:
        seen = []
        _connect(page, setup_url)
        _fill_key(page, web.API_KEY, "not-the-secret")
        _fill_dossier(page, "NOPE001")
        page.get_by_role("button", name="Create").click()
        page.wait_for_url(re.compile(r".*/setup/key$"))
        alert = page.get_by_role("alert").inner_text()
        assert "refused this API key and secret" in alert
        assert "CegidLife" in alert
        assert page.get_by_label("API key").input_value() == web.API_KEY
        assert page.get_by_label("API secret").input_value() == ""
        assert "A secret is already kept" in page.inner_text("main")
        web.shoot(page, "refused-loop-key")
        seen.append(page.content())
        _fill_key(page, web.API_KEY, web.API_SECRET)
        assert page.get_by_label("Code dossier").input_value() == "NOPE001"  # kept
        page.get_by_role("button", name="Next").click()
        page.get_by_role("button", name="Create").click()
        page.wait_for_url(re.compile(r".*/setup/dossier$"))
        alert = page.get_by_role("alert").inner_text()
        assert "does not know the code dossier 'NOPE001'" in alert
        web.shoot(page, "refused-unknown-dossier")
        seen.append(page.content())
        _fill_dossier(page, "LONELY01")
        page.get_by_role("button", name="Create").click()
        page.wait_for_url(re.compile(r".*/setup/hub$"))
        alert = page.get_by_role("alert").inner_text()
        assert "not associated with the key" in alert
        assert "associate dossier 'LONELY01'" in alert
        assert "In Loop Hub" in alert
        web.shoot(page, "refused-dossier-not-associated")
        seen.append(page.content())
        loop.add_firm(web.API_KEY, web.API_SECRET, dossiers=["ACME001", "LONELY01"])
        page.get_by_role("button", name="Create").click()
        page.wait_for_url(re.compile(r".*/setup/ready$"))
        seen.append(page.content())
        return seen

    pages = await browser.run(walk)
    for html in pages:
        assert web.API_SECRET not in html
        assert "not-the-secret" not in html
    [connection] = await connections.list_all(pool)
    assert connection.cegid_dossier == "LONELY01"
    assert len(qonto.subscriptions()) == 3  # the refused attempts left none behind


async def test_an_expired_link_says_to_ask_the_firm_for_a_new_one(
    web_settings: config.Settings, pool: asyncpg.Pool, browser: web.Browser, relay_url: str
) -> None:
    """Past its 7 days the link answers 404 with the page; so does a made-up one."""
    setup_url = await web.invite(web_settings, pool)
    await pool.execute("UPDATE invitations SET expires_at = now() - interval '1 minute'")

    def visit(page: Any) -> None:
        response = page.goto(setup_url)
        assert response.status == 404
        assert (
            "Ask the accounting firm for a new setup link" in page.get_by_role("alert").inner_text()
        )
        web.shoot(page, "link-expired")

    await browser.run(visit)
