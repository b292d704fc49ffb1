"""The setup pages of a client, for the two people Qonto's guide names (see the README).

Here are the link, the Qonto step and the accountant's steps (``/setup/key``, ``/setup/dossier``,
``/setup/hub``); Qonto's answer is :mod:`.consent`, Create and the ready page :mod:`.create`, the
routes :mod:`.site`. Secrets typed or obtained are sealed at once and never rendered back.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay import crypto, log, store
from relay.domain import invitations
from relay.edge.pages import forms, ratelimit, sessions, views
from relay.upstreams import qonto

logger = log.get(__name__)

STATE_LIFETIME: Final = dt.timedelta(minutes=15)
_DOSSIER: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DOMAIN: Final = re.compile(r"[A-Za-z0-9-]{1,63}")
STEP_PATHS: Final = {
    "qonto": "/setup/qonto",
    "key": "/setup/key",
    "dossier": "/setup/dossier",
    "hub": "/setup/hub",
}


def invalid_link(ctx: views.Context) -> Response:
    return views.problem(
        ctx,
        404,
        "This setup link is not valid",
        "The link is wrong, was already used, or has expired (a link is valid for 7 days and "
        "sets up one client once).",
        action="Ask the accounting firm for a new setup link.",
    )


def session_expired(ctx: views.Context) -> Response:
    return views.problem(
        ctx,
        400,
        "Your session has expired",
        "This browser no longer knows which setup it was working on. What was already done is "
        "kept.",
        action="Open the setup link you received again to go on.",
    )


async def bound_invitation(
    request: Request, ctx: views.Context
) -> tuple[sessions.Session, invitations.Invitation] | Response:
    """Return this browser's session and the open invitation it works on, or the page to show."""
    session = await sessions.current(ctx.pool, request)
    if session is None or "invitation" not in session.data:
        if session is not None and "ready" in session.data:
            return views.see("/setup/ready")
        return session_expired(ctx)
    invitation = await invitations.get(ctx.pool, uuid.UUID(str(session.data["invitation"])))
    if invitation is None or not invitation.usable(dt.datetime.now(dt.UTC)):
        return invalid_link(ctx)
    return session, invitation


async def posted_form(
    request: Request, ctx: views.Context
) -> tuple[sessions.Session, invitations.Invitation, dict[str, str]] | Response:
    """Read a form post's fields, after the CSRF check and the session's invitation."""
    try:
        fields = await forms.read(request)
    except forms.Invalid:
        return views.csrf_refused(ctx)
    session = await sessions.current(ctx.pool, request)
    if session is None or not session.csrf_ok(fields.get(forms.CSRF_FIELD)):
        logger.warning("setup_csrf_refused", path=request.url.path)
        return views.csrf_refused(ctx)
    bound = await bound_invitation(request, ctx)
    if isinstance(bound, Response):
        return bound
    return bound[0], bound[1], fields


def _steps(invitation: invitations.Invitation, current: str) -> list[dict[str, Any]]:
    done = {
        "qonto": invitation.qonto_done,
        "key": invitation.key_done,
        "dossier": invitation.dossier_done,
        "hub": False,
    }
    names = {
        "qonto": "Connect Qonto",
        "key": "Loop API key",
        "dossier": "Client file",
        "hub": "Loop Hub and Create",
    }
    return [
        {"id": step, "name": names[step], "done": done[step], "current": step == current}
        for step in invitations.STEPS
    ]


def common(invitation: invitations.Invitation, step: str) -> dict[str, Any]:
    return {
        "client_name": invitation.client_name,
        "steps": _steps(invitation, step),
        "problem": invitation.problem_on(step),
        "organization": invitation.qonto_organization_name,
        "plan_unverified": invitation.qonto_done and invitation.qonto_plan is None,
    }


async def entry(request: Request) -> Response:
    """Open the invitation's link (``/setup/{token}``) and bind this browser to it.

    The link's token appears only in this first URL: the session remembers which invitation this
    browser works on (so the link can be forwarded to the accountant, whose browser gets a session
    of its own).
    """
    ctx = views.context(request)
    address = views.client_address(request)
    wait = await ratelimit.blocked(ctx.pool, ratelimit.SETUP_GUESSES, address)
    if wait is not None:
        logger.warning("setup_link_rate_limited", client=address)
        response = views.problem(
            ctx,
            429,
            "Too many attempts",
            "Too many setup links that do not exist were opened from this network.",
            action="Wait a few minutes, then open the link you received again.",
        )
        response.headers["retry-after"] = str(int(wait))
        return response
    invitation = await invitations.find(ctx.pool, request.path_params["token"])
    if invitation is None or not invitation.usable(dt.datetime.now(dt.UTC)):
        await ratelimit.hit(ctx.pool, ratelimit.SETUP_GUESSES, address)
        logger.info("setup_link_refused", known=invitation is not None)
        return invalid_link(ctx)
    session = await sessions.start(ctx.pool, request)
    session.data = {"invitation": str(invitation.id)}
    await sessions.save(ctx.pool, session)
    logger.info("setup_link_opened", invitation=str(invitation.id))
    if invitation.qonto_done:
        return views.see(STEP_PATHS[invitation.next_step()], session, ctx)
    return views.page("qonto.html", session, ctx, **common(invitation, "qonto"))


