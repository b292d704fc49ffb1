"""Operators in the console, their sign-in with the admin token and their sessions.

Every page and every action goes through the guards here (a session, a CSRF token, an audit entry).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from relay import crypto, errors, log
from relay.edge.pages import forms, ratelimit, sessions, views
from relay.store import audit

logger = log.get(__name__)

IDLE: Final = dt.timedelta(days=1)  # a console session ends after a day without use
ABSOLUTE: Final = dt.timedelta(days=7)
SIGN_INS: Final = ratelimit.Limit("console-sign-in", 10, dt.timedelta(minutes=10))
LOGIN: Final = "/console/login"


def who(session: sessions.Session) -> str:
    """Name an operator for the audit by their session, as a short fingerprint of its id's hash."""
    return f"session {session.id_hash.hex()[:12]}"


async def operator(request: Request, ctx: views.Context) -> sessions.Session | None:
    """Find the signed-in operator's session (its expiry pushed back a day), or None."""
    session = await sessions.current(ctx.pool, request, idle=IDLE, absolute=ABSOLUTE)
    if session is None or session.data.get("console") is not True:
        return None
    return session


def token_ok(ctx: views.Context, typed: str) -> bool:
    token = ctx.settings.admin_token
    return token is not None and bool(typed) and crypto.constant_time_equal(typed, token.reveal())


def to_login() -> Response:
    return views.see(LOGIN)


PageHandler = Callable[[Request, views.Context, sessions.Session], Awaitable[Response]]


def page(handler: PageHandler) -> views.Handler:
    """Guard a console page for signed-in operators (others go to the sign-in page)."""

    async def wrapped(request: Request) -> Response:
        ctx = views.context(request)
        session = await operator(request, ctx)
        if session is None:
            return to_login()
        return await handler(request, ctx, session)

    return views.guarded(wrapped)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """An action about to be done, with its audit target, where to go after and the change itself.

    The change says what it did, in words.
    """

    action: str
    target_kind: str
    target: str | None
    back: str
    run: Callable[[], Awaitable[str]]


ActionHandler = Callable[
    [Request, views.Context, sessions.Session, dict[str, str]], Awaitable[Plan | Response]
]


async def posted(
    request: Request, ctx: views.Context
) -> tuple[sessions.Session, dict[str, str]] | Response:
    """Read the form of a POST by a signed-in operator with the page's CSRF token, or refuse it.

    Without a session it goes to the sign-in page, without the token it is 403 (audited as refused),
    with a NUL in a field it is 400; nothing is changed in any case.
    """
    try:
        fields = await forms.read(request)
    except forms.Invalid:
        return views.csrf_refused(ctx)
    session = await operator(request, ctx)
    if session is None:
        logger.info("console_post_without_session", path=request.url.path)
        return to_login()
    if not session.csrf_ok(fields.get(forms.CSRF_FIELD)):
        logger.warning("console_csrf_refused", path=request.url.path)
        await audit.record(
            ctx.pool,
            who=who(session),
            action="csrf_refused",
            target_kind="session",
            target=None,
            outcome="refused",
            detail=f"POST {request.url.path[:200]} without this session's CSRF token",
        )
        return views.csrf_refused(ctx)
    if any("\x00" in value for value in fields.values()):
        # PostgreSQL text holds no NUL: refused here, before anything is changed or recorded.
        return views.problem(
            ctx, 400, "Unreadable form", "A field holds a NUL character.", session=session
        )
    return session, fields


def action(handler: ActionHandler) -> views.Handler:
    """Guard, run and audit a console action (who, what, when, outcome), whatever its outcome.

    The action is a POST with the CSRF token; afterwards the browser goes back to the page it
    changed, which shows the entry.
    """

    async def wrapped(request: Request) -> Response:
        ctx = views.context(request)
        checked = await posted(request, ctx)
        if isinstance(checked, Response):
            return checked
        session, fields = checked
        plan = await handler(request, ctx, session, fields)
        if isinstance(plan, Response):
            return plan
        outcome, detail = "ok", ""
        try:
            detail = await plan.run()
        except (errors.Refused, errors.NotFound, errors.Permanent) as exc:
            outcome, detail = "refused", str(exc)
        except errors.DatabaseUnavailable:
            raise  # nothing can be recorded: the guard's page says so
        except (errors.Retryable, errors.ConfigurationError) as exc:
            outcome, detail = "failed", str(exc)
        entry = await audit.record(
            ctx.pool,
            who=who(session),
            action=plan.action,
            target_kind=plan.target_kind,
            target=plan.target,
            outcome=outcome,
            detail=detail[:1000],
        )
        logger.info(
            "console_action", action=plan.action, target=plan.target, outcome=outcome, who=entry.who
        )
        separator = "&" if "?" in plan.back else "?"
        return views.see(f"{plan.back}{separator}{urlencode({'notice': entry.id})}")

    return views.guarded(wrapped)
