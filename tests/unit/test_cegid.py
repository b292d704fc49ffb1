"""The Cegid Loop boundary, faked at the HTTP level with httpx.MockTransport: every way a deposit or a
dossier check can end becomes one relay outcome."""

from __future__ import annotations

import datetime as dt
import email.utils
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from relay import config, errors
from relay.domain import credentials
from relay.upstreams import cegid

# a plain or an async handler, as httpx.MockTransport takes
Handler = Callable[[httpx.Request], Any]

SETTINGS = config.Settings(
    secret_key=config.Secret("k"),
    cegid_api_url="https://cegid.test/loop-api-publiques",
    cegid_subscription_key=config.Secret("partner-subscription-key"),
)
CREDS = credentials.CegidCredentials(
    api_key=config.Secret("firm-key"), api_secret=config.Secret("firm-secret")
)


class StreamingTransport(httpx.AsyncBaseTransport):
    """Like httpx.MockTransport, but the handler reads the request body itself, chunk by chunk
    (MockTransport reads it all first, so it cannot fail half-way through the body)."""

    def __init__(self, handler: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> None:
        self.handler = handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.handler(request)


async def _store(
    handler: Handler, path: pathlib.Path, *, streaming: bool = False, **overrides: str
) -> cegid.Stored:
    arguments = {
        "dossier": "ACME001",
        "file_name": "f.pdf",
        "transaction": "PURCHASE",
        "content_type": "application/pdf",
    }
    arguments.update(overrides)
    transport: httpx.AsyncBaseTransport = (
        StreamingTransport(handler) if streaming else httpx.MockTransport(handler)
    )
    size = len(CONTENT)
    async with cegid.http_client(SETTINGS, transport=transport) as http:
        return await cegid.CegidClient(SETTINGS, http).store_document(
            CREDS, path=path, size=size, **arguments
        )


async def _check(handler: Handler, dossier: str = "ACME001") -> None:
    async with cegid.http_client(SETTINGS, transport=httpx.MockTransport(handler)) as http:
        await cegid.CegidClient(SETTINGS, http).check_dossier(CREDS, dossier)


CONTENT = b"%PDF-1.7\n" + bytes(range(256)) * 800  # ~200 KiB: several chunks


@pytest.fixture
def pdf(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "file"
    path.write_bytes(CONTENT)
    return path


async def test_a_deposit_streams_the_raw_bytes_with_both_headers_and_the_query(
    pdf: pathlib.Path,
) -> None:
    """Raw bytes in ≤64 KiB chunks, Content-Type/Length, subscription key, x-apikey key:secret."""
    seen: dict[str, object] = {}
    sizes: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        chunks = [chunk async for chunk in request.stream]
        sizes.extend(len(c) for c in chunks)
        seen.update(
            body=b"".join(chunks),
            headers=request.headers,
            path=request.url.path,
            params=dict(request.url.params),
        )
        return httpx.Response(200, json={"id": "doc-1", "status": "received"})

    stored = await _store(
        handler, pdf, streaming=True, transaction="SALE", file_name="2026_x_receipt_a.pdf"
    )
    assert stored == cegid.Stored(200, {"id": "doc-1", "status": "received"}, "doc-1")
    assert seen["body"] == CONTENT
    assert max(sizes) <= cegid.CHUNK < sum(sizes)
    headers = seen["headers"]
    assert isinstance(headers, httpx.Headers)
    assert headers["ocp-apim-subscription-key"] == "partner-subscription-key"
    assert headers["x-apikey"] == "firm-key:firm-secret"
    assert headers["content-type"] == "application/pdf"
    assert headers["content-length"] == str(len(CONTENT))
    assert "authorization" not in headers
    assert seen["path"] == "/loop-api-publiques/storeDocument"
    assert seen["params"] == {
        "context": "ACME001",
        "filename": "2026_x_receipt_a.pdf",
        "transaction": "SALE",
        "uploadMode": "API",
    }


async def test_a_2xx_answer_is_kept_whole_even_without_an_id(pdf: pathlib.Path) -> None:
    """Loop's answer is not documented: a non-JSON 201 is kept as text, with no document id."""
    stored = await _store(lambda request: httpx.Response(201, text="OK stored"), pdf)
    assert stored == cegid.Stored(201, "OK stored", None)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, errors.CegidRateLimited),
        (500, errors.CegidUnavailable),
        (502, errors.CegidUnavailable),
        (503, errors.CegidUnavailable),
        (401, errors.CegidAccessRefused),
        (403, errors.CegidAccessRefused),
        (408, errors.CegidUnavailable),
        (400, errors.CegidFileRejected),
        (404, errors.CegidAccessRefused),
        (405, errors.CegidAccessRefused),
        (409, errors.CegidFileRejected),
        (413, errors.CegidFileRejected),
        (415, errors.CegidFileRejected),
        (422, errors.CegidFileRejected),
    ],
)
async def test_a_deposit_is_classified_by_its_status(
    status: int, error: type[Exception], pdf: pathlib.Path
) -> None:
    """Retry (408/429/5xx), flag the connection (401/403, and 404/405: no such route at the
    configured URL), or fail the file (other 4xx)."""
    with pytest.raises(error) as raised:
        await _store(lambda request: httpx.Response(status, json={"message": "no"}), pdf)
    assert type(raised.value) is error
    assert "firm-secret" not in str(raised.value)
    assert "partner-subscription-key" not in str(raised.value)


