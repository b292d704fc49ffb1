"""Setup rules of a connection: who and which organization and plan may connect, and when the relay
advises about the client's folder in Loop. Qonto is faked at the HTTP level (httpx.MockTransport)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import httpx
import pytest

from relay import config, errors, models
from relay.domain import credentials, eligibility, folders
from relay.upstreams import qonto
from tests.unit import clients

ORG_ID = "0b8e4f1c-5d3a-4c2e-9f71-2a6b9c0d1e23"  # the fixtures' organization
SETTINGS = config.Settings(secret_key=config.Secret("x" * 43 + "="))


BUSINESS = {"plan": {"code": "team_business", "name": "Business", "status": "active"}}


def _client(
    membership: dict[str, Any],
    organization: dict[str, Any],
    subscription: dict[str, Any] | int = BUSINESS,
) -> qonto.QontoClient:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/membership":
            return httpx.Response(200, json={"membership": membership})
        if request.url.path == "/v2/subscription":
            if isinstance(subscription, int):
                return httpx.Response(subscription, json={"errors": [{"code": "forbidden"}]})
            return httpx.Response(200, json=subscription)
        return httpx.Response(200, json={"organization": organization})

    creds = credentials.QontoApiKey(login="login", secret=config.Secret("secret"))
    return clients.qonto_client(SETTINGS, handler, creds=creds)


MEMBER = {"id": "m1", "role": "admin", "organization_id": ORG_ID}
ORGANIZATION = {"id": ORG_ID, "slug": "atelier-demo", "bank_accounts": []}


async def test_the_organization_is_checked_even_when_the_membership_does_not_name_it() -> None:
    """The id (or slug) of /v2/organization must match, not only membership.organization_id."""
    member = {"id": "m1", "role": "admin"}
    client = _client(member, ORGANIZATION)
    with pytest.raises(errors.Refused, match="another organization"):
        await eligibility.verify_qonto(client, str(uuid.uuid4()))
    await eligibility.verify_qonto(client, ORG_ID)
    await eligibility.verify_qonto(client, "atelier-demo")


async def test_an_organization_qonto_does_not_identify_cannot_be_checked() -> None:
    """No id anywhere: refused, rather than the check silently skipped."""
    client = _client({"id": "m1", "role": "admin"}, {"bank_accounts": []})
    with pytest.raises(errors.Refused, match="cannot be checked"):
        await eligibility.verify_qonto(client, ORG_ID)


@pytest.mark.parametrize(
    ("name", "eligible"),
    [
        ("Premium", True),
        ("SMART", True),
        (" essential ", True),
        ("Business", True),
        ("enterprise", True),
        ("Business Plus", False),
        ("Solo Basic", False),
        ("Non-premium legacy", False),
    ],
)
async def test_the_plan_is_read_from_the_subscription_by_name(name: str, eligible: bool) -> None:
    """GET /v2/subscription's plan name, compared case-insensitively with the eligible plans."""
    client = _client(MEMBER, ORGANIZATION, {"plan": {"code": "x", "name": name}})
    if eligible:
        found = await eligibility.verify_qonto(client, ORG_ID)
        assert found.plan == name.strip()
    else:
        with pytest.raises(eligibility.PlanRefused, match="does not include the accounting export"):
            await eligibility.verify_qonto(client, ORG_ID)


async def test_a_plan_in_the_organization_payload_is_not_read() -> None:
    """/v2/organization documents no plan: a plan field there decides nothing."""
    client = _client(MEMBER, {**ORGANIZATION, "plan": "Solo Basic"})
    assert (await eligibility.verify_qonto(client, ORG_ID)).plan == "Business"


@pytest.mark.parametrize("subscription", [{"plan": None}, 403, 404])
async def test_a_plan_qonto_does_not_name_is_accepted_with_a_notice(
    subscription: dict[str, Any] | int,
) -> None:
    """{"plan": null}, or a plan these credentials may not read: accepted, said to be unverified."""
    found = await eligibility.verify_qonto(_client(MEMBER, ORGANIZATION, subscription), ORG_ID)
    assert found.plan is None
    assert eligibility.plan_notice(found.plan) == eligibility.PLAN_UNVERIFIED
    assert "plan could not be verified" in eligibility.PLAN_UNVERIFIED
    assert eligibility.plan_notice("Smart") is None


