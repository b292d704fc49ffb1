"""The Qonto sandbox follows contracts/qonto.md over a real socket, faults included."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from tests.conftest import load_fixture


@pytest.fixture
def qonto() -> Iterator[qonto_sandbox.QontoSandbox]:
    with qonto_sandbox.QontoSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def api(qonto: qonto_sandbox.QontoSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=qonto.url, headers={"Authorization": qonto.api_key_header}, timeout=10
    ) as client:
        yield client


def _receipt(qonto: qonto_sandbox.QontoSandbox, seed: int = 0) -> str:
    return qonto.add_attachment(
        files.jpeg(seed=seed), file_name=f"ticket-{seed}.jpg", content_type="image/jpeg"
    )


def _storage_path(url: str) -> str:
    return url.split("127.0.0.1:", 1)[1].split("/", 1)[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


# ------------------------------------------------------------------------------ authentication


def test_qonto_refuses_a_request_without_credentials(qonto: qonto_sandbox.QontoSandbox) -> None:
    """No Authorization header: 401 with a JSON:API error body."""
    response = httpx.get(f"{qonto.url}/v2/membership")
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "header",
    [
        "Basic c2FuZGJveC1sb2dpbjpzYW5kYm94LXNlY3JldC1rZXk=",
        "Bearer sandbox-login:sandbox-secret-key",
        "sandbox-login:wrong",
    ],
)
def test_qonto_accepts_the_api_key_only_verbatim(
    qonto: qonto_sandbox.QontoSandbox, header: str
) -> None:
    """`login:secret` must be sent as is: Basic, Bearer or a wrong secret get 401."""
    response = httpx.get(f"{qonto.url}/v2/membership", headers={"Authorization": header})
    assert response.status_code == 401


def test_qonto_staging_without_its_token_answers_an_html_page_with_200() -> None:
    """With a staging token set, a request lacking X-Qonto-Staging-Token gets 200 text/html."""
    with qonto_sandbox.QontoSandbox(staging_token="stage-123") as qonto:
        auth = {"Authorization": qonto.api_key_header}
        trap = httpx.get(f"{qonto.url}/v2/membership", headers=auth)
        assert trap.status_code == 200
        assert trap.headers["content-type"].startswith("text/html")
        ok = httpx.get(
            f"{qonto.url}/v2/membership", headers={**auth, "X-Qonto-Staging-Token": "stage-123"}
        )
        assert ok.json()["membership"]["organization_id"] == qonto.organization_id


def test_qonto_oauth_refresh_issues_a_working_bearer_and_rotates_the_refresh_token(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A refresh gives a 1-hour bearer that works, and a new refresh token; the old one dies 60 s later."""
    refresh = qonto.add_oauth_client("app", "app-secret")
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "client_id": "app",
        "client_secret": "app-secret",
    }
    answer = httpx.post(f"{qonto.oauth_url}/oauth2/token", data=form).json()
    assert answer["expires_in"] == 3600
    assert answer["token_type"] == "bearer"
    assert answer["refresh_token"] != refresh
    bearer = {"Authorization": f"Bearer {answer['access_token']}"}
    assert httpx.get(f"{qonto.url}/v2/organization", headers=bearer).status_code == 200

    assert httpx.post(f"{qonto.oauth_url}/oauth2/token", data=form).status_code == 200
    qonto.clock_offset_s = 61
    assert httpx.post(f"{qonto.oauth_url}/oauth2/token", data=form).status_code == 400
    rotated = {**form, "refresh_token": answer["refresh_token"]}
    assert httpx.post(f"{qonto.oauth_url}/oauth2/token", data=rotated).status_code == 200

    qonto.clock_offset_s = 3601
    assert httpx.get(f"{qonto.url}/v2/organization", headers=bearer).status_code == 401


def test_qonto_oauth_refuses_a_wrong_client_secret(qonto: qonto_sandbox.QontoSandbox) -> None:
    """The token endpoint answers 401 invalid_client for a wrong client secret."""
    refresh = qonto.add_oauth_client("app", "app-secret")
    response = httpx.post(
        f"{qonto.oauth_url}/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": "app",
            "client_secret": "nope",
        },
    )
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}