async def qonto_step(request: Request) -> Response:
    """Show the Qonto step again (after a refusal), for the session's invitation."""
    ctx = views.context(request)
    bound = await bound_invitation(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    return views.page("qonto.html", session, ctx, **common(invitation, "qonto"))


async def connect(request: Request) -> Response:
    """Send the member to Qonto's consent page (**Connect with Qonto**).

    The ``state`` sent along is single-use and bound to the invitation and to this browser's
    session.
    """
    ctx = views.context(request)
    posted = await posted_form(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, _ = posted
    state = secrets.token_urlsafe(32)
    url = qonto.authorization_url(ctx.settings, state)
    await store.oauth_states.delete_old(ctx.pool)
    await store.oauth_states.insert(
        ctx.pool,
        crypto.token_digest(state),
        invitation.id,
        session.id_hash,
        dt.datetime.now(dt.UTC) + STATE_LIFETIME,
    )
    logger.info("setup_consent_started", invitation=str(invitation.id))
    return RedirectResponse(url, status_code=303)


def needs_qonto(invitation: invitations.Invitation) -> Response | None:
    return None if invitation.qonto_done else views.see(STEP_PATHS["qonto"])


async def key_step(request: Request) -> Response:
    ctx = views.context(request)
    bound = await bound_invitation(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    if (early := needs_qonto(invitation)) is not None:
        return early
    kept = invitations.cegid_credentials(ctx.box, invitation)
    return views.page(
        "key.html",
        session,
        ctx,
        api_key=kept.api_key.reveal() if kept else "",
        secret_kept=kept is not None,
        error=None,
        **common(invitation, "key"),
    )


async def save_key(request: Request) -> Response:
    ctx = views.context(request)
    posted = await posted_form(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, fields = posted
    if (early := needs_qonto(invitation)) is not None:
        return early
    api_key = fields.get("api_key", "").strip()
    api_secret = fields.get("api_secret", "").strip() or None
    secret_kept = invitation.key_done
    error = None
    if not api_key or len(api_key) > 500 or any(c.isspace() or c == ":" for c in api_key):
        error = "Type the API key (one word, without spaces or colons)."
    elif api_secret is None and not secret_kept:
        error = "Type the API secret."
    elif api_secret is not None and (len(api_secret) > 500 or any(c.isspace() for c in api_secret)):
        error = "The API secret is one word, without spaces."
    if error is not None:
        response = views.page(
            "key.html",
            session,
            ctx,
            api_key=api_key,
            secret_kept=secret_kept,
            error=error,
            **common(invitation, "key"),
        )
        response.status_code = 400
        return response
    await invitations.record_key(ctx.pool, ctx.box, invitation, api_key, api_secret)
    logger.info("setup_key_recorded", invitation=str(invitation.id))
    return views.see(STEP_PATHS["dossier"])


async def dossier_step(request: Request) -> Response:
    ctx = views.context(request)
    bound = await bound_invitation(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    if (early := needs_qonto(invitation)) is not None:
        return early
    if not invitation.key_done:
        return views.see(STEP_PATHS["key"])
    return views.page(
        "dossier.html",
        session,
        ctx,
        dossier=invitation.cegid_dossier or "",
        domain=invitation.cegid_domain or "",
        error=None,
        **common(invitation, "dossier"),
    )


async def save_dossier(request: Request) -> Response:
    ctx = views.context(request)
    posted = await posted_form(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, fields = posted
    if (early := needs_qonto(invitation)) is not None:
        return early
    dossier = fields.get("cegid_dossier", "").strip()
    domain = fields.get("cegid_domain", "").strip()
    error = None
    if not _DOSSIER.fullmatch(dossier):
        error = "Type the code dossier: letters, digits, '.', '_' or '-' (for example CEGID001)."
    elif not _DOMAIN.fullmatch(domain):
        error = "Type the firm's domain: letters, digits or '-' (as Loop Hub shows it)."
    if error is not None:
        response = views.page(
            "dossier.html",
            session,
            ctx,
            dossier=dossier,
            domain=domain,
            error=error,
            **common(invitation, "dossier"),
        )
        response.status_code = 400
        return response
    await invitations.record_dossier(ctx.pool, invitation.id, dossier, domain)
    logger.info("setup_dossier_recorded", invitation=str(invitation.id))
    return views.see(STEP_PATHS["hub"])


async def hub_step(request: Request) -> Response:
    ctx = views.context(request)
    bound = await bound_invitation(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    if invitation.next_step() != "hub":
        return views.see(STEP_PATHS[invitation.next_step()])
    kept = invitations.cegid_credentials(ctx.box, invitation)
    assert kept is not None
    assert invitation.cegid_domain is not None
    return views.page(
        "hub.html",
        session,
        ctx,
        application=ctx.settings.loop_application_name,
        api_key=kept.api_key.reveal(),
        provider_email=ctx.settings.provider_email(invitation.cegid_domain),
        dossier=invitation.cegid_dossier,
        domain=invitation.cegid_domain,
        **common(invitation, "hub"),
    )
