"""The Cegid Loop sandbox follows contracts/cegid-loop.md over a real socket, faults included."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files

KEY, SECRET = "firm-key", "firm-secret"


@pytest.fixture
def loop() -> Iterator[cegid_sandbox.CegidSandbox]:
    with cegid_sandbox.CegidSandbox() as sandbox:
        sandbox.add_firm(KEY, SECRET, ["DOS001", "DOS002"])
        sandbox.add_firm("other-key", "other-secret", ["OTHER01"])
        yield sandbox


def _headers(loop: cegid_sandbox.CegidSandbox, **extra: str) -> dict[str, str]:
    return {
        "Ocp-Apim-Subscription-Key": loop.subscription_key,
        "x-apikey": f"{KEY}:{SECRET}",
        "Content-Type": "application/pdf",
        **extra,
    }


def _params(**overrides: str) -> dict[str, str]:
    return {"context": "DOS001", "filename": "receipt.pdf", "transaction": "PURCHASE", **overrides}


def _store(
    loop: cegid_sandbox.CegidSandbox,
    content: Any = b"%PDF-1.4 receipt",
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
    **params: str,
) -> httpx.Response:
    return httpx.post(
        f"{loop.url}/storeDocument",
        params=_params(**params),
        content=content,
        headers=headers or _headers(loop),
        timeout=timeout,
    )


# ------------------------------------------------------------------------------ authentication


@pytest.mark.parametrize("key", [None, "wrong-subscription-key"])
def test_cegid_refuses_a_missing_or_wrong_subscription_key(
    loop: cegid_sandbox.CegidSandbox, key: str | None
) -> None:
    """Without the right Ocp-Apim-Subscription-Key: 401 with statusCode and message."""
    headers = _headers(loop)
    del headers["Ocp-Apim-Subscription-Key"]
    if key is not None:
        headers["Ocp-Apim-Subscription-Key"] = key
    response = _store(loop, headers=headers)
    assert response.status_code == 401
    assert response.json()["statusCode"] == 401
    assert "subscription key" in response.json()["message"]
    assert loop.stored == []


@pytest.mark.parametrize("apikey", ["", "firm-key", "firm-key:wrong", f"unknown:{SECRET}"])
def test_cegid_refuses_an_unknown_or_incomplete_api_key(
    loop: cegid_sandbox.CegidSandbox, apikey: str
) -> None:
    """x-apikey must be a known firm's key:secret, else 401."""
    response = _store(loop, headers=_headers(loop, **{"x-apikey": apikey}))
    assert response.status_code == 401
    assert loop.stored == []


# ------------------------------------------------------------------------------ journal


