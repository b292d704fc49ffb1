"""What every page shares, from the application's context to the pages that say what went wrong.

Rendering, redirects, the pages for a refused form, a dependency down or an unfinished
configuration, and the guard that turns the dependencies' failures into those pages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay import config, crypto, errors, log
from relay.edge.pages import sessions, templates

logger = log.get(__name__)

ELIGIBLE_PLAN_NAMES: Final = ("Smart", "Premium", "Essential", "Business", "Enterprise")


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """What a setup page works with, the application's settings, pool and key box."""

    settings: config.Settings
    pool: asyncpg.Pool
    box: crypto.Box


def context(request: Request) -> Context:
    state = request.app.state
    return Context(state.settings, state.pool, state.box)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def page(name: str, session: sessions.Session | None, ctx: Context, **values: Any) -> Response:
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


def see(path: str, session: sessions.Session | None = None, ctx: Context | None = None) -> Response:
    response = RedirectResponse(path, status_code=303)
    if session is not None and ctx is not None and session.is_new:
        sessions.attach(response, session, ctx.settings)
    return response


def problem(
    ctx: Context,
    status: int,
    title: str,
    message: str,
    *,
    action: str | None = None,
    restart: bool = False,
    session: sessions.Session | None = None,
) -> Response:
    """Render a page that says what went wrong and who can do what about it."""
    response = page(
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


def csrf_refused(ctx: Context) -> Response:
    return problem(
        ctx,
        403,
        "This form cannot be accepted",
        "It was sent without this page's security token (it may be old, or come from another "
        "site). Nothing was changed.",
        action="Go back, reload the page, and send it again.",
    )


def unavailable(ctx: Context, what: str) -> Response:
    return problem(
        ctx,
        503,
        "The service is unavailable",
        f"{what} could not be reached. Nothing was changed.",
        action="Try again in a few minutes.",
    )


def misconfigured(ctx: Context) -> Response:
    return problem(
        ctx,
        503,
        "The relay is not fully configured",
        "The relay's operator has not finished its configuration (Qonto's OAuth application or "
        "Cegid's subscription key). Nothing was changed.",
        action="Tell the accounting firm, whose operator can fix it.",
    )


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Turn the dependencies' failures into pages (never a stack trace, never a 500 for them)."""

    async def wrapped(request: Request) -> Response:
        ctx = context(request)
        try:
            return await handler(request)
        except errors.ConfigurationError as exc:
            logger.error("setup_misconfigured", reason=str(exc))
            return misconfigured(ctx)
        except errors.DatabaseUnavailable:
            return unavailable(ctx, "The relay's database")
        except errors.Retryable as exc:
            return unavailable(ctx, "Qonto" if "Qonto" in str(exc) else "Cegid Loop")

    return wrapped
