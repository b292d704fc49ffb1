"""The setup pages over HTTP, with the real PostgreSQL, both sandboxes on real sockets and the
relay's application on its port: links, sessions, CSRF, the OAuth state, cookies and headers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import uuid

import asyncpg
import httpx

from relay import config, crypto
from relay.sandbox import qonto as qonto_sandbox
from tests.integration.web import conftest as web

FORM = {"content-type": "application/x-www-form-urlencoded"}


def _token(setup_url: str) -> str:
    return setup_url.rsplit("/", 1)[1]


async def _invitation(pool: asyncpg.Pool) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM invitations")
    assert row is not None
    return row


async def test_invite_prints_a_single_use_link_whose_token_is_stored_hashed(
    web_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """`relay connections invite --json`: id, setup_url, expires_at (7 days); 256 random bits in
    the token, of which the database holds only the SHA-256."""
    done = await asyncio.to_thread(
        web.relay_command, web_settings, "connections", "invite", "--client-name", "Acme", "--json"
    )
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert set(value) == {"id", "setup_url", "expires_at"}
    assert value["setup_url"].startswith(f"{web_settings.public_url}/setup/")
    token = _token(value["setup_url"])
    padded = token + "=" * (-len(token) % 4)
    import base64

    assert len(base64.urlsafe_b64decode(padded)) * 8 >= 128
    expires = dt.datetime.fromisoformat(value["expires_at"])
    assert (
        dt.timedelta(days=6, hours=23) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=7)
    )
    rows = await pool.fetch("SELECT row_to_json(i)::text AS row FROM invitations i")
    dumped = " ".join(r["row"] for r in rows)  # every column, bytea as hex
    assert "Acme" in dumped
    assert token not in dumped
    assert hashlib.sha256(token.encode()).hexdigest() in dumped

    no_app = dataclasses.replace(web_settings, qonto_client_id=None, qonto_client_secret=None)
    refused = await asyncio.to_thread(
        web.relay_command, no_app, "connections", "invite", "--client-name", "Acme"
    )
    assert refused.returncode == 2
    assert "RELAY_QONTO_CLIENT_ID" in refused.stderr


async def test_a_used_an_expired_or_a_wrong_link_answers_404_asking_for_a_new_one(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """404 with a page saying to ask the firm for a new link, whatever the reason."""
    expired = await web.invite(web_settings, pool, "Expired")
    used = await web.invite(web_settings, pool, "Used")
    await pool.execute(
        "UPDATE invitations SET expires_at = now() - interval '1 second' WHERE client_name = $1",
        "Expired",
    )
    await pool.execute("UPDATE invitations SET used_at = now() WHERE client_name = 'Used'")
    async with httpx.AsyncClient(base_url=relay_url) as client:
        for url in (expired, used, f"{relay_url}/setup/{'x' * 43}"):
            page = await client.get(url)
            assert page.status_code == 404
            assert "Ask the accounting firm for a new setup link" in page.text
            assert "set-cookie" not in page.headers


async def test_guessing_links_is_rate_limited_per_address(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """20 wrong links in 10 minutes, then 429 with Retry-After, even for a valid link."""
    good = await web.invite(web_settings, pool)
    async with httpx.AsyncClient(base_url=relay_url) as client:
        for _ in range(20):
            assert (await client.get(f"/setup/{crypto.generate_key()[:43]}")).status_code == 404
        blocked = await client.get(good)
        assert blocked.status_code == 429
        assert 0 < int(blocked.headers["retry-after"]) <= 600
        assert "Too many attempts" in blocked.text
    assert await pool.fetchval("SELECT qonto_connected_at FROM invitations") is None


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """403 for a missing, wrong or other session's token; nothing stored, no redirect to Qonto."""
    link = await web.invite(web_settings, pool)
    async with (
        httpx.AsyncClient(base_url=relay_url) as client,
        httpx.AsyncClient(base_url=relay_url) as other,
    ):
        mine = csrf = web.csrf((await client.get(link)).text)
        theirs = web.csrf((await other.get(link)).text)
        assert mine != theirs
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": theirs}):
            refused = await client.post("/setup/qonto", data=data, headers=FORM)
            assert refused.status_code == 403
            assert "Nothing was changed" in refused.text
        json_body = await client.post(
            "/setup/qonto", json={"csrf_token": csrf}, headers={"content-type": "application/json"}
        )
        assert json_body.status_code == 403
    assert await pool.fetchval("SELECT count(*) FROM oauth_states") == 0


