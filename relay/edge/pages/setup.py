"""The setup of a client in the browser, by the two people Qonto's guide names.

1. ``/setup/{token}`` (the invitation's link): what the integration does, who may start it and on
   which plans; **Connect with Qonto** (``POST /setup/qonto``) sends the member to Qonto's consent
   with a ``state`` bound to the invitation and to this browser's session.
2. ``/setup/oauth/callback``: the state is checked (known, unused, fresh, same browser), the code
   exchanged, the member's role and the plan read; a refusal is a page saying why and who can do it,
   and nothing is stored. Otherwise the tokens are stored sealed with the invitation.
3. The accountant's steps, in the guide's order: ``/setup/key`` (**API key**, **API secret**),
   ``/setup/dossier`` (**Code dossier**, **Domain**), ``/setup/hub`` (the Loop Hub declaration with
   its exact values, and **Create**). Create (``POST /setup/create``) makes the whole connection or
   nothing (:func:`relay.connections.add`, with the invitation marked used in its transaction); a
   refusal by Loop or Qonto goes back to the step it belongs to, in a ``role="alert"`` element.
4. ``/setup/ready``: **Your integration is ready**, and when the folder appears in Loop.

The link's token appears only in the first URL: the session remembers which invitation this browser
works on (so the link can be forwarded to the accountant, whose browser gets a session of its own).
Secrets typed or obtained are sealed at once and never rendered back.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from relay import (
    config,
    connections,
    credentials,
    crypto,
    db,
    eligibility,
    errors,
    inputs,
    invitations,
    log,
    qonto,
    queries,
)
from relay.edge.pages import forms, ratelimit, sessions, templates

logger = log.get(__name__)

STATE_LIFETIME: Final = dt.timedelta(minutes=15)
# Create refreshes Qonto tokens that would expire within this margin (plus the client's own five
# minutes) first, and stores them with the invitation: a refresh inside Create, which fails later,
# would leave the invitation with a spent refresh token.
CREATE_MARGIN: Final = dt.timedelta(minutes=10)
_DOSSIER: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DOMAIN: Final = re.compile(r"[A-Za-z0-9-]{1,63}")
STEP_PATHS: Final = {
    "qonto": "/setup/qonto",
    "key": "/setup/key",
    "dossier": "/setup/dossier",
    "hub": "/setup/hub",
}
ELIGIBLE_PLAN_NAMES: Final = ("Smart", "Premium", "Essential", "Business", "Enterprise")


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """What a setup page works with: the application's settings and pool, and its key box."""

    settings: config.Settings
    pool: asyncpg.Pool
    box: crypto.Box


def _context(request: Request) -> Context:
    state = request.app.state
    return Context(state.settings, state.pool, state.box)


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _page(name: str, session: sessions.Session | None, ctx: Context, **values: Any) -> Response:
    response = templates.render(
        name,
        csrf_token=session.csrf_token if session else "",
        flush_at=ctx.settings.flush_at.strftime("%H:%M"),
        plans=ELIGIBLE_PLAN_NAMES,
        **values,
    )
    if session is not None and session.is_new:
        sessions.attach(response, session, ctx.settings)
    return response


def _see(
    path: str, session: sessions.Session | None = None, ctx: Context | None = None
) -> Response:
    response = RedirectResponse(path, status_code=303)
    if session is not None and ctx is not None and session.is_new:
        sessions.attach(response, session, ctx.settings)
    return response


def _problem(
    ctx: Context,
    status: int,
    title: str,
    message: str,
    *,
    action: str | None = None,
    restart: bool = False,
    session: sessions.Session | None = None,
) -> Response:
    """A page that says what went wrong and who can do what about it."""
    response = _page(
        "problem.html",
        session,
        ctx,
        title=title,
        message=message,
        action=action,
        restart=restart,
    )
    response.status_code = status
    return response


def _invalid_link(ctx: Context) -> Response:
    return _problem(
        ctx,
        404,
        "This setup link is not valid",
        "The link is wrong, was already used, or has expired (a link is valid for 7 days and "
        "sets up one client once).",
        action="Ask the accounting firm for a new setup link.",
    )


def _session_expired(ctx: Context) -> Response:
    return _problem(
        ctx,
        400,
        "Your session has expired",
        "This browser no longer knows which setup it was working on. What was already done is "
        "kept.",
        action="Open the setup link you received again to go on.",
    )