async def test_a_role_outside_owner_admin_reporting_is_refused_before_the_plan() -> None:
    """An employee is refused, with the role named."""
    client = _client({**MEMBER, "role": "employee"}, ORGANIZATION, {"plan": None})
    with pytest.raises(eligibility.RoleRefused, match="'employee'") as refused:
        await eligibility.verify_qonto(client, ORG_ID)
    assert refused.value.role == "employee"


# ------------------------------------------------------------------------------------ folder advice

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
HOURS = dt.timedelta(hours=1)


def _connection(
    state: str = models.ConnectionState.ACTIVE,
    reason: str | None = None,
    refused_by: frozenset[models.Refuser] = frozenset(),
) -> models.Connection:
    created = NOW - 30 * 24 * HOURS
    return models.Connection(
        id=uuid.uuid4(),
        client_name="Acme",
        qonto_organization_id=ORG_ID,
        qonto_auth_kind="api_key",
        cegid_dossier="ACME001",
        cegid_domain="CABINET",
        cegid_key_fingerprint="f",
        state=state,
        state_reason=reason,
        scan_since=created,
        transactions_scanned_to=None,
        supplier_invoices_scanned_to=None,
        client_invoices_scanned_to=None,
        dossier_checked_at=None,
        first_upload_at=created,
        created_at=created,
        updated_at=created,
        refused_by=refused_by,
    )


def _warning(
    connection: models.Connection,
    *,
    connected_hours_ago: float,
    waiting: int = 0,
    deposit_hours_ago: float | None = None,
) -> str | None:
    return folders.folder_warning(
        connection,
        NOW,
        waiting_documents=waiting,
        connected_at=NOW - connected_hours_ago * HOURS,
        first_deposit_at=None if deposit_hours_ago is None else NOW - deposit_hours_ago * HOURS,
    )


def test_documents_waiting_24_hours_after_reconnection_without_a_deposit_get_the_advice() -> None:
    """Counted from the (re)connection, not the creation: a reconnection restarts the clock."""
    connection = _connection()
    assert _warning(connection, connected_hours_ago=25, waiting=2) is not None
    assert "has not appeared in Loop 24 hours after setup" in str(
        _warning(connection, connected_hours_ago=25, waiting=2)
    )
    assert _warning(connection, connected_hours_ago=2, waiting=2) is None
    assert _warning(connection, connected_hours_ago=25, waiting=0) is None


def test_after_the_first_deposit_the_folder_check_is_asked_once_not_forever() -> None:
    """Between 24 hours and 7 days after the first accepted deposit: a check for the accountant."""
    connection = _connection()
    for hours in (12, 24 * 7 + 1, 24 * 30):
        assert _warning(connection, connected_hours_ago=24 * 40, deposit_hours_ago=hours) is None
    notice = _warning(connection, connected_hours_ago=24 * 40, deposit_hours_ago=30, waiting=3)
    assert notice is not None
    assert "if the client's folder is not visible in Loop yet, disconnect and reconnect" in notice


def test_documents_waiting_on_a_qonto_refusal_get_no_folder_advice() -> None:
    """Qonto refusing the credentials is not a Loop folder problem."""
    refused = _connection(
        models.ConnectionState.NEEDS_ATTENTION,
        "Qonto refused the credentials: reconnect the organization (401)",
        frozenset({models.Refuser.QONTO}),
    )
    assert _warning(refused, connected_hours_ago=48, waiting=5) is None
    cegid = _connection(
        models.ConnectionState.NEEDS_ATTENTION,
        "Cegid: refused access to ACME001",
        frozenset({models.Refuser.CEGID}),
    )
    assert _warning(cegid, connected_hours_ago=48) is not None
    disconnected = _connection(models.ConnectionState.DISCONNECTED, "disconnected by an operator")
    assert _warning(disconnected, connected_hours_ago=48, waiting=5) is None


def test_who_refused_is_read_from_its_value_not_from_the_reason() -> None:
    """The folder advice follows ``refused_by``; the reason is prose shown to people."""
    worded_like_cegid = _connection(
        models.ConnectionState.NEEDS_ATTENTION,
        "Cegid: the words of a Qonto refusal",
        frozenset({models.Refuser.QONTO}),
    )
    assert _warning(worded_like_cegid, connected_hours_ago=48, waiting=5) is None
    both = _connection(
        models.ConnectionState.NEEDS_ATTENTION,
        "Qonto: refused; Cegid: refused",
        frozenset({models.Refuser.QONTO, models.Refuser.CEGID}),
    )
    assert _warning(both, connected_hours_ago=48) is not None
