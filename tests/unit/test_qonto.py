"""The Qonto client (relay/upstreams/qonto.py), faked at the HTTP level with httpx.MockTransport.

Complements tests/unit/test_boundaries.py (API key verbatim, HTML refused, 429 exhausted, deleted
attachment, expired URL re-fetched, OAuth refreshed before expiry).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email.utils
import hashlib
import pathlib
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import orjson
import pytest

from relay import config, errors, models, retry
from relay.domain import credentials
from relay.upstreams import attachments, qonto
from tests.unit import clients

Handler = (
    Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]
)
API_KEY = credentials.QontoApiKey(login="org-login", secret=config.Secret("org-secret-key"))
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
T1 = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)


class Sleeps:
    """An injectable sleep that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def make(
    settings: config.Settings,
    handler: Handler,
    *,
    creds: credentials.QontoCredentials = API_KEY,
    sleep: Sleeps | None = None,
    rotated: list[credentials.QontoCredentials] | None = None,
) -> qonto.QontoClient:
    return clients.qonto_client(
        settings, handler, creds=creds, rotated=rotated, sleep=sleep or Sleeps()
    )


def query(request: httpx.Request) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(request.url.query.decode())


def oauth_settings() -> config.Settings:
    return config.Settings(
        secret_key=config.Secret("x" * 43 + "="),
        qonto_client_id="app",
        qonto_client_secret=config.Secret("app-secret"),
        qonto_oauth_url="https://oauth.test",
    )


# ------------------------------------------------------------------------------------ retries


async def test_retry_after_is_honoured_then_the_answer_is_returned(
    unit_settings: config.Settings,
) -> None:
    """Two 429s with Retry-After 2 and 7: the client waits exactly that long, then succeeds."""
    answers = iter(
        [
            httpx.Response(429, headers={"retry-after": "2"}),
            httpx.Response(429, headers={"retry-after": "7"}),
            httpx.Response(200, json={"membership": {"role": "owner"}}),
        ]
    )
    sleeps = Sleeps()
    client = make(unit_settings, lambda _: next(answers), sleep=sleeps)
    assert (await client.get_membership())["role"] == "owner"
    assert sleeps.delays == [2.0, 7.0]


async def test_retry_after_as_an_http_date_is_honoured_and_garbage_falls_back_to_backoff(
    unit_settings: config.Settings,
) -> None:
    """Qonto reads Retry-After as Cegid does: an HTTP date is the seconds until it (clamped to
    the longest wait allowed); a garbled one is ignored for the policy's own backoff."""
    far = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1), usegmt=True)
    answers = iter(
        [
            httpx.Response(503, headers={"retry-after": far}),
            httpx.Response(429, headers={"retry-after": "whenever"}),
            httpx.Response(200, json={"membership": {"role": "owner"}}),
        ]
    )
    sleeps = Sleeps()
    client = make(unit_settings, lambda _: next(answers), sleep=sleeps)
    assert (await client.get_membership())["role"] == "owner"
    assert sleeps.delays[0] == retry.RETRY_AFTER_MAX_S
    assert 0 <= sleeps.delays[1] <= qonto.POLICY.ceiling(2)


async def test_5xx_and_network_errors_are_retried_until_an_answer(
    unit_settings: config.Settings,
) -> None:
    """A 503 and a refused connection are transient: the third try's answer is returned."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(503)
        if calls == 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"organization": {"id": "org", "bank_accounts": []}})

    assert (await make(unit_settings, handler).get_organization())["id"] == "org"
    assert calls == 3


async def test_5xx_exhausted_is_unavailable_which_is_retryable(
    unit_settings: config.Settings,
) -> None:
    """After POLICY.attempts 502s the error is QontoUnavailable (Retryable), not a permanent one."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(502)

    with pytest.raises(errors.QontoUnavailable) as caught:
        await make(unit_settings, handler).get_membership()
    assert isinstance(caught.value, errors.Retryable)
    assert not isinstance(caught.value, errors.QontoRateLimited)
    assert calls == qonto.POLICY.attempts


