"""Who may connect a Qonto organization: the member's role, the organization, the plan.

The accounting export can be set up by an owner, an admin or a reporting member, on the Smart,
Premium, Essential, Business or Enterprise plans. :func:`verify_qonto` checks the credentials against
Qonto before a connection is stored (and again by `relay connections check` and `reconnect`): the
member's role, that the organization they reach is the one named, by its id or its slug, and the plan
when Qonto names one; :func:`plan_notice` is the notice when it does not.
"""

from __future__ import annotations

import re
from typing import Any, Final

from relay import errors, qonto

SETUP_ROLES: Final = frozenset({"owner", "admin", "reporting"})
ELIGIBLE_PLANS: Final = frozenset({"smart", "premium", "essential", "business", "enterprise"})
PLAN_UNVERIFIED: Final = (
    "the Qonto plan could not be verified (Qonto did not name it): the accounting export needs "
    "Smart, Premium, Essential, Business or Enterprise"
)
_PLAN_WORDS: Final = re.compile(r"[^a-z0-9-]+")  # a hyphen binds: "non-premium" is one word


def _plan_of(organization: dict[str, Any]) -> str | None:
    """The organization's plan if Qonto says it (the documented payload has no such field)."""
    for key in ("plan", "subscription_plan", "pricing_plan"):
        value = organization.get(key)
        if isinstance(value, dict):
            value = value.get("name") or value.get("code")
        if isinstance(value, str) and value:
            return value
    return None


def _plan_is_eligible(plan: str) -> bool:
    """An eligible plan's name as a whole word ("Premium", "essential_2023"), not as a substring."""
    return any(word in ELIGIBLE_PLANS for word in _PLAN_WORDS.split(plan.lower()))


def plan_notice(organization: dict[str, Any]) -> str | None:
    """What to tell the user when Qonto names no plan (accepted, but not verified)."""
    return PLAN_UNVERIFIED if _plan_of(organization) is None else None


async def verify_qonto(
    client: qonto.QontoClient, organization_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the credentials' member may set up the export for this organization; raise Refused."""
    membership = await client.get_membership()
    role = str(membership.get("role", "")).lower()
    if role not in SETUP_ROLES:
        raise errors.Refused(
            f"this Qonto member's role is {role or 'unknown'!r}: only owners, admins and reporting "
            "members can set up the accounting export"
        )
    organization = await client.get_organization()
    # the organization the credentials reach, by its id or its slug (either may be given)
    known = {
        str(value)
        for value in (
            membership.get("organization_id"),
            organization.get("id"),
            organization.get("slug"),
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
    plan = _plan_of(organization)
    if plan is not None and not _plan_is_eligible(plan):
        raise errors.Refused(
            f"the Qonto plan {plan!r} does not include the accounting export "
            "(eligible plans: Smart, Premium, Essential, Business, Enterprise)"
        )
    return membership, organization
