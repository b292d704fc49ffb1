"""The Qonto sandbox's OAuth consent (page, Authorize/Deny, authorization_code grant), its
``/v2/subscription``, and its signed webhook deliveries, over real sockets."""

from __future__ import annotations

import urllib.parse

import httpx
import pytest

from relay.sandbox import qonto as qonto_sandbox
from relay.sandbox import signing

CLIENT_ID, CLIENT_SECRET = "app", "app-secret"
CALLBACK = "https://relay.example.com/setup/oauth/callback"


def _authorize(
    qonto: qonto_sandbox.QontoSandbox, decision: str, scope: str = "organization.read"
) -> dict[str, str]:
    params = {
        "client_id": CLIENT_ID,
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": scope,
        "state": "s-1",
    }
    page = httpx.get(f"{qonto.oauth_url}/oauth2/auth", params=params)
    assert page.status_code == 200
    assert ">Authorize</button>" in page.text
    assert ">Deny</button>" in page.text
    assert "<script" not in page.text
    answer = httpx.post(f"{qonto.oauth_url}/oauth2/auth", data={**params, "decision": decision})
    assert answer.status_code == 302
    location = urllib.parse.urlsplit(answer.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == CALLBACK
    return dict(urllib.parse.parse_qsl(location.query))


def _exchange(qonto: qonto_sandbox.QontoSandbox, code: str, **changes: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uri": CALLBACK,
        **changes,
    }
    return httpx.post(f"{qonto.oauth_url}/oauth2/token", data=form)


def test_authorize_returns_a_code_that_is_exchanged_once(qonto: qonto_sandbox.QontoSandbox) -> None:
    """Authorize: back with code and state; the code gives tokens once, with the same redirect_uri."""
    qonto.add_oauth_client(CLIENT_ID, CLIENT_SECRET)
    answer = _authorize(qonto, "authorize")
    assert answer["state"] == "s-1"
    assert (
        _exchange(qonto, answer["code"], redirect_uri="https://evil.example/cb").status_code == 400
    )
    fresh = _authorize(qonto, "authorize")
    tokens = _exchange(qonto, fresh["code"])
    assert tokens.status_code == 200
    assert set(tokens.json()) >= {"access_token", "refresh_token", "expires_in"}
    assert _exchange(qonto, fresh["code"]).status_code == 400  # used
    bearer = {"authorization": f"Bearer {tokens.json()['access_token']}"}
    assert httpx.get(f"{qonto.url}/v2/membership", headers=bearer).status_code == 200


def test_deny_sends_access_denied_back(qonto: qonto_sandbox.QontoSandbox) -> None:
    """Deny: error=access_denied with the state, and no code."""
    qonto.add_oauth_client(CLIENT_ID, CLIENT_SECRET)
    assert _authorize(qonto, "deny") == {"error": "access_denied", "state": "s-1"}


def test_an_unknown_app_gets_no_consent_page(qonto: qonto_sandbox.QontoSandbox) -> None:
    """An unregistered client_id is refused before any page."""
    page = httpx.get(
        f"{qonto.oauth_url}/oauth2/auth",
        params={
            "client_id": "nope",
            "redirect_uri": CALLBACK,
            "response_type": "code",
            "scope": "webhook",
        },
    )
    assert page.status_code == 400


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (qonto_sandbox.plan("Business"), "Business"),
        (None, None),
    ],
)
def test_the_subscription_names_the_plan_or_null(
    qonto: qonto_sandbox.QontoSandbox, plan: dict[str, object] | None, expected: str | None
) -> None:
    """GET /v2/subscription: {"plan": {...}} or {"plan": null}."""
    qonto.plan = plan
    body = httpx.get(
        f"{qonto.url}/v2/subscription", headers={"authorization": qonto.api_key_header}
    ).json()
    assert (body["plan"] or {}).get("name") == expected


def test_the_plan_needs_the_subscription_scope(qonto: qonto_sandbox.QontoSandbox) -> None:
    """A token consented without subscription.read is refused (403) on /v2/subscription."""
    qonto.add_oauth_client(CLIENT_ID, CLIENT_SECRET)
    narrow = _exchange(qonto, _authorize(qonto, "authorize", scope="organization.read")["code"])
    wide = _exchange(
        qonto, _authorize(qonto, "authorize", scope="organization.read subscription.read")["code"]
    )
    for tokens, status in ((narrow, 403), (wide, 200)):
        bearer = {"authorization": f"Bearer {tokens.json()['access_token']}"}
        assert httpx.get(f"{qonto.url}/v2/subscription", headers=bearer).status_code == status


def test_deliver_posts_the_event_signed_to_each_subscription_of_its_topic(
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """As Qonto does: X-Qonto-Signature with the subscription's secret, only for its topic."""
    received: list[httpx.Request] = []
    from relay.sandbox.http import Request, Response, ServerThread

    async def handler(request: Request) -> Response:
        received.append(
            httpx.Request(
                "POST", request.path, headers=request.headers, content=await request.body()
            )
        )
        return Response(202)

    qonto.callback_schemes = ("http",)
    with ServerThread(handler) as hook:
        secret = "s" * 40
        httpx.post(
            f"{qonto.url}/v2/webhook_subscriptions",
            headers={"authorization": qonto.api_key_header},
            json={"callback_url": f"{hook.url}/in", "types": ["v1/transactions"], "secret": secret},
        ).raise_for_status()
        tx = qonto.add_transaction(side="debit", amount="1", label="X", attachment_ids=[])
        assert qonto.deliver(qonto.transaction_event(tx)) == [202]
        assert qonto.deliver(qonto.consent_revocation_event()) == []
    [request] = received
    assert request.headers["x-qonto-signature"] == signing.sign(
        request.content, secret, int(request.headers["x-qonto-signature"].split(",")[0][2:])
    )