def test_cegid_journal_answers_data_for_an_associated_dossier(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """GET /journal?codeDossier=own&take=1 is 200 with data."""
    response = httpx.get(
        f"{loop.url}/journal", params={"codeDossier": "DOS002", "take": 1}, headers=_headers(loop)
    )
    assert response.status_code == 200
    assert response.json()["data"][0]["code"] == "ACH"


@pytest.mark.parametrize("dossier", ["OTHER01", "LONELY01"])
def test_cegid_journal_refuses_a_dossier_the_key_cannot_read(
    loop: cegid_sandbox.CegidSandbox, dossier: str
) -> None:
    """Another firm's dossier and one associated with no key both answer 403 'no access to the
    folder'."""
    loop.add_dossier("LONELY01")
    response = httpx.get(
        f"{loop.url}/journal", params={"codeDossier": dossier, "take": 1}, headers=_headers(loop)
    )
    assert response.status_code == 403
    assert f"has no access to the folder {dossier}" in response.json()["message"]


def test_cegid_journal_answers_no_data_for_a_dossier_loop_does_not_know(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """A code no firm ever had (a typo) reads as 200 without data, not as a refusal."""
    response = httpx.get(
        f"{loop.url}/journal", params={"codeDossier": "NOPE99", "take": 1}, headers=_headers(loop)
    )
    assert response.status_code == 200
    assert response.json()["data"] == []


# ------------------------------------------------------------------------------ storeDocument


def test_cegid_store_document_records_the_file_and_describes_it(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """A valid deposit answers 200 with id, fileName, context, transaction, PIA; c.stored has its hash."""
    content = files.jpeg(seed=3)
    response = _store(
        loop,
        content,
        headers=_headers(loop, **{"Content-Type": "image/jpeg"}),
        filename="2026-11-22 Zinc 84.00.jpg",
        transaction="SALE",
        uploadMode="API",
    )
    assert response.status_code == 200
    answer = response.json()
    (stored,) = loop.stored
    assert answer == {
        "id": stored.document_id,
        "fileName": "2026-11-22 Zinc 84.00.jpg",
        "context": "DOS001",
        "transaction": "SALE",
        "collectionStage": "PIA",
        "size": len(content),
    }
    assert (stored.dossier, stored.filename, stored.transaction, stored.content_type) == (
        "DOS001",
        "2026-11-22 Zinc 84.00.jpg",
        "SALE",
        "image/jpeg",
    )
    assert stored.sha256 == hashlib.sha256(content).hexdigest()
    assert stored.size == len(content)
    assert loop.stored_by_dossier("DOS001") == [stored]
    assert loop.stored_by_dossier("DOS002") == []


@pytest.mark.parametrize("content_type", ["image/heic", "image/gif", "application/octet-stream"])
def test_cegid_store_document_refuses_other_types_with_415(
    loop: cegid_sandbox.CegidSandbox, content_type: str
) -> None:
    """Only PDF, JPEG and PNG are accepted: anything else is 415 and not stored."""
    response = _store(loop, headers=_headers(loop, **{"Content-Type": content_type}))
    assert response.status_code == 415
    assert loop.stored == []


@pytest.mark.parametrize(
    ("params", "content"),
    [
        ({"filename": ""}, b"%PDF-1.4"),
        ({"context": ""}, b"%PDF-1.4"),
        ({"transaction": "EXPENSE"}, b"%PDF-1.4"),
        ({}, b""),
    ],
    ids=["no-filename", "no-context", "bad-transaction", "empty-body"],
)
def test_cegid_store_document_refuses_incomplete_requests_with_400(
    loop: cegid_sandbox.CegidSandbox, params: dict[str, str], content: bytes
) -> None:
    """A missing filename or context, a transaction other than PURCHASE/SALE, or no bytes: 400."""
    response = httpx.post(
        f"{loop.url}/storeDocument",
        params=_params(**params),
        content=content,
        headers=_headers(loop),
    )
    assert response.status_code == 400
    assert loop.stored == []


def test_cegid_store_document_refuses_over_50_mb_without_holding_it(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """A body of 50 MB + 1 byte, streamed, answers 413 and is not stored."""
    block = b"%" * (1024 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(50):
            yield block
        yield b"%"

    response = _store(loop, body(), timeout=60)
    assert response.status_code == 413
    assert loop.stored == []


def test_cegid_store_document_into_an_unknown_dossier_succeeds_and_goes_nowhere(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """The contract trap: context is not validated, so an unknown dossier answers 200 and is lost."""
    response = _store(loop, context="TYPO001")
    assert response.status_code == 200
    assert response.json()["context"] == "TYPO001"
    assert loop.stored == []
    assert [lost.dossier for lost in loop.lost] == ["TYPO001"]


def test_cegid_store_document_into_another_firms_dossier_is_403(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """A dossier that exists but is not associated with this key answers 403."""
    response = _store(loop, context="OTHER01")
    assert response.status_code == 403
    assert "has no access to the folder OTHER01" in response.json()["message"]
    assert loop.stored == []
    assert loop.lost == []


def test_cegid_duplicates_lists_content_stored_twice_in_one_dossier(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """The same bytes twice in one dossier is a duplicate; once in each of two dossiers is not."""
    assert _store(loop, b"%PDF-1 same", context="DOS001").status_code == 200
    assert _store(loop, b"%PDF-1 same", context="DOS002").status_code == 200
    assert loop.duplicates() == []
    assert _store(loop, b"%PDF-1 same", context="DOS001").status_code == 200
    assert loop.duplicates() == [hashlib.sha256(b"%PDF-1 same").hexdigest()]


# ------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("status", ["429", "500", "503", "400", "401", "403", "413", "415"])
def test_cegid_queued_status_fault_answers_it_once_without_storing(
    loop: cegid_sandbox.CegidSandbox, status: str
) -> None:
    """A queued status fault answers that status to the next deposit only; nothing is stored."""
    loop.faults.push(status)
    response = _store(loop)
    assert response.status_code == int(status)
    assert loop.stored == []
    assert loop.faults.injected[status] == 1
    assert _store(loop).status_code == 200
    assert len(loop.stored) == 1


def test_cegid_429_carries_the_configured_retry_after(loop: cegid_sandbox.CegidSandbox) -> None:
    """An injected 429 carries Retry-After with the configured value."""
    loop.faults.retry_after = "7"
    loop.faults.push("429")
    assert _store(loop).headers["retry-after"] == "7"


def test_cegid_faults_are_consumed_one_per_deposit_in_order(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Queued faults apply to successive storeDocument calls in order, not to /journal."""
    loop.faults.push("503", "500")
    journal = httpx.get(
        f"{loop.url}/journal", params={"codeDossier": "DOS001"}, headers=_headers(loop)
    )
    assert journal.status_code == 200
    assert [_store(loop).status_code for _ in range(3)] == [503, 500, 200]


def test_cegid_store_then_drop_stores_the_file_and_never_answers(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """The ambiguous case: the document is stored, then the connection is cut with no answer."""
    loop.faults.push("store_then_drop")
    with pytest.raises(httpx.TransportError):
        _store(loop)
    assert len(loop.stored) == 1
    assert loop.faults.ambiguous == 1


def test_cegid_drop_before_store_reads_the_body_and_stores_nothing(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """drop_before_store cuts the connection after the body, and the document is not stored."""
    loop.faults.push("drop_before_store")
    with pytest.raises(httpx.TransportError):
        _store(loop)
    assert loop.stored == []
    assert loop.faults.injected["drop_before_store"] == 1


def test_cegid_slow_fault_holds_the_answer_past_a_client_timeout(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """'slow:<s>' delays the answer, so a short client read timeout fires."""
    loop.faults.push("slow:5")
    with pytest.raises(httpx.ReadTimeout):
        _store(loop, timeout=0.2)
    assert loop.faults.injected["slow"] == 1


async def test_cegid_latency_does_not_block_other_requests(
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """While a deposit waits out latency_s, a journal read on another connection is answered."""
    loop.latency_s = 30
    async with httpx.AsyncClient(base_url=loop.url, headers=_headers(loop), timeout=60) as client:
        upload = asyncio.create_task(
            client.post("/storeDocument", params=_params(), content=b"%PDF-1.4 slow")
        )
        journal = await client.get("/journal", params={"codeDossier": "DOS001"})
        assert journal.status_code == 200
        assert not upload.done()
        upload.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upload


def _run_plan(seed: int, rate: float) -> tuple[list[int], dict[str, int], int]:
    with cegid_sandbox.CegidSandbox() as loop:
        loop.add_firm(KEY, SECRET, ["DOS001"])
        loop.faults.random_plan(seed, rate, kinds=("429", "500", "503"))
        with httpx.Client(base_url=loop.url, headers=_headers(loop)) as client:
            statuses = [
                client.post(
                    "/storeDocument", params=_params(), content=f"%PDF {i}".encode()
                ).status_code
                for i in range(30)
            ]
        return statuses, dict(loop.faults.injected), len(loop.stored)


def test_cegid_random_plan_is_reproducible_and_counted() -> None:
    """The same seed injects the same faults; every failed deposit is counted, every other stored."""
    statuses, injected, stored = _run_plan(3, 0.4)
    assert (statuses, injected, stored) == _run_plan(3, 0.4)
    assert sum(injected.values()) == sum(1 for s in statuses if s != 200) > 0
    assert stored == statuses.count(200)
    assert _run_plan(3, 0.0) == ([200] * 30, {}, 30)