def _csrf_refused(ctx: Context) -> Response:
    return _problem(
        ctx,
        403,
        "This form cannot be accepted",
        "It was sent without this page's security token (it may be old, or come from another "
        "site). Nothing was changed.",
        action="Go back, reload the page, and send it again.",
    )


def _unavailable(ctx: Context, what: str) -> Response:
    return _problem(
        ctx,
        503,
        "The service is unavailable",
        f"{what} could not be reached. Nothing was changed.",
        action="Try again in a few minutes.",
    )


def _misconfigured(ctx: Context) -> Response:
    return _problem(
        ctx,
        503,
        "The relay is not fully configured",
        "The relay's operator has not finished its configuration (Qonto's OAuth application or "
        "Cegid's subscription key). Nothing was changed.",
        action="Tell the accounting firm, whose operator can fix it.",
    )


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """Turn the dependencies' failures into pages (never a stack trace, never a 500 for them)."""

    async def wrapped(request: Request) -> Response:
        ctx = _context(request)
        try:
            return await handler(request)
        except errors.ConfigurationError as exc:
            logger.error("setup_misconfigured", reason=str(exc))
            return _misconfigured(ctx)
        except errors.DatabaseUnavailable:
            return _unavailable(ctx, "The relay's database")
        except errors.Retryable as exc:
            return _unavailable(ctx, "Qonto" if "Qonto" in str(exc) else "Cegid Loop")

    return wrapped


# ------------------------------------------------------------------------------ the invitation


async def _bound(
    request: Request, ctx: Context
) -> tuple[sessions.Session, invitations.Invitation] | Response:
    """This browser's session and the open invitation it works on, or the page to show instead."""
    session = await sessions.current(ctx.pool, request)
    if session is None or "invitation" not in session.data:
        if session is not None and "ready" in session.data:
            return _see("/setup/ready")
        return _session_expired(ctx)
    invitation = await invitations.get(ctx.pool, uuid.UUID(str(session.data["invitation"])))
    if invitation is None or not invitation.usable(dt.datetime.now(dt.UTC)):
        return _invalid_link(ctx)
    return session, invitation


async def _posted(
    request: Request, ctx: Context
) -> tuple[sessions.Session, invitations.Invitation, dict[str, str]] | Response:
    """A form post: its fields, after the CSRF check and the session's invitation."""
    try:
        fields = await forms.read(request)
    except forms.Invalid:
        return _csrf_refused(ctx)
    session = await sessions.current(ctx.pool, request)
    if session is None or not session.csrf_ok(fields.get(forms.CSRF_FIELD)):
        logger.warning("setup_csrf_refused", path=request.url.path)
        return _csrf_refused(ctx)
    bound = await _bound(request, ctx)
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


def _common(invitation: invitations.Invitation, step: str) -> dict[str, Any]:
    return {
        "client_name": invitation.client_name,
        "steps": _steps(invitation, step),
        "problem": invitation.problem_on(step),
        "organization": invitation.qonto_organization_name,
        "plan_unverified": invitation.qonto_done and invitation.qonto_plan is None,
    }


