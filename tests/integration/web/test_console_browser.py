"""The operators' console driven in headless Chromium: sign in, find the connection that needs
someone from the front page, resolve a document in doubt, retry a failed one once its cause is gone,
ask for a flush, replay and purge dead letters (a replay goes through the dedupe), create and revoke
an invitation; and a POST without the CSRF token, without a session or with an expired one changes
nothing. A screenshot of every page is saved (``test-artifacts/screenshots/console-*.png``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika.abc
import asyncpg
import orjson
import pytest

from consumers import consume, flusher
from relay import config
from relay.broker import amqp
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories
from tests.integration.web import conftest as web


def sign_in(page: Any, url: str, settings: config.Settings) -> None:
    assert settings.admin_token is not None
    page.goto(f"{url}/console/")
    assert page.url.endswith("/console/login")
    page.get_by_label("Admin token").fill(settings.admin_token.reveal())
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/console/")


def status_text(page: Any) -> str:
    return str(page.get_by_role("status").inner_text())


@pytest.fixture
async def nova(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> uuid.UUID:
    """ "Atelier Nova": two receipts, one deposit left in doubt and one refused by Loop; and a
    second client with nothing to do."""
    await factories.connect(web_settings, pool, qonto, dossier="OTHER002", client_name="Zephyr")
    nova = await factories.connect(web_settings, pool, qonto, client_name="Atelier Nova")
    for seed in (1, 2):
        tx, _ = factories.receipt(qonto, seed=seed, name=f"receipt-{seed}.pdf")
        await factories.ingest_transaction(pool, nova, tx)
    loop.faults.push("store_then_drop", "400")
    await flusher.flush(web_settings, pool, connection_id=nova, sleep=factories.no_wait)
    states = sorted((await factories.states(pool)).values())
    assert states == ["failed", "in_doubt"]
    return nova


@pytest.fixture
async def publisher(
    web_settings: config.Settings,
) -> AsyncIterator[tuple[amqp.Publisher, aio_pika.abc.AbstractConnection]]:
    async with amqp.connection(web_settings, name="test-console") as conn:
        channel = await conn.channel()
        await amqp.declare(channel, web_settings)
        await channel.close()
        value = await amqp.Publisher.open(conn, web_settings)
        yield value, conn
        await value.close()


async def _dead_letter(
    publisher: amqp.Publisher,
    settings: config.Settings,
    body: bytes,
    *,
    letter_id: str,
    connection_id: uuid.UUID,
    reason: str,
) -> None:
    """A message as the consumer dead-letters one (its id, reason, connection and time)."""
    await publisher.publish(
        settings.dead_letter_queue,
        body,
        message_id=letter_id,
        headers={
            amqp.HEADER_DLQ_ID: letter_id,
            amqp.HEADER_CONNECTION: str(connection_id),
            amqp.HEADER_REASON: reason,
            amqp.HEADER_FAILED_AT: dt.datetime.now(dt.UTC).isoformat(),
        },
    )


async def test_an_operator_finds_and_fixes_what_needs_someone(
    browser: web.Browser,
    relay_url: str,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    nova: uuid.UUID,
) -> None:
    """Today puts Atelier Nova first; on its page the in-doubt document is marked as uploaded and the
    failed one retried, which the next flush uploads; Flush now asks for a run; the run's report
    shows per connection; health and invitations pages open; an invitation is created and revoked."""

    def today_and_connection(page: Any) -> None:
        page.goto(f"{relay_url}/console/")
        web.shoot(page, "console-login")
        sign_in(page, relay_url, web_settings)
        web.shoot(page, "console-today")
        first = page.locator("tbody tr").first
        assert "Atelier Nova" in first.inner_text()
        assert "in doubt" in first.inner_text()
        first.get_by_role("link", name="Atelier Nova").click()
        page.wait_for_url(re.compile(r".*/console/connections/.*"))
        web.shoot(page, "console-connection")
        assert "it may or may not be" in page.inner_text("main")
        page.get_by_role("button", name="Mark as uploaded").click()
        assert "marked as uploaded" in status_text(page)
        web.shoot(page, "console-connection-resolved")
        page.get_by_role("button", name="Retry").click()
        assert "back to pending" in status_text(page)
        assert page.get_by_role("button", name="Send again").count() == 0

    await browser.run(today_and_connection)
    rows = {r["state"]: r for r in await pool.fetch("SELECT state, reason FROM documents")}
    assert set(rows) == {"uploaded", "pending"}
    await flusher.flush(web_settings, pool, connection_id=nova, sleep=factories.no_wait)
    assert sorted((await factories.states(pool)).values()) == ["uploaded", "uploaded"]
    # Loop holds each file once: the in-doubt one (stored when its answer was lost) is not sent again
    assert len({d.sha256 for d in loop.stored}) == len(loop.stored) == 2

    def runs_health_invitations(page: Any) -> str:
        sign_in(page, relay_url, web_settings)
        page.goto(f"{relay_url}/console/connections/{nova}?state=uploaded")
        assert page.get_by_role("cell", name="Uploaded", exact=True).count() == 2
        page.get_by_role("link", name="Runs").click()
        page.get_by_role("button", name="Flush now").click()
        assert "flush request" in status_text(page)
        web.shoot(page, "console-runs")
        page.locator("tbody a").first.click()
        page.wait_for_url(re.compile(r".*/console/runs/\d+"))
        assert "Atelier Nova" in page.inner_text("main")
        web.shoot(page, "console-run")
        page.get_by_role("link", name="Health").click()
        assert "Queues" in page.inner_text("main")
        web.shoot(page, "console-health")
        page.get_by_role("link", name="Invitations").click()
        page.get_by_label("Client name").fill("Café Lumière")
        page.get_by_role("button", name="Create invitation").click()
        link = page.locator("code.link").inner_text()
        web.shoot(page, "console-invitations")
        page.get_by_role("button", name="Revoke the invitation for Café Lumière").click()
        assert "revoked" in status_text(page)
        assert "No pending invitation" in page.inner_text("main")
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{relay_url}/console/login")
        return str(link)

    link = await browser.run(runs_health_invitations)
    assert link.startswith(f"{web_settings.public_url}/setup/")
    assert await pool.fetchval("SELECT count(*) FROM flush_requests WHERE finished_at IS NULL") == 1
    actions = [r["action"] for r in await pool.fetch("SELECT action FROM audit_log ORDER BY id")]
    for expected in (
        "mark_uploaded",
        "retry",
        "flush_now",
        "create_invitation",
        "revoke_invitation",
    ):
        assert expected in actions
    assert link.rsplit("/", 1)[1] not in " ".join(
        str(r) for r in await pool.fetch("SELECT * FROM audit_log")
    )


async def test_dead_letters_are_replayed_through_the_dedupe_and_purged(
    browser: web.Browser,
    relay_url: str,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    publisher: tuple[amqp.Publisher, aio_pika.abc.AbstractConnection],
    connection_id: uuid.UUID,
) -> None:
    """Three dead letters: an event already applied (replayed: the dedupe makes it a no-op), garbage
    holding a token (shown masked, then purged), a future topic version (Replay all by reason)."""
    sender, _ = publisher
    tx, _ = factories.receipt(qonto, seed=5)
    event = qonto.transaction_event(tx)
    await factories.ingest_transaction(pool, connection_id, tx)
    assert await pool.fetchval("SELECT count(*) FROM documents") == 1
    await _dead_letter(
        sender,
        web_settings,
        orjson.dumps(event),
        letter_id="dl-known",
        connection_id=connection_id,
        reason="kept failing: PostgreSQL unavailable",
    )
    await _dead_letter(
        sender,
        web_settings,
        b"<html> access_token=leaked-0123 </html>",
        letter_id="dl-garbage",
        connection_id=connection_id,
        reason="not JSON",
    )
    future = orjson.dumps({"id": "evt-v2", "type": "v2/transactions", "data": {"id": "tx-9"}})
    await _dead_letter(
        sender,
        web_settings,
        future,
        letter_id="dl-future",
        connection_id=connection_id,
        reason="unknown version of a used topic: v2/transactions",
    )
    stop = asyncio.Event()
    consumer = asyncio.create_task(consume.consume(web_settings, stop=stop))
    try:

        def operate(page: Any) -> None:
            sign_in(page, relay_url, web_settings)
            page.get_by_role("link", name="Dead letters").click()
            web.shoot(page, "console-dead-letters")
            page.get_by_role("link", name="dl-garbage").click()
            body = page.locator("pre.body").inner_text()
            assert "leaked-0123" not in body
            assert "masked" in body
            web.shoot(page, "console-dead-letter")
            page.get_by_role("button", name="Purge").click()
            assert "purged" in status_text(page)
            row = page.locator("tr", has_text="dl-known")
            row.get_by_role("button", name="Replay").click()
            assert "replayed" in status_text(page)
            page.get_by_label("Reason").select_option(
                "unknown version of a used topic: v2/transactions"
            )
            page.get_by_role("button", name="Filter").click()
            page.get_by_role("button", name="Replay all").click()
            assert "replayed 1 message" in status_text(page)

        await browser.run(operate)

        async def outcome() -> str | None:
            return await pool.fetchval(
                "SELECT outcome FROM events WHERE event_id = $1", str(event["id"])
            )

        deadline = asyncio.get_running_loop().time() + 15
        while await outcome() is None:
            assert asyncio.get_running_loop().time() < deadline, (
                "the replayed event was not consumed"
            )
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(consumer, 15)
    assert await pool.fetchval("SELECT count(*) FROM documents") == 1  # no duplicate document
    audited = {r["action"]: r["outcome"] for r in await pool.fetch("SELECT * FROM audit_log")}
    assert audited["purge"] == audited["replay"] == audited["replay_all"] == "ok"


async def test_without_the_csrf_token_a_session_or_a_live_one_nothing_changes(
    browser: web.Browser,
    relay_url: str,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
) -> None:
    """From the signed-in browser, a POST without the token: 403; from a browser without a session:
    the sign-in page; once the session expired: the sign-in page. The connection stays active; only
    the refused token is audited."""
    target = f"{relay_url}/console/connections/{connection_id}/disconnect"

    def forge(page: Any) -> tuple[dict[str, Any], str]:
        sign_in(page, relay_url, web_settings)
        page.goto(f"{relay_url}/console/connections/{connection_id}")
        csrf = page.locator('input[name="csrf_token"]').first.get_attribute("value")
        refused = page.request.post(target, form={"reason": "forged"})
        assert refused.status == 403
        assert "Nothing was changed" in refused.text()
        web.shoot(page, "console-connection-before-expiry")
        return page.context.storage_state(), str(csrf)

    state, csrf = await browser.run(forge)

    def stranger(page: Any) -> None:
        answer = page.request.post(target, form={"csrf_token": csrf})
        assert answer.url.endswith("/console/login")

    await browser.run(stranger)
    await pool.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second'")

    def expired(page: Any) -> None:
        answer = page.request.post(target, form={"csrf_token": csrf})
        assert answer.url.endswith("/console/login")
        page.goto(f"{relay_url}/console/")
        assert page.url.endswith("/console/login")

    await browser.run(expired, storage_state=state)
    assert await pool.fetchval("SELECT state FROM connections") == "active"
    audited = await pool.fetch("SELECT action, outcome FROM audit_log WHERE action <> 'sign_in'")
    assert [(r["action"], r["outcome"]) for r in audited] == [("csrf_refused", "refused")]


async def test_every_console_page_fits_a_phone_and_is_used_with_the_keyboard(
    browser: web.Browser,
    relay_url: str,
    web_settings: config.Settings,
    nova: uuid.UUID,
) -> None:
    """At a phone's width (390 px) no console page scrolls sideways; the sign-in is done with the
    keyboard alone (Tab to the field, type, Enter)."""
    pages = {
        "today": "/console/",
        "connection": f"/console/connections/{nova}",
        "runs": "/console/runs",
        "dead-letters": "/console/dead-letters",
        "invitations": "/console/invitations",
        "health": "/console/health",
    }

    def phone(page: Any) -> dict[str, int]:
        assert web_settings.admin_token is not None
        page.set_viewport_size({"width": 390, "height": 844})
        page.goto(f"{relay_url}/console/login")
        for _ in range(10):
            page.keyboard.press("Tab")
            if (
                page.evaluate("document.activeElement && document.activeElement.id")
                == "admin_token"
            ):
                break
        page.keyboard.type(web_settings.admin_token.reveal())
        page.keyboard.press("Enter")
        page.wait_for_url(f"{relay_url}/console/")
        wide = {}
        for name, path in pages.items():
            page.goto(f"{relay_url}{path}")
            width = int(page.evaluate("document.documentElement.scrollWidth"))
            if width > 390:
                wide[path] = width
            web.shoot(page, f"console-phone-{name}")
        return wide

    assert await browser.run(phone) == {}