# ------------------------------------------------------------------------------ organization


def test_qonto_membership_shows_the_configured_role(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """GET /v2/membership carries the role (configurable) and the organization id."""
    membership = api.get("/v2/membership").json()["membership"]
    assert membership["role"] == "admin"
    assert set(load_fixture("api-membership.json")["membership"]) <= set(membership)
    qonto.membership_role = "reporting"
    assert api.get("/v2/membership").json()["membership"]["role"] == "reporting"


def test_qonto_organization_lists_its_bank_account(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """GET /v2/organization gives the id and a bank account with id, slug and iban."""
    organization = api.get("/v2/organization").json()["organization"]
    assert organization["id"] == qonto.organization_id
    assert {"id", "slug", "legal_name"} <= set(organization)
    (account,) = organization["bank_accounts"]
    assert account["id"] == qonto.bank_account_id
    assert {"slug", "iban"} <= set(account)


# ------------------------------------------------------------------------------ transactions


def test_qonto_transactions_require_a_bank_account_or_iban(api: httpx.Client) -> None:
    """Listing transactions without bank_account_id or iban answers 422."""
    assert api.get("/v2/transactions").status_code == 422


def test_qonto_transactions_paginate_in_updated_order_with_meta(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """Pages follow meta.next_page in updated_at order; past the last page is 422; per_page > 100 is 422."""
    created = [
        qonto.add_transaction(side="debit", amount=i, label=f"SHOP {i}", attachment_ids=[])
        for i in range(5)
    ]
    params: dict[str, Any] = {"bank_account_id": qonto.bank_account_id, "per_page": 2}
    seen, page, metas = [], 1, []
    while page is not None:
        body = api.get("/v2/transactions", params={**params, "page": page}).json()
        seen += [t["id"] for t in body["transactions"]]
        metas.append(body["meta"])
        page = body["meta"]["next_page"]
    assert seen == [t["id"] for t in created]
    assert metas[0] == {
        "current_page": 1,
        "next_page": 2,
        "prev_page": None,
        "total_pages": 3,
        "total_count": 5,
        "per_page": 2,
    }
    assert metas[-1]["next_page"] is None
    assert api.get("/v2/transactions", params={**params, "page": 4}).status_code == 422
    too_many = {"bank_account_id": qonto.bank_account_id, "per_page": 101}
    assert api.get("/v2/transactions", params=too_many).status_code == 422


def test_qonto_transactions_filter_by_updated_window_and_attachments(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """updated_at_from/to bound the list; with_attachments=true keeps only transactions with files."""
    old = qonto.add_transaction(side="debit", amount=1, label="OLD", attachment_ids=[])
    bare = qonto.add_transaction(side="debit", amount=2, label="BARE", attachment_ids=[])
    with_file = qonto.add_transaction(
        side="credit", amount=3, label="SALE", attachment_ids=[_receipt(qonto)]
    )
    params = {"iban": "FR7616958000019876543210987", "updated_at_from": bare["updated_at"]}
    window = api.get("/v2/transactions", params=params).json()["transactions"]
    assert [t["id"] for t in window] == [bare["id"], with_file["id"]]
    upto = api.get(
        "/v2/transactions", params={**params, "updated_at_to": bare["updated_at"]}
    ).json()
    assert [t["id"] for t in upto["transactions"]] == [bare["id"]]
    attached = api.get("/v2/transactions", params={**params, "with_attachments": "true"}).json()
    assert [t["id"] for t in attached["transactions"]] == [with_file["id"]]
    assert old["id"] not in {t["id"] for t in window}


def test_qonto_every_mutation_bumps_updated_at_strictly(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Seeding and updating in a burst still yields strictly increasing updated_at stamps."""
    tx = qonto.add_transaction(side="debit", amount=9, label="X", attachment_ids=[])
    stamps = [tx["updated_at"]]
    for _ in range(20):
        stamps.append(qonto.update_transaction(tx["id"], attachment_ids=[])["updated_at"])
    parsed = [dt.datetime.fromisoformat(s.replace("Z", "+00:00")) for s in stamps]
    assert all(a < b for a, b in itertools.pairwise(parsed))


def test_qonto_after_page_hook_updates_an_item_between_two_page_requests(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """A hook run after page 1 updates an item of page 1 out of the window: page 2 is recomputed,
    the later items shift up, and a plain offset walk never sees the one that moved onto page 1."""
    created = [
        qonto.add_supplier_invoice(
            attachment_id=_receipt(qonto, i), supplier_name=f"S{i}", total="1.00"
        )
        for i in range(5)
    ]
    pages: list[int] = []

    def hook(n: int) -> None:
        pages.append(n)
        if n == 1:
            qonto.set_supplier_invoice_status(created[0]["id"], "paid")

    qonto.after_page("/v2/supplier_invoices", hook)
    window = {"filter[updated_at_to]": dt.datetime.now(dt.UTC).isoformat(), "per_page": 2}
    seen = []
    for page in (1, 2):
        body = api.get("/v2/supplier_invoices", params={**window, "page": page}).json()
        seen += [i["id"] for i in body["supplier_invoices"]]
    assert pages == [1, 2]
    assert seen == [created[i]["id"] for i in (0, 1, 3, 4)]  # created[2] shifted onto page 1
    assert body["meta"]["next_page"] is None  # and the list now ends on page 2
    assert api.get("/v2/supplier_invoices", params={**window, "page": 3}).status_code == 422


def test_qonto_one_instant_stamps_every_item_alike_then_stamps_move_on(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Inside one_instant every updated_at is the same; after it, stamps increase again."""
    with qonto.one_instant() as stamp:
        bulk = [
            qonto.add_transaction(side="debit", amount=i, label="BULK", attachment_ids=[])
            for i in range(3)
        ]
    after = qonto.add_transaction(side="debit", amount=9, label="AFTER", attachment_ids=[])
    assert {t["updated_at"] for t in bulk} == {stamp}
    assert after["updated_at"] > stamp


def test_qonto_list_totals_can_be_left_out_of_meta(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """list_totals = False: meta keeps next_page (documented) but no total_count or total_pages."""
    qonto.list_totals = False
    meta = api.get("/v2/supplier_invoices").json()["meta"]
    assert meta["next_page"] is None
    assert "total_count" not in meta
    assert "total_pages" not in meta


def test_qonto_transaction_attachments_lists_the_live_files(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """GET /v2/transactions/{id}/attachments lists its attachments, minus deleted ones."""
    kept, deleted = _receipt(qonto, 1), _receipt(qonto, 2)
    tx = qonto.add_transaction(side="debit", amount=5, label="X", attachment_ids=[kept, deleted])
    qonto.delete_attachment(deleted)
    body = api.get(f"/v2/transactions/{tx['id']}/attachments").json()
    assert [a["id"] for a in body["attachments"]] == [kept]
    assert api.get("/v2/transactions/unknown/attachments").status_code == 404


# ------------------------------------------------------------------------------ attachments


def test_qonto_attachment_has_the_documented_shape_and_a_fresh_url(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """GET /v2/attachments/{id}: the fixture's fields, file_size as a string, a presigned URL."""
    content = files.pdf(seed=4)
    attachment_id = qonto.add_attachment(
        content, file_name="facture.pdf", content_type="application/pdf"
    )
    attachment = api.get(f"/v2/attachments/{attachment_id}").json()["attachment"]
    assert set(load_fixture("api-attachment.json")["attachment"]) == set(attachment)
    assert attachment["file_size"] == str(len(content))
    assert attachment["file_name"] == "facture.pdf"
    assert attachment["probative_attachment"] == {"status": "unavailable"}
    assert re.fullmatch(
        rf"{re.escape(qonto.url)}/storage/{attachment_id}\?expires=\d+&sig=[0-9a-f]{{64}}",
        attachment["url"],
    )
    download = httpx.get(attachment["url"])
    assert download.status_code == 200
    assert download.content == content
    assert download.headers["content-type"] == "application/pdf"


def test_qonto_deleted_or_unknown_attachment_is_404(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """A deleted attachment and an unknown id both answer 404 with a JSON:API error."""
    attachment_id = _receipt(qonto)
    qonto.delete_attachment(attachment_id)
    response = api.get(f"/v2/attachments/{attachment_id}")
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "not_found"
    assert api.get("/v2/attachments/nope").status_code == 404


def test_qonto_storage_refuses_a_request_carrying_authorization(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """The presigned URL with an Authorization header answers 400, as S3 does."""
    url = api.get(f"/v2/attachments/{_receipt(qonto)}").json()["attachment"]["url"]
    response = httpx.get(url, headers={"Authorization": qonto.api_key_header})
    assert response.status_code == 400
    assert b"InvalidArgument" in response.content


def test_qonto_storage_url_expires_after_30_minutes_by_the_sandbox_clock(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """A URL still works at 29 minutes and answers 403 past 30 minutes on the sandbox clock."""
    url = api.get(f"/v2/attachments/{_receipt(qonto)}").json()["attachment"]["url"]
    qonto.clock = 29 * 60
    assert httpx.get(url).status_code == 200
    qonto.clock = 30 * 60 + 2
    expired = httpx.get(url)
    assert expired.status_code == 403
    assert b"AccessDenied" in expired.content


def test_qonto_storage_refuses_a_tampered_signature(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """Changing the expiry of a presigned URL breaks its signature: 403."""
    url = api.get(f"/v2/attachments/{_receipt(qonto)}").json()["attachment"]["url"]
    expires = int(re.search(r"expires=(\d+)", url).group(1))  # type: ignore[union-attr]
    forged = url.replace(f"expires={expires}", f"expires={expires + 3600}")
    assert httpx.get(forged).status_code == 403


def test_qonto_serves_a_20_mb_synthetic_attachment_without_holding_it(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """A 20 MB synthetic file streams whole and intact while the process RSS grows far less than 20 MB."""
    spec = files.Synthetic("pdf", 20 * 1024 * 1024, seed=11)
    attachment_id = qonto.add_attachment(spec, file_name="big.pdf", content_type=spec.content_type)
    url = api.get(f"/v2/attachments/{attachment_id}").json()["attachment"]["url"]
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    digest, size = hashlib.sha256(), 0
    with httpx.stream("GET", url) as response:
        assert response.headers["content-length"] == str(spec.size)
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    peak_growth_kib = _status_kib("VmHWM") - before
    assert size == spec.size
    assert digest.hexdigest() == spec.sha256()
    assert peak_growth_kib < 10 * 1024


# ------------------------------------------------------------------------------ invoices


def test_qonto_supplier_invoices_match_the_fixture_shape_and_filter_by_update(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """Supplier invoices carry the fixture's fields and honour filter[updated_at_from]."""
    first = qonto.add_supplier_invoice(
        attachment_id=_receipt(qonto, 1), supplier_name="OVH SAS", total="71.88"
    )
    second = qonto.add_supplier_invoice(
        attachment_id=_receipt(qonto, 2), supplier_name="Free", total="29.99", status="paid"
    )
    body = api.get("/v2/supplier_invoices", params={"sort_by": "updated_at:asc"}).json()
    fixture = load_fixture("api-supplier-invoices-page.json")
    assert set(fixture["supplier_invoices"][0]) <= set(body["supplier_invoices"][0])
    assert set(fixture["meta"]) == set(body["meta"])
    assert [i["id"] for i in body["supplier_invoices"]] == [first["id"], second["id"]]
    later = api.get(
        "/v2/supplier_invoices", params={"filter[updated_at_from]": second["updated_at"]}
    ).json()
    assert [i["id"] for i in later["supplier_invoices"]] == [second["id"]]


def test_qonto_client_invoices_filter_by_status_and_read_one(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """filter[status] selects invoices; GET /v2/client_invoices/{id} shows attachment_id; unknown is 404."""
    draft = qonto.add_client_invoice(attachment_id=_receipt(qonto, 1), status="draft", total="10")
    paid = qonto.add_client_invoice(attachment_id=_receipt(qonto, 2), status="paid", total="20")
    listed = api.get("/v2/client_invoices", params={"filter[status]": "unpaid,paid"}).json()
    assert [i["id"] for i in listed["client_invoices"]] == [paid["id"]]
    qonto.set_client_invoice_status(draft["id"], "unpaid")
    listed = api.get("/v2/client_invoices", params={"filter[status]": "unpaid,paid"}).json()
    assert [i["id"] for i in listed["client_invoices"]] == [paid["id"], draft["id"]]
    one = api.get(f"/v2/client_invoices/{paid['id']}").json()["client_invoice"]
    assert set(load_fixture("api-client-invoice.json")["client_invoice"]) <= set(one)
    assert one["attachment_id"] == paid["attachment_id"]
    assert api.get("/v2/client_invoices/unknown").status_code == 404


# ------------------------------------------------------------------------------ webhooks


def test_qonto_transaction_event_has_the_fixture_envelope(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """transaction_event builds the fixture's envelope and data fields, a fresh id each time."""
    tx = qonto.add_transaction(
        side="debit", amount="84.00", label="LE PETIT ZINC", attachment_ids=[_receipt(qonto)]
    )
    fixture = load_fixture("webhook-transaction-updated.json")
    event = qonto.transaction_event(tx)
    assert set(event) == set(fixture)
    assert set(fixture["data"]) <= set(event["data"])
    assert event["type"] == "v1/transactions"
    assert event["organization_id"] == qonto.organization_id
    assert event["data"]["attachment_ids"] == tx["attachment_ids"]
    assert qonto.transaction_event(tx)["id"] != event["id"]


def test_qonto_client_invoice_event_omits_attachment_id_unless_asked(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """client_invoice_event drops attachment_id by default, as Qonto's payload may."""
    invoice = qonto.add_client_invoice(attachment_id=_receipt(qonto), status="paid", total="1")
    fixture = load_fixture("webhook-client-invoice-updated.json")
    event = qonto.client_invoice_event(invoice)
    assert set(event) == set(fixture)
    assert event["type"] == "v1/client-invoices"
    assert "attachment_id" not in event["data"]
    with_id = qonto.client_invoice_event(invoice, with_attachment_id=True)
    assert with_id["data"]["attachment_id"] == invoice["attachment_id"]


def test_qonto_webhook_subscriptions_create_list_read_delete(api: httpx.Client) -> None:
    """Creation answers 201 with a generated 64-hex secret; later reads hide it; delete removes it."""
    created = api.post(
        "/v2/webhook_subscriptions",
        json={
            "callback_url": "https://relay.example/webhooks/qonto/1",
            "types": ["v1/transactions"],
        },
    )
    assert created.status_code == 201
    subscription = created.json()["webhook_subscription"]
    assert re.fullmatch(r"[0-9a-f]{64}", subscription["secret"])
    listed = api.get("/v2/webhook_subscriptions").json()["subscriptions"]
    assert [s["id"] for s in listed] == [subscription["id"]]
    assert "secret" not in listed[0]
    one = api.get(f"/v2/webhook_subscriptions/{subscription['id']}").json()
    assert "secret" not in one["webhook_subscription"]
    assert api.delete(f"/v2/webhook_subscriptions/{subscription['id']}").status_code == 204
    assert api.get("/v2/webhook_subscriptions").json()["subscriptions"] == []


def test_qonto_webhook_subscription_keeps_a_given_secret_and_validates_input(
    api: httpx.Client,
) -> None:
    """A given secret is returned as is; http callbacks, empty types and short secrets are 422."""
    secret = "s" * 40
    created = api.post(
        "/v2/webhook_subscriptions",
        json={
            "callback_url": "https://r.example/x",
            "types": ["v1/transactions"],
            "secret": secret,
        },
    )
    assert created.json()["webhook_subscription"]["secret"] == secret
    for bad in (
        {"callback_url": "http://r.example/x", "types": ["v1/transactions"]},
        {"callback_url": "https://r.example/x", "types": []},
        {"callback_url": "https://r.example/x", "types": ["v1/transactions"], "secret": "short"},
    ):
        assert api.post("/v2/webhook_subscriptions", json=bad).status_code == 422


# ------------------------------------------------------------------------------ limits and faults


def test_qonto_rate_limit_answers_429_with_retry_after(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """Past the limit within its window, requests answer 429 with Retry-After (or without, if told)."""
    qonto.rate_limit = 20
    statuses = [api.get("/v2/membership").status_code for _ in range(20)]
    assert statuses == [200] * 20
    limited = api.get("/v2/membership")
    assert limited.status_code == 429
    assert "retry-after" in limited.headers
    qonto.faults.omit_retry_after = True
    assert "retry-after" not in api.get("/v2/membership").headers


def test_qonto_default_rate_limit_is_1000_per_10_seconds(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The sandbox defaults to the contract's limit of 1,000 requests per 10 s."""
    assert (qonto.rate_limit, qonto.rate_window_s) == (1000, 10.0)


def test_qonto_fail_next_hits_only_matching_paths_the_given_number_of_times(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """fail_next('/v2/attachments/', 503, count=2) fails two attachment reads, nothing else."""
    attachment_id = _receipt(qonto)
    qonto.faults.fail_next("/v2/attachments/", 503, count=2)
    assert api.get("/v2/membership").status_code == 200
    statuses = [api.get(f"/v2/attachments/{attachment_id}").status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert qonto.faults.injected["503"] == 2


def test_qonto_injected_429_carries_the_requested_retry_after(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """An injected 429 carries the given Retry-After, or none when omit_retry_after is set."""
    qonto.faults.fail_next("/v2/transactions", 429, retry_after=2.5)
    response = api.get("/v2/transactions", params={"bank_account_id": qonto.bank_account_id})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2.5"
    qonto.faults.omit_retry_after = True
    qonto.faults.fail_next("/v2/transactions", 429)
    response = api.get("/v2/transactions", params={"bank_account_id": qonto.bank_account_id})
    assert response.status_code == 429
    assert "retry-after" not in response.headers


def test_qonto_slow_fault_delays_the_answer_past_a_client_timeout(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """slow() holds the next matching answer, so a short client read timeout fires, once."""
    qonto.faults.slow("/v2/organization", 5.0)
    auth = {"Authorization": qonto.api_key_header}
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{qonto.url}/v2/organization", headers=auth, timeout=0.2)
    assert httpx.get(f"{qonto.url}/v2/organization", headers=auth).status_code == 200
    assert qonto.faults.injected["slow"] == 1


def test_qonto_expire_next_urls_issues_already_expired_links(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """After expire_next_urls(1), the next URL answers 403 and the one after works."""
    attachment_id = _receipt(qonto)
    qonto.faults.expire_next_urls(1)
    first = api.get(f"/v2/attachments/{attachment_id}").json()["attachment"]["url"]
    second = api.get(f"/v2/attachments/{attachment_id}").json()["attachment"]["url"]
    assert httpx.get(first).status_code == 403
    assert httpx.get(second).status_code == 200
    assert qonto.faults.injected["expired_url"] == 1


def _run_plan(seed: int, rate: float) -> tuple[list[int], dict[str, int]]:
    with qonto_sandbox.QontoSandbox() as qonto:
        attachment_id = _receipt(qonto)
        qonto.faults.random_plan(seed, rate)
        statuses = []
        with httpx.Client(headers={"Authorization": qonto.api_key_header}) as client:
            for _ in range(30):
                answer = client.get(f"{qonto.url}/v2/attachments/{attachment_id}")
                statuses.append(answer.status_code)
        return statuses, dict(qonto.faults.injected)


def test_qonto_random_plan_is_reproducible_and_counted() -> None:
    """The same seed injects the same faults; every injected error status is counted."""
    statuses, injected = _run_plan(7, 0.3)
    assert (statuses, injected) == _run_plan(7, 0.3)
    errors = [s for s in statuses if s != 200]
    assert errors
    assert len(errors) == injected.get("429", 0) + injected.get("500", 0) + injected.get("503", 0)
    assert _run_plan(7, 0.0) == ([200] * 30, {})


def test_qonto_request_log_records_authorization_presence_never_its_value(
    qonto: qonto_sandbox.QontoSandbox, api: httpx.Client
) -> None:
    """q.requests holds (method, path, has_authorization) and no credential."""
    api.get("/v2/membership")
    httpx.get(f"{qonto.url}/v2/organization")
    assert qonto.requests == [
        ("GET", "/v2/membership", True),
        ("GET", "/v2/organization", False),
    ]
    assert qonto.secret_key not in repr(qonto.requests)