async def entry(request: Request) -> Response:
    """``/setup/{token}``: the invitation's link; binds this browser to it."""
    ctx = _context(request)
    address = _client_address(request)
    wait = await ratelimit.blocked(ctx.pool, ratelimit.SETUP_GUESSES, address)
    if wait is not None:
        logger.warning("setup_link_rate_limited", client=address)
        response = _problem(
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
        return _invalid_link(ctx)
    session = await sessions.start(ctx.pool, request)
    session.data = {"invitation": str(invitation.id)}
    await sessions.save(ctx.pool, session)
    logger.info("setup_link_opened", invitation=str(invitation.id))
    if invitation.qonto_done:
        return _see(STEP_PATHS[invitation.next_step()], session, ctx)
    return _page("qonto.html", session, ctx, **_common(invitation, "qonto"))


async def qonto_step(request: Request) -> Response:
    """The Qonto step again (after a refusal), for the session's invitation."""
    ctx = _context(request)
    bound = await _bound(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    return _page("qonto.html", session, ctx, **_common(invitation, "qonto"))


async def connect(request: Request) -> Response:
    """**Connect with Qonto**: a single-use state bound to the invitation and this browser, and
    the way to Qonto's consent page."""
    ctx = _context(request)
    posted = await _posted(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, _ = posted
    state = secrets.token_urlsafe(32)
    url = qonto.authorization_url(ctx.settings, state)
    with db.translate("start consent"):
        await ctx.pool.execute(queries.get("delete_old_oauth_states"))
        await ctx.pool.execute(
            queries.get("insert_oauth_state"),
            crypto.token_digest(state),
            invitation.id,
            session.id_hash,
            dt.datetime.now(dt.UTC) + STATE_LIFETIME,
        )
    logger.info("setup_consent_started", invitation=str(invitation.id))
    return RedirectResponse(url, status_code=303)


# ------------------------------------------------------------------------------ Qonto's answer


def _consent_refused(ctx: Context, title: str, message: str, action: str) -> Response:
    return _problem(ctx, 403, title, message, action=action, restart=True)


async def callback(request: Request) -> Response:
    """``/setup/oauth/callback``: Qonto's answer to the consent; nothing is stored on a refusal."""
    ctx = _context(request)
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
    with db.translate("use consent state"):
        record = await ctx.pool.fetchrow(queries.get("use_oauth_state"), crypto.token_digest(state))
    session = await sessions.current(ctx.pool, request)
    if record is None:
        logger.warning("setup_consent_state_unknown")
        return _consent_refused(ctx, *bad_state)
    invitation_id = record["invitation_id"]
    if record["used_before"] is not None:
        logger.warning("setup_consent_state_reused", invitation=str(invitation_id))
        return _consent_refused(ctx, *bad_state)
    if session is None or not crypto.constant_time_equal(
        bytes(record["session_hash"]).hex(), session.id_hash.hex()
    ):
        logger.warning("setup_consent_other_browser", invitation=str(invitation_id))
        return _consent_refused(ctx, *bad_state)
    if record["expires_at"] < dt.datetime.now(dt.UTC):
        return _consent_refused(
            ctx,
            "The answer from Qonto came too late",
            "More than 15 minutes passed since Connect with Qonto. Nothing was stored.",
            "Press Connect with Qonto again.",
        )
    invitation = await invitations.get(ctx.pool, invitation_id)
    if invitation is None or not invitation.usable(dt.datetime.now(dt.UTC)):
        return _invalid_link(ctx)
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


async def _exchange(ctx: Context, invitation: invitations.Invitation, code: str) -> Response:
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
        return _invalid_link(ctx)
    logger.info(
        "setup_qonto_connected", invitation=str(invitation.id), plan_verified=found.plan is not None
    )
    return _see(STEP_PATHS["key"])


# ------------------------------------------------------------------------------ the accountant


def _needs_qonto(invitation: invitations.Invitation) -> Response | None:
    return None if invitation.qonto_done else _see(STEP_PATHS["qonto"])


async def key_step(request: Request) -> Response:
    ctx = _context(request)
    bound = await _bound(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    if (early := _needs_qonto(invitation)) is not None:
        return early
    kept = invitations.cegid_credentials(ctx.box, invitation)
    return _page(
        "key.html",
        session,
        ctx,
        api_key=kept.api_key.reveal() if kept else "",
        secret_kept=kept is not None,
        error=None,
        **_common(invitation, "key"),
    )


async def save_key(request: Request) -> Response:
    ctx = _context(request)
    posted = await _posted(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, fields = posted
    if (early := _needs_qonto(invitation)) is not None:
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
        response = _page(
            "key.html",
            session,
            ctx,
            api_key=api_key,
            secret_kept=secret_kept,
            error=error,
            **_common(invitation, "key"),
        )
        response.status_code = 400
        return response
    await invitations.record_key(ctx.pool, ctx.box, invitation, api_key, api_secret)
    logger.info("setup_key_recorded", invitation=str(invitation.id))
    return _see(STEP_PATHS["dossier"])


async def dossier_step(request: Request) -> Response:
    ctx = _context(request)
    bound = await _bound(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    if (early := _needs_qonto(invitation)) is not None:
        return early
    if not invitation.key_done:
        return _see(STEP_PATHS["key"])
    return _page(
        "dossier.html",
        session,
        ctx,
        dossier=invitation.cegid_dossier or "",
        domain=invitation.cegid_domain or "",
        error=None,
        **_common(invitation, "dossier"),
    )


async def save_dossier(request: Request) -> Response:
    ctx = _context(request)
    posted = await _posted(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, fields = posted
    if (early := _needs_qonto(invitation)) is not None:
        return early
    dossier = fields.get("cegid_dossier", "").strip()
    domain = fields.get("cegid_domain", "").strip()
    error = None
    if not _DOSSIER.fullmatch(dossier):
        error = "Type the code dossier: letters, digits, '.', '_' or '-' (for example CEGID001)."
    elif not _DOMAIN.fullmatch(domain):
        error = "Type the firm's domain: letters, digits or '-' (as Loop Hub shows it)."
    if error is not None:
        response = _page(
            "dossier.html",
            session,
            ctx,
            dossier=dossier,
            domain=domain,
            error=error,
            **_common(invitation, "dossier"),
        )
        response.status_code = 400
        return response
    await invitations.record_dossier(ctx.pool, invitation.id, dossier, domain)
    logger.info("setup_dossier_recorded", invitation=str(invitation.id))
    return _see(STEP_PATHS["hub"])


async def hub_step(request: Request) -> Response:
    ctx = _context(request)
    bound = await _bound(request, ctx)
    if isinstance(bound, Response):
        return bound
    session, invitation = bound
    if invitation.next_step() != "hub":
        return _see(STEP_PATHS[invitation.next_step()])
    kept = invitations.cegid_credentials(ctx.box, invitation)
    assert kept is not None
    assert invitation.cegid_domain is not None
    return _page(
        "hub.html",
        session,
        ctx,
        application=ctx.settings.loop_application_name,
        api_key=kept.api_key.reveal(),
        provider_email=ctx.settings.provider_email(invitation.cegid_domain),
        dossier=invitation.cegid_dossier,
        domain=invitation.cegid_domain,
        **_common(invitation, "hub"),
    )


# ------------------------------------------------------------------------------ Create


def _refusal(
    exc: errors.RelayError, invitation: invitations.Invitation, ctx: Context, api_key: str
) -> tuple[str, str]:
    """The step a refusal at Create belongs to, and what to tell there (with the Loop Hub action)."""
    dossier = invitation.cegid_dossier or ""
    app_name = ctx.settings.loop_application_name
    if isinstance(exc, errors.CegidKeyRefused):
        return (
            "key",
            "Loop refused this API key and secret (HTTP 401). The firm's administrator finds "
            "them in CegidLife, in the administrator's account (the key and secret created for "
            "the Loop API; the secret is shown only once: if it is lost, create a new key and "
            "secret there). Type them again, then go on to Create.",
        )
    if isinstance(exc, errors.CegidDossierUnknown):
        return (
            "dossier",
            f"Loop does not know the code dossier {dossier!r} for this firm. Check the client "
            "file's code dossier in Cegid Loop, and the firm's domain, then go on to Create.",
        )
    if isinstance(exc, errors.CegidAccessRefused):
        return (
            "hub",
            f"Loop refused access to dossier {dossier!r} with this key (HTTP 403: the dossier "
            f"is not associated with the key). In Loop Hub, open the partner declared with "
            f"Application {app_name!r} and API key {api_key!r}, and associate dossier "
            f"{dossier!r} with it (or enable the partner connector in the Action column of "
            f"dossier {dossier!r}). Then press Create again.",
        )
    if isinstance(exc, errors.Retryable):
        return (
            "hub",
            "Qonto or Cegid Loop could not be reached, so nothing was created. Press Create "
            "again in a few minutes.",
        )
    return (
        "hub",
        f"The connection could not be created: {exc}. Nothing was created.",
    )


async def create(request: Request) -> Response:
    """**Create**: the whole connection, or nothing; then the ready page."""
    ctx = _context(request)
    posted = await _posted(request, ctx)
    if isinstance(posted, Response):
        return posted
    session, invitation, _ = posted
    if invitation.next_step() != "hub":
        return _see(STEP_PATHS[invitation.next_step()])
    tokens = invitations.qonto_tokens(ctx.box, invitation)
    cegid = invitations.cegid_credentials(ctx.box, invitation)
    assert tokens is not None
    assert cegid is not None
    assert invitation.qonto_organization_id
    assert invitation.cegid_dossier
    assert invitation.cegid_domain

    async def keep(rotated: credentials.QontoCredentials) -> None:
        if isinstance(rotated, credentials.QontoOAuth):
            await invitations.store_qonto_tokens(ctx.pool, ctx.box, invitation.id, rotated)

    try:
        async with qonto.http_clients(ctx.settings) as http:
            fresh = qonto.client(
                ctx.settings,
                tokens,
                http,
                on_tokens_rotated=keep,
                now=lambda: dt.datetime.now(dt.UTC) + CREATE_MARGIN,
            )
            await fresh.get_membership()  # refreshes (and keeps) tokens close to their expiry
            tokens_now = fresh.current_credentials
        new = inputs.NewConnection(
            client_name=invitation.client_name,
            qonto_organization_id=invitation.qonto_organization_id,
            qonto=tokens_now,
            cegid=cegid,
            cegid_dossier=invitation.cegid_dossier,
            cegid_domain=invitation.cegid_domain,
            subscribe=True,
        )

        async def use(conn: db.Conn, connection_id: uuid.UUID) -> None:
            await invitations.use(conn, invitation.id, connection_id)

        created = await connections.add(ctx.settings, ctx.pool, new, within=use)
    except invitations.AlreadyUsed:
        return _invalid_link(ctx)
    except (errors.QontoAuthRejected, eligibility.RoleRefused, eligibility.PlanRefused) as exc:
        logger.warning("setup_create_qonto_refused", invitation=str(invitation.id))
        await invitations.forget_qonto(
            ctx.pool,
            invitation.id,
            f"Qonto no longer accepts the access given earlier ({_short(exc)}). Nothing was "
            "created. An owner, an admin or a reporting member of the organization presses "
            "Connect with Qonto again, then the accountant's values (kept) are used.",
        )
        return _see(STEP_PATHS["qonto"])
    except (errors.ConfigurationError, errors.DatabaseUnavailable):
        raise
    except errors.RelayError as exc:
        step, message = _refusal(exc, invitation, ctx, cegid.api_key.reveal())
        logger.info(
            "setup_create_refused",
            invitation=str(invitation.id),
            step=step,
            reason=type(exc).__name__,
        )
        await invitations.set_problem(ctx.pool, invitation.id, step, message)
        return _see(STEP_PATHS[step])
    logger.info(
        "setup_completed",
        invitation=str(invitation.id),
        connection=str(created.connection.id),
        subscriptions=created.subscriptions,
    )
    session.data = {
        "ready": {
            "connection_id": str(created.connection.id),
            "client_name": invitation.client_name,
            "dossier": invitation.cegid_dossier,
            "plan_unverified": invitation.qonto_plan is None,
        }
    }
    await sessions.save(ctx.pool, session)
    return _see("/setup/ready")


def _short(exc: BaseException) -> str:
    return str(exc).split(":")[0][:200]


async def ready(request: Request) -> Response:
    """**Your integration is ready**, with the guide's note on the folder in Loop."""
    ctx = _context(request)
    session = await sessions.current(ctx.pool, request)
    if session is None or "ready" not in session.data:
        return _session_expired(ctx)
    done = dict(session.data["ready"])
    return _page(
        "ready.html",
        session,
        ctx,
        client_name=str(done.get("client_name", "")),
        dossier=str(done.get("dossier", "")),
        plan_unverified=bool(done.get("plan_unverified")),
    )


def routes() -> list[BaseRoute]:
    """The setup pages' routes (under ``/setup``; fixed paths before the link's token)."""
    return [
        Route("/oauth/callback", _guarded(callback), methods=["GET"]),
        Route("/qonto", _guarded(qonto_step), methods=["GET"]),
        Route("/qonto", _guarded(connect), methods=["POST"]),
        Route("/key", _guarded(key_step), methods=["GET"]),
        Route("/key", _guarded(save_key), methods=["POST"]),
        Route("/dossier", _guarded(dossier_step), methods=["GET"]),
        Route("/dossier", _guarded(save_dossier), methods=["POST"]),
        Route("/hub", _guarded(hub_step), methods=["GET"]),
        Route("/create", _guarded(create), methods=["POST"]),
        Route("/ready", _guarded(ready), methods=["GET"]),
        Route("/{token}", _guarded(entry), methods=["GET"]),
    ]