async def test_the_consent_state_must_be_known_unused_and_from_this_browser(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """An unknown, tampered, reused or other browser's state ends on a refusal; nothing stored."""
    link = await web.invite(web_settings, pool)
    async with (
        httpx.AsyncClient(base_url=relay_url) as client,
        httpx.AsyncClient(base_url=relay_url) as other,
    ):
        unknown = await client.get("/setup/oauth/callback", params={"state": "x" * 43, "code": "c"})
        assert unknown.status_code == 403
        callback = await web.consent(client, link)
        state = callback.params["state"]
        tampered = callback.copy_set_param("state", state[:-1] + ("A" if state[-1] != "A" else "B"))
        assert (await client.get(tampered)).status_code == 403

        await other.get(link)  # a browser of its own, with its own session
        elsewhere = await other.get(callback)
        assert elsewhere.status_code == 403
        assert "does not belong to a setup started in this browser" in elsewhere.text
        assert await pool.fetchval("SELECT qonto_tokens FROM invitations") is None

        again = await web.consent(client, link)
        accepted = await client.get(again)
        assert accepted.status_code == 303
        assert accepted.headers["location"] == "/setup/key"
        reused = await client.get(again)
        assert reused.status_code == 403
    assert await pool.fetchval("SELECT qonto_tokens IS NOT NULL FROM invitations")


async def test_session_cookies_are_httponly_lax_and_secure_under_https(
    web_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """HttpOnly and SameSite=Lax always; Secure when RELAY_PUBLIC_URL is https."""
    for public, secure in ((web_settings.public_url, False), ("https://relay.example.com", True)):
        settings = dataclasses.replace(web_settings, public_url=public)
        link = await web.invite(settings, pool)
        async with web.serving(settings), httpx.AsyncClient() as client:
            page = await client.get(f"http://127.0.0.1:{settings.port}/setup/{_token(link)}")
        cookie = page.headers["set-cookie"].lower()
        assert cookie.startswith("relay_session=")
        assert "httponly" in cookie
        assert "samesite=lax" in cookie
        assert "path=/" in cookie
        assert ("secure" in cookie.split("; ")) is secure
        if secure:
            assert page.headers["strict-transport-security"].startswith("max-age=")


async def test_every_page_carries_the_security_headers_and_no_script(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """CSP without inline script (frame-ancestors none), no referrer, nosniff, DENY, no-store."""
    link = await web.invite(web_settings, pool)
    async with httpx.AsyncClient(base_url=relay_url) as client:
        responses = [
            await client.get(link),
            await client.get("/setup/does-not-exist"),
            await client.get("/setup/oauth/callback"),
            await client.get("/static/pages.css"),
        ]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert "script-src" not in csp  # default-src 'none': no script at all
        assert f"form-action 'self' {web_settings.qonto_oauth_url}" in csp
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert "<script" not in response.text
    assert responses[3].headers["content-type"].startswith("text/css")


async def test_a_plan_qonto_does_not_name_goes_on_saying_it_was_not_verified(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    relay_url: str,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """{"plan": null}: the accountant's steps follow, with the notice."""
    qonto.plan = None
    link = await web.invite(web_settings, pool)
    async with httpx.AsyncClient(base_url=relay_url, follow_redirects=True) as client:
        page = await client.get(await web.consent(client, link))
    assert page.url.path == "/setup/key"
    assert "The Qonto plan could not be verified" in page.text
    assert (await _invitation(pool))["qonto_plan"] is None


async def test_the_admin_api_creates_and_lists_invitations_without_their_token(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """POST /admin/invitations: 201 with the link; GET lists them, state and next step, no token."""
    assert web_settings.admin_token is not None
    auth = {"authorization": f"Bearer {web_settings.admin_token.reveal()}"}
    async with httpx.AsyncClient(base_url=relay_url, headers=auth) as client:
        created = await client.post("/admin/invitations", json={"client_name": "Acme"})
        assert created.status_code == 201
        token = _token(created.json()["setup_url"])
        listed = await client.get("/admin/invitations")
        assert (await client.post("/admin/invitations", json={})).status_code == 400
    assert listed.status_code == 200
    [item] = listed.json()
    assert (item["id"], item["state"], item["next_step"]) == (created.json()["id"], "open", "qonto")
    assert token not in listed.text
    assert uuid.UUID(item["id"])


async def _accountant_steps(client: httpx.AsyncClient, link: str) -> str:
    """Consent, key, dossier (ACME001): the Loop Hub page's CSRF token, ready for Create."""
    assert (await client.get(await web.consent(client, link))).status_code == 303
    page = await client.get("/setup/key")
    token = web.csrf(page.text)
    saved = await client.post(
        "/setup/key",
        data={"csrf_token": token, "api_key": web.API_KEY, "api_secret": web.API_SECRET},
        headers=FORM,
    )
    assert saved.headers["location"] == "/setup/dossier"
    saved = await client.post(
        "/setup/dossier",
        data={"csrf_token": token, "cegid_dossier": "ACME001", "cegid_domain": "CABINET"},
        headers=FORM,
    )
    assert saved.headers["location"] == "/setup/hub"
    return token


async def test_create_makes_the_whole_connection_or_nothing(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    relay_url: str,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Qonto refuses the second webhook subscription: the first is deleted again, no connection,
    the link still open and the reason on the Loop Hub step; Create again succeeds."""
    from relay.sandbox.http import json_error

    subscribe, calls = qonto._subscribe, []

    def second_fails(body: bytes) -> object:
        calls.append(body)
        if len(calls) == 2:
            return json_error(422, "invalid_parameter", "refused by the test")
        return subscribe(body)

    qonto._subscribe = second_fails  # type: ignore[method-assign,assignment]
    link = await web.invite(web_settings, pool)
    async with httpx.AsyncClient(base_url=relay_url) as client:
        token = await _accountant_steps(client, link)
        failed = await client.post("/setup/create", data={"csrf_token": token}, headers=FORM)
        assert failed.headers["location"] == "/setup/hub"
        hub = await client.get("/setup/hub")
        assert 'role="alert"' in hub.text
        assert "Nothing was created" in hub.text
        assert qonto.subscriptions() == []
        assert await pool.fetchval("SELECT count(*) FROM connections") == 0
        assert await pool.fetchval("SELECT used_at FROM invitations") is None
        qonto._subscribe = subscribe  # type: ignore[method-assign]
        done = await client.post("/setup/create", data={"csrf_token": token}, headers=FORM)
        assert done.headers["location"] == "/setup/ready"
    assert await pool.fetchval("SELECT count(*) FROM connections") == 1
    assert len(qonto.subscriptions()) == 3


async def test_two_creates_at_once_make_one_connection(
    web_settings: config.Settings,
    pool: asyncpg.Pool,
    relay_url: str,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A double submission: one connection, the loser's webhook subscriptions deleted again."""
    link = await web.invite(web_settings, pool)
    async with httpx.AsyncClient(base_url=relay_url) as client:
        token = await _accountant_steps(client, link)
        answers = await asyncio.gather(
            *(
                client.post("/setup/create", data={"csrf_token": token}, headers=FORM)
                for _ in range(2)
            )
        )
    assert sorted(a.status_code for a in answers) in ([303, 303], [303, 404])
    connection_id = await pool.fetchval("SELECT id FROM connections")
    assert await pool.fetchval("SELECT count(*) FROM connections") == 1
    assert {s["callback_url"].rsplit("/", 1)[1] for s in qonto.subscriptions()} == {
        str(connection_id)
    }
    assert len(qonto.subscriptions()) == 3


async def test_an_expired_session_must_open_the_link_again(
    web_settings: config.Settings, pool: asyncpg.Pool, relay_url: str
) -> None:
    """Past its idle time a session is gone: the steps say to open the link again; the link works."""
    link = await web.invite(web_settings, pool)
    async with httpx.AsyncClient(base_url=relay_url) as client:
        await client.get(link)
        await pool.execute("UPDATE web_sessions SET expires_at = now() - interval '1 second'")
        page = await client.get("/setup/qonto")
        assert page.status_code == 400
        assert "Open the setup link you received again" in page.text
        assert (await client.get(link)).status_code == 200
    assert await pool.fetchval("SELECT count(*) FROM web_sessions WHERE expires_at > now()") == 1
