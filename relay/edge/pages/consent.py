"""The page that receives Qonto's answer to the consent (``/setup/oauth/callback``).

The state must be known, unused, fresh and from the browser that started the consent; then the code
is exchanged, the member's role and the plan read. A refusal is a page saying why and who can do it,
and nothing is stored; otherwise the tokens are stored sealed with the invitation.
"""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import Response

from relay import crypto, errors, log, store
from relay.domain import credentials, eligibility, invitations
from relay.edge.pages import sessions, setup, views
from relay.upstreams import qonto

logger = log.get(__name__)


def _consent_refused(ctx: views.Context, title: str, message: str, action: str) -> Response:
    return views.problem(ctx, 403, title, message, action=action, restart=True)


async def callback(request: Request) -> Response:
    """Receive Qonto's answer to the consent, storing nothing on a refusal."""
    ctx = views.context(request)
    params = request.query_params
    state = params.get("state", "")
    bad_state = (
        "Qonto's answer does not belong to a setup started in this browser",
        "It may have been started in another browser, altered, or already used. Nothing was "
        "stored.",
        "Open the setup link again and press Connect with Qonto.",
    )
    if not state or len(state) > 200:
        return _consent_refused(ctx, *bad_state)
    used = await store.oauth_states.use(ctx.pool, crypto.token_digest(state))
    session = await sessions.current(ctx.pool, request)
    if used is None:
        logger.warning("setup_consent_state_unknown")
        return _consent_refused(ctx, *bad_state)
    invitation_id = used.invitation_id
    if used.used_before is not None:
        logger.warning("setup_consent_state_reused", invitation=str(invitation_id))
        return _consent_refused(ctx, *bad_state)
    if session is None or not crypto.constant_time_equal(
        used.session_hash.hex(), session.id_hash.hex()
    ):
        logger.warning("setup_consent_other_browser", invitation=str(invitation_id))
        return _consent_refused(ctx, *bad_state)
    if used.expires_at < dt.datetime.now(dt.UTC):
        return _consent_refused(
            ctx,
            "The answer from Qonto came too late",
            "More than 15 minutes passed since Connect with Qonto. Nothing was stored.",
            "Press Connect with Qonto again.",
        )
    invitation = await invitations.get(ctx.pool, invitation_id)
    if invitation is None or not invitation.usable(dt.datetime.now(dt.UTC)):
        return setup.invalid_link(ctx)
    session.data = {"invitation": str(invitation.id)}
    await sessions.save(ctx.pool, session)
    error = params.get("error")
    if error is not None:
        logger.info("setup_consent_refused", invitation=str(invitation.id), error=error[:50])
        if error == "access_denied":
            return _consent_refused(
                ctx,
                "Access to Qonto was not authorized",
                "Qonto's consent was refused, so the relay cannot read the organization's "
                "receipts and invoices. Nothing was stored.",
                "To set up the export, press Connect with Qonto again and choose Authorize.",
            )
        return _consent_refused(
            ctx,
            "Qonto did not give access",
            f"Qonto answered with the error {error[:50]!r}. Nothing was stored.",
            "Press Connect with Qonto again; if it happens again, tell the accounting firm.",
        )
    code = params.get("code", "")
    if not code or len(code) > 2000:
        return _consent_refused(ctx, *bad_state)
    return await _exchange(ctx, invitation, code)


async def _exchange(ctx: views.Context, invitation: invitations.Invitation, code: str) -> Response:
    async with qonto.http_clients(ctx.settings) as http:
        try:
            client = await qonto.authorize(ctx.settings, http, code)
            found = await eligibility.read(client)
        except eligibility.RoleRefused as exc:
            logger.info("setup_role_refused", invitation=str(invitation.id), role=exc.role)
            return _consent_refused(
                ctx,
                "Your Qonto role cannot set up the export",
                f"Your role in the Qonto organization is {exc.role!r}. Only the account holder "
                "(owner), an admin or a reporting member can connect it. Nothing was stored.",
                "Ask the owner, an admin or a reporting member of the organization to open this "
                "setup link and press Connect with Qonto.",
            )
        except eligibility.PlanRefused as exc:
            logger.info("setup_plan_refused", invitation=str(invitation.id))
            return _consent_refused(
                ctx,
                "Your Qonto plan does not include the accounting export",
                f"The organization's plan is {exc.plan!r}. The export needs Smart, Premium, "
                "Essential, Business or Enterprise. Nothing was stored.",
                "The owner can change the plan in Qonto (Settings, then Plans); then open this "
                "setup link again.",
            )
        except (errors.QontoAuthRejected, errors.QontoProtocolError) as exc:
            logger.warning("setup_consent_exchange_refused", reason=str(exc))
            return _consent_refused(
                ctx,
                "Qonto did not confirm the access",
                "The authorization could not be used (it may have expired). Nothing was stored.",
                "Press Connect with Qonto again.",
            )
    tokens = client.current_credentials
    assert isinstance(tokens, credentials.QontoOAuth)
    if not found.organization_id:
        return _consent_refused(
            ctx,
            "Qonto did not name the organization",
            "The relay cannot tell which organization was connected. Nothing was stored.",
            "Press Connect with Qonto again; if it happens again, tell the accounting firm.",
        )
    name = found.organization.get("legal_name") or found.organization.get("name")
    stored = await invitations.record_qonto(
        ctx.pool,
        ctx.box,
        invitation.id,
        organization_id=found.organization_id,
        organization_name=str(name) if name else None,
        role=str(found.membership.get("role", "")).lower(),
        plan=found.plan,
        tokens=tokens,
    )
    if not stored:
        return setup.invalid_link(ctx)
    logger.info(
        "setup_qonto_connected", invitation=str(invitation.id), plan_verified=found.plan is not None
    )
    return views.see(setup.STEP_PATHS["key"])