async def test_a_refused_file_carries_the_status_and_an_excerpt_of_the_answer(
    pdf: pathlib.Path,
) -> None:
    """415: the reason the operator reads names the status and what Loop said."""
    answer = {"message": "Unsupported media type: image/heic"}
    with pytest.raises(errors.CegidFileRejected) as raised:
        await _store(lambda request: httpx.Response(415, json=answer), pdf)
    assert raised.value.status == 415
    assert str(raised.value).startswith("Cegid refused the file (HTTP 415): ")
    assert "Unsupported media type" in raised.value.body


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("0.5", 0.5),
        (None, None),
        ("soon", None),
    ],
)
async def test_rate_limiting_carries_retry_after_in_seconds(
    header: str | None, expected: float | None, pdf: pathlib.Path
) -> None:
    """Retry-After in seconds is handed to the caller; a missing or garbled one is None."""
    headers = {"Retry-After": header} if header is not None else {}
    with pytest.raises(errors.CegidRateLimited) as raised:
        await _store(lambda request: httpx.Response(429, headers=headers), pdf)
    assert raised.value.retry_after == expected


async def test_retry_after_as_an_http_date_becomes_a_delay(pdf: pathlib.Path) -> None:
    """The HTTP-date form of Retry-After is turned into seconds from now."""
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    header = email.utils.format_datetime(when, usegmt=True)
    with pytest.raises(errors.CegidRateLimited) as raised:
        await _store(lambda request: httpx.Response(429, headers={"Retry-After": header}), pdf)
    assert raised.value.retry_after is not None
    assert 60 < raised.value.retry_after <= 120


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError],
)
async def test_no_answer_after_the_whole_body_is_outcome_unknown(
    failure: type[httpx.TransportError], pdf: pathlib.Path
) -> None:
    """The body went out, the answer did not come: Loop may hold the file; never a plain retry."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        raise failure("no answer", request=request)

    with pytest.raises(errors.OutcomeUnknown):
        await _store(handler, pdf)


@pytest.mark.parametrize(
    "failure",
    [httpx.ConnectError, httpx.ConnectTimeout, httpx.WriteError, httpx.WriteTimeout],
)
async def test_a_failure_before_the_whole_body_was_sent_is_retryable(
    failure: type[httpx.TransportError], pdf: pathlib.Path
) -> None:
    """Part of the body at most: Loop cannot have kept the file, so it is safe to send again."""

    async def handler(request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for _ in request.stream:  # the first chunk only
            break
        raise failure("broken", request=request)

    with pytest.raises(errors.CegidUnavailable) as raised:
        await _store(handler, pdf, streaming=True)
    assert not isinstance(raised.value, errors.OutcomeUnknown)


# ------------------------------------------------------------------------------ check_dossier


async def test_a_dossier_the_key_can_read_passes_the_check() -> None:
    """GET /journal?codeDossier=X&take=1 answered with data: the dossier is reachable."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"code": "ACH"}]})

    await _check(handler)
    assert seen[0].url.path == "/loop-api-publiques/journal"
    assert dict(seen[0].url.params) == {"codeDossier": "ACME001", "take": "1"}
    assert seen[0].headers["x-apikey"] == "firm-key:firm-secret"
    assert seen[0].headers["ocp-apim-subscription-key"] == "partner-subscription-key"


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_dossier_check_says_what_to_do(status: int) -> None:
    """401/403: an actionable message naming the dossier and Loop Hub, without the secret."""
    with pytest.raises(errors.CegidAccessRefused) as raised:
        await _check(lambda request: httpx.Response(status), "ACME001")
    message = str(raised.value)
    assert "ACME001" in message
    assert "Loop Hub" in message
    assert "firm-secret" not in message


@pytest.mark.parametrize("body", [{"data": []}, {"data": None}, {}])
async def test_a_dossier_with_no_data_is_not_found(body: dict[str, object]) -> None:
    """2xx without data: the code dossier is wrong or not associated with the key."""
    with pytest.raises(errors.CegidAccessRefused, match="dossier NOPE not found"):
        await _check(lambda request: httpx.Response(200, json=body), "NOPE")


async def test_an_unavailable_loop_makes_the_check_retryable() -> None:
    """429 with its Retry-After, 5xx, refused connection: try again later, nothing is wrong."""
    with pytest.raises(errors.CegidRateLimited) as limited:
        await _check(lambda request: httpx.Response(429, headers={"Retry-After": "3"}))
    assert limited.value.retry_after == 3.0
    with pytest.raises(errors.CegidUnavailable):
        await _check(lambda request: httpx.Response(503))

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(errors.CegidUnavailable):
        await _check(refuse)
