"""The console over HTTP (the relay's application on its port, the real PostgreSQL): sign-in and its
session, the guards (no session, expired session, no CSRF token: nothing changes), every page, the
audit of each change, and a connection's documents paginated by keyset."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import httpx
import pytest

from relay import config
from relay.broker import amqp
from relay.domain import heartbeat
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories
from tests.integration.web import conftest as web

FORM = {"content-type": "application/x-www-form-urlencoded"}
PAGES = (
    "/console/",
    "/console/runs",
    "/console/dead-letters",
    "/console/invitations",
    "/console/health",
)


@pytest.fixture
async def connection(
    web_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> uuid.UUID:
    return await factories.connect(web_settings, pool, qonto)


@pytest.fixture
async def client(relay_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=relay_url, timeout=15) as value:
        yield value


def token(settings: config.Settings) -> str:
    assert settings.admin_token is not None
    return settings.admin_token.reveal()


async def sign_in(client: httpx.AsyncClient, settings: config.Settings) -> str:
    """Sign in as an operator; the CSRF token of the session's pages."""
    form = await client.get("/console/login")
    assert form.status_code == 200
    done = await client.post(
        "/console/login",
        data={"csrf_token": web.csrf(form.text), "admin_token": token(settings)},
        headers=FORM,
    )
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/console/"
    return web.csrf((await client.get("/console/")).text)


async def test_without_a_session_every_page_leads_to_the_sign_in(
    client: httpx.AsyncClient, connection: uuid.UUID
) -> None:
    """Every console page, a connection's included, redirects to /console/login."""
    for path in (*PAGES, f"/console/connections/{connection}", "/console/runs/1"):
        answer = await client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"] == "/console/login"


