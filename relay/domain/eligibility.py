"""Rules of who may connect a Qonto organization, by the member's role, organization and plan.

The accounting export can be set up by an owner, an admin or a reporting member, on the Smart,
Premium, Essential, Business or Enterprise plans; :func:`verify_qonto` checks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from relay import errors
from relay.upstreams import qonto

SETUP_ROLES: Final = frozenset({"owner", "admin", "reporting"})
ELIGIBLE_PLANS: Final = frozenset({"smart", "premium", "essential", "business", "enterprise"})
PLAN_UNVERIFIED: Final = (
    "the Qonto plan could not be verified (Qonto did not name it): the accounting export needs "
    "Smart, Premium, Essential, Business or Enterprise"
)


class RoleRefused(errors.Refused):
    """The member's role may not set up the export (owner, admin or reporting may)."""

    def __init__(self, message: str, *, role: str) -> None:
        super().__init__(message)
        self.role = role


class PlanRefused(errors.Refused):
    """The organization's plan does not include the accounting export."""

    def __init__(self, message: str, *, plan: str) -> None:
        super().__init__(message)
        self.plan = plan


@dataclasses.dataclass(frozen=True, slots=True)
class Eligible:
    """What Qonto said of a member allowed to set up the export."""

    membership: dict[str, Any]
    organization: dict[str, Any]
    plan: str | None  # the plan's name; None when Qonto did not name one

    @property
    def organization_id(self) -> str:
        return str(self.organization.get("id") or self.membership.get("organization_id") or "")


def plan_name(subscription: dict[str, Any] | None) -> str | None:
    """Read the plan's ``name`` in a ``GET /v2/subscription`` answer (None for a null plan)."""
    plan = (subscription or {}).get("plan")
    if not isinstance(plan, dict):
        return None
    name = plan.get("name")
    return name.strip() if isinstance(name, str) and name.strip() else None


def plan_is_eligible(name: str) -> bool:
    """Tell whether a plan is one of the eligible ones, compared by name, case-insensitively."""
    return name.strip().lower() in ELIGIBLE_PLANS


def plan_notice(plan: str | None) -> str | None:
    """Say what to tell the user when Qonto names no plan (accepted, but not verified)."""
    return PLAN_UNVERIFIED if plan is None else None


def check_role(membership: dict[str, Any]) -> None:
    """Raise RoleRefused unless the member is an owner, an admin or a reporting member."""
    role = str(membership.get("role", "")).lower()
    if role not in SETUP_ROLES:
        raise RoleRefused(
            f"this Qonto member's role is {role or 'unknown'!r}: only owners, admins and reporting "
            "members can set up the accounting export",
            role=role or "unknown",
        )


def check_plan(plan: str | None) -> None:
    """Raise PlanRefused for a named plan outside the eligible ones."""
    if plan is not None and not plan_is_eligible(plan):
        raise PlanRefused(
            f"the Qonto plan {plan!r} does not include the accounting export "
            "(eligible plans: Smart, Premium, Essential, Business, Enterprise)",
            plan=plan,
        )


async def read(client: qonto.QontoClient) -> Eligible:
    """Read and check the member's role and plan, and read the organization they reach."""
    membership = await client.get_membership()
    check_role(membership)
    organization = await client.get_organization()
    plan = plan_name(await client.get_subscription())
    check_plan(plan)
    return Eligible(membership, organization, plan)


async def verify_qonto(client: qonto.QontoClient, organization_id: str) -> Eligible:
    """Check the credentials' member may set up this organization's export, else raise Refused.

    Run before a connection is stored, and again by ``relay connections check`` and ``reconnect``,
    and at the setup pages' consent. It checks the member's role (``GET /v2/membership``), that
    the organization they reach is the one named, by its id or its slug (``GET
    /v2/organization``), and the plan, read from ``GET /v2/subscription`` and from no other place.
    ``{"plan": null}`` (no active core plan), or a plan the credentials may not read, is accepted
    with :data:`PLAN_UNVERIFIED` (:func:`plan_notice`).
    """
    found = await read(client)
    # the organization the credentials reach, by its id or its slug (either may be given)
    known = {
        str(value)
        for value in (
            found.membership.get("organization_id"),
            found.organization.get("id"),
            found.organization.get("slug"),
        )
        if value
    }
    if not known:
        raise errors.Refused(
            "Qonto did not say which organization the credentials belong to: the organization id "
            "cannot be checked"
        )
    if organization_id not in known:
        raise errors.Refused(
            "the Qonto credentials belong to another organization than --qonto-organization-id"
        )
    return found