def test_backoff_without_retry_after_is_full_jitter_capped() -> None:
    """Attempt n waits uniformly in [0, min(30, 0.5 * 2**(n-1))] seconds."""
    for attempt in range(1, 12):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        delays = [qonto.POLICY.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jittered over the whole range, not a constant


async def test_refused_credentials_are_auth_rejected_and_never_quote_the_key(
    unit_settings: config.Settings,
) -> None:
    """401 is QontoAuthRejected (permanent), not retried; the message carries no secret."""
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(401, json={"errors": [{"code": "unauthorized"}]})

    with pytest.raises(errors.QontoAuthRejected) as caught:
        await make(unit_settings, handler).get_membership()
    assert calls == 1
    assert "org-secret-key" not in str(caught.value)


async def test_a_client_error_is_a_protocol_error(unit_settings: config.Settings) -> None:
    """A 400 with a JSON:API error body is a QontoProtocolError quoting Qonto's detail."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"errors": [{"code": "bad", "detail": "per_page > 100"}]})

    with pytest.raises(errors.QontoProtocolError, match="per_page > 100"):
        await make(unit_settings, handler).get_membership()


# ------------------------------------------------------------------------------------ limiter


async def test_the_rate_limiter_waits_for_the_window_to_free_a_slot() -> None:
    """Three per 10 s: the fourth request waits until the first leaves the window."""
    now = 100.0
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        nonlocal now
        sleeps.append(seconds)
        now += seconds

    limiter = qonto.RateLimiter(3, 10.0, clock=lambda: now, sleep=sleep)
    for _ in range(3):
        await limiter.acquire()
        now += 1.0
    assert sleeps == []
    await limiter.acquire()  # first was at 100, now is 103: wait 7 s
    assert sleeps == [7.0]


async def test_the_rate_limiter_is_applied_to_every_attempt(
    unit_settings: config.Settings,
) -> None:
    """A limit of 2 per window: the third API call waits for the limiter before being sent."""
    now = 0.0
    limiter_waits: list[float] = []

    async def sleep(seconds: float) -> None:
        nonlocal now
        limiter_waits.append(seconds)
        now += seconds

    client = clients.qonto_client(
        unit_settings,
        lambda _: httpx.Response(200, json={"membership": {"role": "owner"}}),
        limiter=qonto.RateLimiter(2, 10.0, clock=lambda: now, sleep=sleep),
    )
    for _ in range(3):
        await client.get_membership()
    assert limiter_waits == [10.0]


# ------------------------------------------------------------------------------------ lists


async def test_lists_follow_next_page_and_stop_on_422_past_the_last_page(
    unit_settings: config.Settings,
) -> None:
    """Pages 1 and 2 are read (next_page says 3), page 3 answers 422: the walk ends quietly."""
    pages: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        page = query(request)["page"][0]
        pages.append(page)
        if page == "3":
            return httpx.Response(422, json={"errors": [{"code": "invalid_parameter"}]})
        items = [{"id": f"{page}-{i}", "updated_at": "2026-11-01T00:00:00Z"} for i in range(2)]
        meta = {"next_page": int(page) + 1}  # a server that never says null
        return httpx.Response(200, json={"supplier_invoices": items, "meta": meta})

    found = [i["id"] async for i in make(unit_settings, handler).supplier_invoices(T0, T1)]
    assert found == ["1-0", "1-1", "2-0", "2-1"]
    assert pages == ["1", "2", "3"]


async def test_a_422_on_the_first_page_is_an_error(unit_settings: config.Settings) -> None:
    """422 before any page was read means a bad request, not the end of the list."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json={"errors": [{"code": "invalid_parameter"}]})

    with pytest.raises(errors.QontoProtocolError):
        [i async for i in make(unit_settings, handler).supplier_invoices(T0, T1)]


async def test_supplier_invoices_are_asked_by_update_window_100_per_page(
    unit_settings: config.Settings,
) -> None:
    """filter[updated_at_from/to] in UTC, sort_by updated_at:asc, per_page 100."""
    seen: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(query(request))
        return httpx.Response(200, json={"supplier_invoices": [], "meta": {"next_page": None}})

    [i async for i in make(unit_settings, handler).supplier_invoices(T0, T1)]
    assert seen == [
        {
            "filter[updated_at_from]": ["2026-11-01T00:00:00.000Z"],
            "filter[updated_at_to]": ["2026-11-02T00:00:00.000Z"],
            "sort_by": ["updated_at:asc"],
            "page": ["1"],
            "per_page": ["100"],
        }
    ]


async def test_transactions_are_walked_per_bank_account_with_attachments(
    unit_settings: config.Settings,
) -> None:
    """Every bank account of the organization is listed with with_attachments and includes[]."""
    asked: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/organization":
            accounts = [{"id": "acc-1"}, {"id": "acc-2"}]
            return httpx.Response(200, json={"organization": {"bank_accounts": accounts}})
        params = query(request)
        asked.append(params)
        account = params["bank_account_id"][0]
        return httpx.Response(
            200, json={"transactions": [{"id": f"tx-{account}"}], "meta": {"next_page": None}}
        )

    found = [t["id"] async for t in make(unit_settings, handler).transactions(T0, T1)]
    assert found == ["tx-acc-1", "tx-acc-2"]
    for params in asked:
        assert params["with_attachments"] == ["true"]
        assert params["includes[]"] == ["attachments"]
        assert params["sort_by"] == ["updated_at:asc"]
        assert params["updated_at_from"] == ["2026-11-01T00:00:00.000Z"]


async def test_client_invoices_take_one_pass_per_exported_status(
    unit_settings: config.Settings,
) -> None:
    """unpaid then paid, one filter[status] each; a draft Qonto returns anyway is dropped."""
    statuses: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = query(request)["filter[status]"][0]
        statuses.append(status)
        items = [{"id": f"inv-{status}", "status": status}, {"id": "d", "status": "draft"}]
        return httpx.Response(200, json={"client_invoices": items, "meta": {"next_page": None}})

    found = [i["id"] async for i in make(unit_settings, handler).client_invoices(T0, T1)]
    assert statuses == ["unpaid", "paid"]
    assert found == ["inv-unpaid", "inv-paid"]


async def test_a_webhook_subscription_is_created_and_its_secret_returned(
    unit_settings: config.Settings,
) -> None:
    """POST /v2/webhook_subscriptions with callback_url, types and secret; 201's object returned."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.url.path == "/v2/webhook_subscriptions"
        sent.append(orjson.loads(request.content))
        return httpx.Response(
            201, json={"webhook_subscription": {"id": "sub-1", "secret": "s" * 40}}
        )

    created = await make(unit_settings, handler).create_webhook_subscription(
        "https://relay.test/webhooks/qonto/x", ["v1/transactions"], "s" * 40
    )
    assert created == {"id": "sub-1", "secret": "s" * 40}
    assert sent[0]["callback_url"] == "https://relay.test/webhooks/qonto/x"
    assert sent[0]["types"] == ["v1/transactions"]
    assert sent[0]["secret"] == "s" * 40


# ------------------------------------------------------------------------------------ attachments


async def test_an_attachment_is_parsed_and_its_url_is_never_in_its_repr(
    unit_settings: config.Settings,
) -> None:
    """file_size arrives as a string; created_at is parsed; repr masks the presigned URL."""
    url = "https://storage.test/a?X-Amz-Signature=very-secret"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "attachment": {
                    "id": "att",
                    "created_at": "2026-11-01T10:00:00.000Z",
                    "file_name": "ticket.pdf",
                    "file_size": "1234",
                    "file_content_type": "application/pdf",
                    "url": url,
                }
            },
        )

    attachment = await make(unit_settings, handler).get_attachment("att")
    assert attachment.file_size == 1234
    assert attachment.created_at == dt.datetime(2026, 11, 1, 10, tzinfo=dt.UTC)
    assert attachment.url == url
    assert "very-secret" not in repr(attachment)


def _attachment_then_storage(
    storage: Callable[[httpx.Request], httpx.Response],
) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "storage.test":
            return storage(request)
        return httpx.Response(
            200,
            json={
                "attachment": {
                    "id": "att",
                    "file_name": "f.pdf",
                    "file_content_type": "application/pdf",
                    "url": "https://storage.test/f?sig=secret-signature",
                }
            },
        )

    return handler


async def test_a_download_is_hashed_measured_and_written(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """Size, sha256 and the first 16 bytes of the streamed file, plus Qonto's name and type."""
    content = b"%PDF-1.7\n" + bytes(range(256)) * 1000
    done = await make(
        unit_settings, _attachment_then_storage(lambda _: httpx.Response(200, content=content))
    ).download("att", tmp_path / "f")
    assert done.size == len(content)
    assert done.sha256 == hashlib.sha256(content).hexdigest()
    assert done.head == content[:16]
    assert (done.file_name, done.content_type) == ("f.pdf", "application/pdf")
    assert (tmp_path / "f").read_bytes() == content


async def test_storage_5xx_is_retried_with_the_same_url(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """A 500 then a 200 from object storage: the file arrives; the URL is not in any error."""
    answers = iter([httpx.Response(500), httpx.Response(200, content=b"\x89PNG\r\n\x1a\nrest")])
    sleeps = Sleeps()
    done = await make(
        unit_settings, _attachment_then_storage(lambda _: next(answers)), sleep=sleeps
    ).download("att", tmp_path / "f")
    assert done.head.startswith(b"\x89PNG")
    assert len(sleeps.delays) == 1


async def test_storage_that_keeps_failing_is_unavailable_without_the_url(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """Every storage try answers 503: QontoUnavailable, whose text carries no presigned URL."""
    with pytest.raises(errors.QontoUnavailable) as caught:
        await make(unit_settings, _attachment_then_storage(lambda _: httpx.Response(503))).download(
            "att", tmp_path / "f"
        )
    assert "secret-signature" not in str(caught.value)
    assert "storage.test" not in str(caught.value)


async def test_a_file_missing_from_storage_is_not_found(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """Storage 404 (deleted between the URL and the GET) is QontoNotFound, like the attachment."""
    with pytest.raises(errors.QontoNotFound):
        await make(unit_settings, _attachment_then_storage(lambda _: httpx.Response(404))).download(
            "att", tmp_path / "f"
        )


async def test_a_url_still_refused_after_a_fresh_one_is_unavailable(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """403 twice: one fresh URL is asked for, then the error is reported (no endless loop)."""
    storage_calls = 0

    def storage(_: httpx.Request) -> httpx.Response:
        nonlocal storage_calls
        storage_calls += 1
        return httpx.Response(403)

    with pytest.raises(errors.QontoUnavailable):
        await make(unit_settings, _attachment_then_storage(storage)).download("att", tmp_path / "f")
    assert storage_calls == 2


class _Endless(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b"\0" * (1024 * 1024)
        for _ in range(models.MAX_UPLOAD_BYTES // len(chunk) + 5):
            yield chunk


async def test_a_file_over_the_size_limit_stops_the_download(
    unit_settings: config.Settings, tmp_path: pathlib.Path
) -> None:
    """More than 50 MB arriving: TooLarge (permanent) with the size received so far."""
    with pytest.raises(attachments.TooLarge) as caught:
        await make(
            unit_settings,
            _attachment_then_storage(lambda _: httpx.Response(200, stream=_Endless())),
        ).download("att", tmp_path / "big")
    assert isinstance(caught.value, errors.Permanent)
    assert caught.value.size > models.MAX_UPLOAD_BYTES
    assert (tmp_path / "big").stat().st_size <= models.MAX_UPLOAD_BYTES


# ------------------------------------------------------------------------------------ OAuth


def _oauth_handler(
    tokens: list[dict[str, list[str]]],
) -> Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)  # let the other calls run while this one waits for Qonto
        if request.url.host == "oauth.test":
            form = urllib.parse.parse_qs(request.content.decode())
            tokens.append(form)
            n = len(tokens)
            return httpx.Response(
                200,
                json={"access_token": f"a{n}", "refresh_token": f"r{n}", "expires_in": 3600},
            )
        assert request.headers["authorization"].startswith("Bearer a")
        return httpx.Response(200, json={"membership": {"role": "owner"}})

    return handler


async def test_concurrent_calls_share_one_refresh() -> None:
    """Five calls with an expired token: one POST /oauth2/token, one rotation handed over."""
    tokens: list[dict[str, list[str]]] = []
    rotated: list[credentials.QontoCredentials] = []
    expired = credentials.QontoOAuth(
        refresh_token=config.Secret("r0"),
        access_token=config.Secret("a0"),
        expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
    )
    client = make(oauth_settings(), _oauth_handler(tokens), creds=expired, rotated=rotated)
    await asyncio.gather(*(client.get_membership() for _ in range(5)))
    assert len(tokens) == 1
    assert tokens[0] == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["r0"],
        "client_id": ["app"],
        "client_secret": ["app-secret"],
    }
    assert len(rotated) == 1


async def test_a_fresh_access_token_is_used_without_refreshing() -> None:
    """An access token with more than five minutes left is sent as is."""
    tokens: list[dict[str, list[str]]] = []
    fresh = credentials.QontoOAuth(
        refresh_token=config.Secret("r0"),
        access_token=config.Secret("a-current"),
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30),
    )
    client = make(oauth_settings(), _oauth_handler(tokens), creds=fresh)
    await client.get_membership()
    assert tokens == []


async def test_a_refused_refresh_token_asks_for_a_reconnection() -> None:
    """The token endpoint answering 400 invalid_grant is QontoAuthRejected naming the fix."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid_grant"})

    creds = credentials.QontoOAuth(refresh_token=config.Secret("revoked"))
    with pytest.raises(errors.QontoAuthRejected, match="reconnect"):
        await make(oauth_settings(), handler, creds=creds).get_membership()


async def test_oauth_without_app_credentials_is_a_configuration_error(
    unit_settings: config.Settings,
) -> None:
    """An OAuth connection while RELAY_QONTO_CLIENT_ID/SECRET are unset says which to set."""
    creds = credentials.QontoOAuth(refresh_token=config.Secret("r"))
    with pytest.raises(errors.ConfigurationError, match="RELAY_QONTO_CLIENT_ID"):
        await make(unit_settings, lambda _: httpx.Response(500), creds=creds).get_membership()


class FlakyStore:
    """An ``on_tokens_rotated`` callback whose database is down for the first ``failures`` calls."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0
        self.stored: list[credentials.QontoCredentials] = []

    async def __call__(self, creds: credentials.QontoCredentials) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise errors.DatabaseUnavailable(
                "store credentials: PostgreSQL unavailable (ConnectionRefusedError)"
            )
        self.stored.append(creds)


def _rotating_client(
    store: FlakyStore, sleeps: Sleeps, clock: list[dt.datetime]
) -> tuple[qonto.QontoClient, list[str]]:
    """An OAuth client whose access token has expired; the token endpoint rotates the refresh
    token to ``rotated-refresh-N`` with access ``rotated-access-N``. Returns the client and the
    refresh tokens the endpoint was sent."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "oauth.test":
            sent.append(urllib.parse.parse_qs(request.content.decode())["refresh_token"][0])
            n = len(sent)
            body = {
                "access_token": f"rotated-access-{n}",
                "refresh_token": f"rotated-refresh-{n}",
                "expires_in": 3600,
            }
            return httpx.Response(200, json=body)
        assert request.headers["authorization"] == "Bearer rotated-access-1"
        return httpx.Response(200, json={"membership": {"role": "owner"}})

    expired = credentials.QontoOAuth(
        refresh_token=config.Secret("stored-refresh-0"),
        access_token=config.Secret("stored-access-0"),
        expires_at=clock[0] - dt.timedelta(minutes=1),
    )
    client = clients.qonto_client(
        oauth_settings(),
        handler,
        creds=expired,
        on_tokens_rotated=store,
        sleep=sleeps,
        now=lambda: clock[0],
    )
    return client, sent


def _refresh_token(creds: credentials.QontoCredentials) -> str:
    assert isinstance(creds, credentials.QontoOAuth)
    return creds.refresh_token.reveal()


async def test_a_rotated_token_store_that_fails_is_retried_with_backoff() -> None:
    """The database refuses the rotated token twice: the store is retried after backoff and the
    third try keeps it; the call itself succeeds and nothing is left unsaved."""
    store, sleeps, clock = FlakyStore(failures=2), Sleeps(), [dt.datetime.now(dt.UTC)]
    client, sent = _rotating_client(store, sleeps, clock)
    assert (await client.get_membership())["role"] == "owner"
    assert sent == ["stored-refresh-0"]
    assert store.calls == 3
    assert [_refresh_token(c) for c in store.stored] == ["rotated-refresh-1"]
    assert len(sleeps.delays) == 2
    assert all(0 <= d <= 0.5 * 2 for d in sleeps.delays)
    assert not client.tokens_unsaved


async def test_a_rotated_token_that_cannot_be_stored_is_kept_and_stored_by_the_next_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every store try fails: the call still succeeds on the fresh token, a warning
    qonto_tokens_unsaved names no secret, the token stays flagged; the next call (after the retry
    gap) stores it, without refreshing again (the old refresh token is dead 60 s later)."""
    store, sleeps, clock = (
        FlakyStore(failures=qonto.STORE_POLICY.attempts),
        Sleeps(),
        [dt.datetime.now(dt.UTC)],
    )
    client, sent = _rotating_client(store, sleeps, clock)
    assert (await client.get_membership())["role"] == "owner"
    assert store.calls == qonto.STORE_POLICY.attempts
    assert store.stored == []
    assert client.tokens_unsaved
    logged = capsys.readouterr().err
    [warning] = [
        orjson.loads(line) for line in logged.splitlines() if "qonto_tokens_unsaved" in line
    ]
    assert warning["level"] == "warning"
    assert warning["attempts"] == qonto.STORE_POLICY.attempts
    assert warning["reason"] == "DatabaseUnavailable"
    for secret in ("rotated-refresh-1", "rotated-access-1", "stored-refresh-0", "app-secret"):
        assert secret not in logged

    await client.get_membership()  # within the retry gap: the database is left alone
    assert store.calls == qonto.STORE_POLICY.attempts

    clock[0] += qonto.STORE_RETRY_GAP
    await client.get_membership()
    assert [_refresh_token(c) for c in store.stored] == ["rotated-refresh-1"]
    assert not client.tokens_unsaved
    assert sent == ["stored-refresh-0"]
    assert await client.save_tokens() is True
    assert store.calls == qonto.STORE_POLICY.attempts + 1


async def test_save_tokens_reports_a_rotation_still_unsaved() -> None:
    """save_tokens (the scan's last word) tries once more and says whether the token is stored."""
    store, sleeps, clock = (
        FlakyStore(failures=qonto.STORE_POLICY.attempts + 1),
        Sleeps(),
        [dt.datetime.now(dt.UTC)],
    )
    client, _ = _rotating_client(store, sleeps, clock)
    await client.get_membership()
    assert await client.save_tokens() is False
    assert await client.save_tokens() is True
    assert [_refresh_token(c) for c in store.stored] == ["rotated-refresh-1"]


# ------------------------------------------------------------------------------------ clients


async def test_only_the_api_client_carries_the_base_url_and_staging_token(
    unit_settings: config.Settings,
) -> None:
    """Storage gets no base URL, no staging token, no auth; timeouts are explicit."""
    settings = dataclasses.replace(
        unit_settings,
        qonto_api_url="https://thirdparty-sandbox.staging.qonto.co",
        qonto_staging_token=config.Secret("staging-token"),
    )
    async with qonto.http_clients(settings) as http:
        assert str(http.api.base_url).startswith("https://thirdparty-sandbox.staging.qonto.co")
        assert http.api.headers["x-qonto-staging-token"] == "staging-token"
        assert http.api.timeout == httpx.Timeout(connect=5, read=30, write=30, pool=10)
        assert str(http.storage.base_url) == ""
        assert "x-qonto-staging-token" not in http.storage.headers
        assert "authorization" not in http.storage.headers
        assert http.storage.timeout.read == 60
    assert http.api.is_closed
    assert http.storage.is_closed