async def test_a_wrong_token_is_refused_and_a_right_one_gives_a_new_session(
    client: httpx.AsyncClient, web_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """A wrong admin token: 401, audited as refused; the right one: a new session id (HttpOnly,
    SameSite=Lax), the pages open, and Sign out ends it."""
    form = await client.get("/console/login")
    before = client.cookies.get("relay_session")
    wrong = await client.post(
        "/console/login",
        data={"csrf_token": web.csrf(form.text), "admin_token": "not-the-token"},
        headers=FORM,
    )
    assert wrong.status_code == 401
    assert 'role="alert"' in wrong.text
    refused = await pool.fetchrow("SELECT who, outcome FROM audit_log WHERE action = 'sign_in'")
    assert refused is not None
    assert refused["outcome"] == "refused"
    done = await client.post(
        "/console/login",
        data={"csrf_token": web.csrf(form.text), "admin_token": token(web_settings)},
        headers=FORM,
    )
    assert done.status_code == 303
    cookie = done.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert client.cookies.get("relay_session") != before
    for path in PAGES:
        page = await client.get(path)
        assert page.status_code == 200, (path, page.text)
        for label in ("Connections", "Runs", "Dead letters", "Invitations", "Sign out"):
            assert label in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "script-src" not in page.headers["content-security-policy"]
    csrf = web.csrf((await client.get("/console/")).text)
    out = await client.post("/console/logout", data={"csrf_token": csrf}, headers=FORM)
    assert out.status_code == 303
    assert (await client.get("/console/")).status_code == 303
    assert token(web_settings) not in " ".join(
        str(r) for r in await pool.fetch("SELECT * FROM audit_log")
    )


async def test_no_csrf_token_no_session_or_an_expired_one_changes_nothing(
    client: httpx.AsyncClient,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
) -> None:
    """Disconnect without the token (403), with another session's token (403), without a session
    and with an expired one (back to the sign-in): the connection stays active; the two refused
    tokens are audited as refused, nothing else."""
    csrf = await sign_in(client, web_settings)
    path = f"/console/connections/{connection}/disconnect"
    assert (await client.post(path, data={}, headers=FORM)).status_code == 403
    assert (await client.post(path, data={"csrf_token": "forged"}, headers=FORM)).status_code == 403
    async with httpx.AsyncClient(base_url=str(client.base_url)) as stranger:
        answer = await stranger.post(path, data={"csrf_token": csrf}, headers=FORM)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/login"
    await pool.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second'")
    expired = await client.post(path, data={"csrf_token": csrf}, headers=FORM)
    assert expired.status_code == 303
    assert expired.headers["location"] == "/console/login"
    assert await pool.fetchval("SELECT state FROM connections") == "active"
    refused = await pool.fetch("SELECT * FROM audit_log WHERE action <> 'sign_in' ORDER BY id")
    assert [(r["action"], r["outcome"]) for r in refused] == [("csrf_refused", "refused")] * 2
    assert all(r["who"].startswith("session ") and path in r["detail"] for r in refused)


async def test_a_change_is_audited_and_shown_on_the_page_it_changed(
    client: httpx.AsyncClient,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
) -> None:
    """Disconnect: the connection is disconnected, the audit says who (the session), what, the
    outcome, and the connection's page shows it."""
    csrf = await sign_in(client, web_settings)
    done = await client.post(
        f"/console/connections/{connection}/disconnect", data={"csrf_token": csrf}, headers=FORM
    )
    assert done.status_code == 303
    assert await pool.fetchval("SELECT state FROM connections") == "disconnected"
    entry = await pool.fetchrow("SELECT * FROM audit_log WHERE action = 'disconnect_connection'")
    assert entry is not None
    assert entry["who"].startswith("session ")
    assert entry["outcome"] == "ok"
    assert entry["target"] == str(connection)
    page = await client.get(done.headers["location"])
    assert 'role="status"' in page.text
    assert "disconnected: its webhooks are refused" in page.text
    assert entry["who"] in page.text


async def _documents(pool: asyncpg.Pool, connection: uuid.UUID, n: int) -> None:
    await pool.execute(
        """
        INSERT INTO documents (connection_id, source, qonto_resource_id, qonto_attachment_id,
                               direction, state, reason, file_name)
        SELECT $1, 'transaction', 'tx-' || i, 'att-' || i, 'PURCHASE',
               CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'uploaded' END,
               CASE WHEN i % 10 = 0 THEN 'Cegid refused the file (400)' END,
               'receipt-' || i || '.pdf'
        FROM generate_series(1, $2) AS i
        """,
        connection,
        n,
    )


async def test_documents_are_listed_newest_first_a_page_at_a_time_and_filtered(
    client: httpx.AsyncClient,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
) -> None:
    """120 documents: 50 on a page, newest first, Older documents leads to the next 50 (by id, not
    by offset); the state filter and the file-name search narrow them."""
    await sign_in(client, web_settings)
    await _documents(pool, connection, 120)
    first = await client.get(f"/console/connections/{connection}")
    names = re.findall(r"<td>(receipt-\d+\.pdf)</td>", first.text)
    assert names[0] == "receipt-120.pdf"
    assert len(names) == 50
    older = re.search(
        r'href="(/console/connections/[^"]+before=\d+[^"]*)">Older documents', first.text
    )
    assert older is not None
    second = await client.get(older.group(1).replace("&amp;", "&"))
    names2 = re.findall(r"<td>(receipt-\d+\.pdf)</td>", second.text)
    assert names2[0] == "receipt-70.pdf"
    assert len(names2) == 50
    failed = await client.get(f"/console/connections/{connection}", params={"state": "failed"})
    assert len(re.findall(r"<td>receipt-\d+\.pdf</td>", failed.text)) == 12
    assert failed.text.count(">Retry</button>") == 12
    found = await client.get(f"/console/connections/{connection}", params={"q": "receipt-11"})
    assert sorted(re.findall(r"<td>(receipt-\d+\.pdf)</td>", found.text)) == sorted(
        ["receipt-11.pdf", *(f"receipt-{n}.pdf" for n in range(110, 120))]
    )


async def test_health_and_metrics_show_the_last_scheduled_run(
    client: httpx.AsyncClient, web_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """The last scheduled run: on the health page and in /metrics (start and finish, Unix time)."""
    run_id = await pool.fetchval(
        "INSERT INTO runs (kind, scheduled_for, started_at, finished_at) VALUES ('scheduled', "
        "'2026-11-24', '2026-11-24 20:00:00+00', '2026-11-24 20:03:00+00') RETURNING id"
    )
    await sign_in(client, web_settings)
    health = await client.get("/console/health")
    assert f"Run {run_id}</a> for 2026-11-24" in health.text
    assert "finished 2026-11-24 20:03 UTC" in health.text
    scraped = (await client.get("/metrics")).text
    assert "relay_last_scheduled_run_started_timestamp_seconds 1.7955504e+09" in scraped
    assert "relay_last_scheduled_run_finished_timestamp_seconds 1.79555058e+09" in scraped


async def test_the_runs_page_says_when_no_scheduler_would_run_a_flush_asked_for(
    client: httpx.AsyncClient, web_settings: config.Settings
) -> None:
    """No live scheduler: Flush now would wait, and the page says so; with one beating, it does not."""
    await sign_in(client, web_settings)
    assert "No scheduler is running" in (await client.get("/console/runs")).text
    async with heartbeat.beating(web_settings, "scheduler", work=heartbeat.Work()):
        deadline = asyncio.get_running_loop().time() + 10  # its first beat is on its way
        while "No scheduler is running" in (await client.get("/console/runs")).text:
            assert asyncio.get_running_loop().time() < deadline, "the scheduler is not seen"
            await asyncio.sleep(0.1)


async def test_hostile_page_inputs_answer_a_clean_page_or_404_never_500(
    client: httpx.AsyncClient,
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
) -> None:
    """Huge numbers, garbage cursors, NUL bytes and SQL-ish strings in a page's query, path or form:
    a page (200), 400 or 404, never a server error, and nothing changed."""
    csrf = await sign_in(client, web_settings)
    here = f"/console/connections/{connection}"
    gets = [
        f"{here}?before=99999999999999999999999",
        f"{here}?before=-1&state=x'%20OR%201=1--&source=%00",
        f"{here}?q=%00",
        f"{here}?q=%27%3B%20DROP%20TABLE%20documents%3B--",
        f"{here}?q=%25_%5C&notice=1e9",
        f"{here}?q=%ED%A0%80",
        "/console/connections/not-a-uuid",
        "/console/runs?before=%00",
        "/console/runs/99999999999999999999",
        "/console/runs/-1",
        "/console/dead-letters?reason=%00&connection=%27--",
        "/console/dead-letters/%00",
        "/console/dead-letters/..%2F..",
        "/console/?notice=%00",
        "/console/runs/%C2%B2",
        "/console/runs?before=%C2%B2",
        f"{here}?before=%C2%B2&notice=%C2%B2",
    ]
    answered = {path: (await client.get(path)).status_code for path in gets}
    assert {p: s for p, s in answered.items() if s not in (200, 400, 404)} == {}
    posts = [
        ("/console/invitations", {"client_name": "Acme\x00"}),
        ("/console/invitations/revoke", {"id": "\x00"}),
        ("/console/documents/99999999999999999999/retry", {}),
        ("/console/dead-letters/replay", {"id": "\x00"}),
        ("/console/documents/%C2%B2/retry", {}),
    ]
    posted = {
        path: (await client.post(path, data={"csrf_token": csrf, **form}, headers=FORM)).status_code
        for path, form in posts
    }
    assert {p: s for p, s in posted.items() if s not in (303, 400, 403, 404)} == {}
    assert await pool.fetchval("SELECT count(*) FROM invitations") == 0
    assert await pool.fetchval("SELECT count(*) FROM documents") == 0


async def test_an_invitation_the_relay_cannot_make_is_audited_as_failed(
    web_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """Without RELAY_QONTO_CLIENT_ID, Create invitation makes nothing and says the relay is not
    configured; the audit records the attempt as failed, with the reason."""
    unconfigured = dataclasses.replace(web_settings, qonto_client_id=None)
    async with (
        web.serving(unconfigured) as url,
        httpx.AsyncClient(base_url=url, timeout=15) as client,
    ):
        csrf = await sign_in(client, unconfigured)
        answer = await client.post(
            "/console/invitations", data={"csrf_token": csrf, "client_name": "Acme"}, headers=FORM
        )
    assert answer.status_code >= 500
    assert await pool.fetchval("SELECT count(*) FROM invitations") == 0
    entry = await pool.fetchrow("SELECT * FROM audit_log WHERE action = 'create_invitation'")
    assert entry is not None
    assert entry["outcome"] == "failed"
    assert "RELAY_QONTO_CLIENT_ID" in entry["detail"]


async def test_a_batch_in_the_dead_letters_lists_its_events(
    client: httpx.AsyncClient, web_settings: config.Settings
) -> None:
    """A batch RabbitMQ dead-lettered shows as one letter whose page lists each event and its
    connection."""
    first, second = uuid.uuid4(), uuid.uuid4()
    bodies = [b'{"id": "evt-a", "type": "v1/cards"}', b'{"id": "evt-b", "type": "v1/cards"}']
    listed = [
        {"id": event_id, "connection": str(connection), "received_at_ms": 1, "size": len(body)}
        for event_id, connection, body in (
            ("evt-a", first, bodies[0]),
            ("evt-b", second, bodies[1]),
        )
    ]
    async with await aio_pika.connect(web_settings.amqp_url.reveal()) as conn:
        channel = await conn.channel()
        await amqp.declare(channel, web_settings)
        await channel.close()
        publisher = await amqp.Publisher.open(conn, web_settings)
        await publisher.publish(
            web_settings.dead_letter_queue,
            b"".join(bodies),
            message_id="batch-dl",
            headers={amqp.HEADER_BATCH: listed},
        )
        await publisher.close()
    await sign_in(client, web_settings)
    listing = await client.get("/console/dead-letters")
    assert "2 events in one message" in listing.text
    page = await client.get("/console/dead-letters/batch-dl")
    assert page.status_code == 200
    for event_id, connection in (("evt-a", first), ("evt-b", second)):
        assert re.search(
            rf"<td>{event_id}</td><td><a href=\"/console/connections/{connection}\">", page.text
        )
