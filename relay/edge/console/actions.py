"""The console's actions (POST), each checked, run, audited and shown on the page it changed.

Each is checked for a session and a CSRF token first; the work is the domain's, as the command
line does it.
"""

from __future__ import annotations

import datetime as dt
import uuid

from starlette.requests import Request
from starlette.responses import Response

from relay import errors, log
from relay.broker import dlq
from relay.domain import connections, invitations, resolve
from relay.edge.console import auth, pages
from relay.edge.pages import forms, ratelimit, sessions, views
from relay.store import audit, flush_requests, overview

logger = log.get(__name__)


# ------------------------------------------------------------------------------------ sign-in


async def sign_in(request: Request) -> Response:
    """Sign in with the admin token into a new session (never the one the browser had).

    The session ends after a day idle.
    """
    ctx = views.context(request)
    address = views.client_address(request)
    try:
        fields = await forms.read(request)
    except forms.Invalid:
        return views.csrf_refused(ctx)
    before = await sessions.current(ctx.pool, request, idle=dt.timedelta(minutes=30))
    if before is None or not before.csrf_ok(fields.get(forms.CSRF_FIELD)):
        return views.csrf_refused(ctx)
    if await ratelimit.blocked(ctx.pool, auth.SIGN_INS, address) is not None:
        logger.warning("console_sign_in_rate_limited", client=address)
        return views.page(
            "console/login.html",
            before,
            ctx,
            error="Too many wrong tokens from this network: wait a few minutes.",
            section="login",
            status=429,
        )
    if not auth.token_ok(ctx, fields.get("admin_token", "")):
        await ratelimit.hit(ctx.pool, auth.SIGN_INS, address)
        await audit.record(
            ctx.pool,
            who=f"address {address}",
            action="sign_in",
            target_kind="session",
            target=None,
            outcome="refused",
            detail="wrong admin token",
        )
        logger.warning("console_sign_in_refused", client=address)
        response = views.page(
            "console/login.html",
            before,
            ctx,
            error="This is not the admin token (RELAY_ADMIN_TOKEN).",
            section="login",
        )
        response.status_code = 401
        return response
    await sessions.end(ctx.pool, before)
    session = await sessions.start(ctx.pool, request, fresh=True, idle=auth.IDLE)
    session.data = {"console": True}
    await sessions.save(ctx.pool, session)
    await audit.record(
        ctx.pool,
        who=auth.who(session),
        action="sign_in",
        target_kind="session",
        target=None,
        outcome="ok",
        detail=f"from {address}",
    )
    response = views.see("/console/")
    sessions.attach(response, session, ctx.settings, absolute=auth.ABSOLUTE)
    return response


async def sign_out(request: Request) -> Response:
    """Sign out, ending the session here and now."""
    ctx = views.context(request)
    checked = await auth.posted(request, ctx)
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    await audit.record(
        ctx.pool,
        who=auth.who(session),
        action="sign_out",
        target_kind="session",
        target=None,
        outcome="ok",
    )
    await sessions.end(ctx.pool, session)
    response = views.see(auth.LOGIN)
    response.delete_cookie(sessions.COOKIE, path="/")
    return response


# ------------------------------------------------------------------------------------ a connection


def _connection_id(request: Request) -> uuid.UUID | None:
    try:
        return uuid.UUID(request.path_params["connection_id"])
    except ValueError:
        return None


def _not_found(ctx: views.Context, session: sessions.Session, what: str) -> Response:
    return views.problem(ctx, 404, f"No such {what}", "Nothing was changed.", session=session)


async def connection_action(
    request: Request, ctx: views.Context, session: sessions.Session, fields: dict[str, str]
) -> auth.Plan | Response:
    """Plan **Check now**, **Disconnect** or **Reconnect** (which ``what`` names)."""
    connection_id = _connection_id(request)
    what = request.path_params["what"]
    if connection_id is None or what not in ("check", "disconnect", "reconnect"):
        return _not_found(ctx, session, "connection")
    pool, settings = ctx.pool, ctx.settings

    async def run() -> str:
        if what == "disconnect":
            await connections.disconnect(pool, connection_id)
            return "disconnected: its webhooks are refused and nothing is sent until Reconnect"
        result = await (connections.check if what == "check" else connections.reconnect)(
            settings, pool, connection_id
        )
        problems = "; ".join(result.get("problems") or [])
        verb = "checked" if what == "check" else "reconnected"
        return f"{verb}: {result['state']}" + (f" ({problems})" if problems else "")

    return auth.Plan(
        action=f"{what}_connection",
        target_kind="connection",
        target=str(connection_id),
        back=f"/console/connections/{connection_id}",
        run=run,
    )


async def document_action(
    request: Request, ctx: views.Context, session: sessions.Session, fields: dict[str, str]
) -> auth.Plan | Response:
    """Plan **Mark as uploaded**, **Send again** (in doubt) or **Retry** (failed) on a document."""
    document_id = pages._number(request.path_params["document_id"])
    what = request.path_params["what"]
    if document_id is None or what not in ("uploaded", "resend", "retry"):
        return _not_found(ctx, session, "document")
    from relay.domain import documents

    try:
        document = await documents.get(ctx.pool, document_id)
    except errors.NotFound:
        return _not_found(ctx, session, "document")
    back = fields.get("back", "")
    if not back.startswith(f"/console/connections/{document.connection_id}"):
        back = f"/console/connections/{document.connection_id}"
    pool = ctx.pool

    async def run() -> str:
        if what == "retry":
            await resolve.retry(pool, document_id)
            return f"document {document_id} ({document.file_name or '?'}): back to pending"
        done = await resolve.resolve(pool, document_id, uploaded=what == "uploaded")
        said = "marked as uploaded" if what == "uploaded" else "will be sent again"
        return f"document {document_id} ({done.file_name or '?'}): {said}"

    return auth.Plan(
        action={"uploaded": "mark_uploaded", "resend": "send_again", "retry": "retry"}[what],
        target_kind="connection",
        target=str(document.connection_id),
        back=back,
        run=run,
    )


# ------------------------------------------------------------------------------------ runs


async def flush_now(
    request: Request, ctx: views.Context, session: sessions.Session, fields: dict[str, str]
) -> auth.Plan | Response:
    """Plan **Flush now**, which asks a scheduler for a run (this process never runs one)."""
    pool = ctx.pool

    async def run() -> str:
        asked = await flush_requests.insert(
            pool, connection_id=None, since=None, requested_by="console"
        )
        return f"flush request {asked.id} recorded: a scheduler runs it within seconds"

    return auth.Plan("flush_now", "run", None, "/console/runs", run)


# ------------------------------------------------------------------------------------ dead letters


async def letter_action(
    request: Request, ctx: views.Context, session: sessions.Session, fields: dict[str, str]
) -> auth.Plan | Response:
    """Plan **Replay**, **Purge** (one message) or **Replay all** (those matching a filter)."""
    what = request.path_params["what"]
    settings, broker = ctx.settings, request.app.state.amqp
    if what == "replay-all":
        reason, connection_id = pages.letter_filter(fields)

        async def replay_all() -> str:
            letters = await dlq.list_messages(settings, broker)
            ids = sorted({m.id for m in pages.matching(letters, reason, connection_id)})
            if not ids:
                return "nothing to replay"
            replayed = await dlq.replay(settings, broker, ids)
            scope = ", ".join(
                f"{k} {v}" for k, v in (("reason", reason), ("connection", connection_id)) if v
            )
            return f"replayed {replayed} message(s)" + (f" ({scope})" if scope else "")

        return auth.Plan("replay_all", "dead_letter", None, "/console/dead-letters", replay_all)
    letter_id = fields.get("id", "")
    if what not in ("replay", "purge") or not letter_id:
        return _not_found(ctx, session, "message")

    async def one() -> str:
        if what == "replay":
            await dlq.replay(settings, broker, [letter_id])
            return f"message {letter_id} replayed (deduplicated like any event)"
        await dlq.purge(settings, broker, [letter_id])
        return f"message {letter_id} purged"

    return auth.Plan(what, "dead_letter", letter_id, "/console/dead-letters", one)


# ------------------------------------------------------------------------------------ invitations


async def create_invitation(request: Request) -> Response:
    """Create an invitation (field **Client name**) and show its setup link, once."""
    ctx = views.context(request)
    checked = await auth.posted(request, ctx)
    if isinstance(checked, Response):
        return checked
    session, fields = checked
    name = fields.get("client_name", "").strip()

    async def record(outcome: str, detail: str, target: str | None = None) -> None:
        await audit.record(
            ctx.pool,
            who=auth.who(session),
            action="create_invitation",
            target_kind="invitation",
            target=target,
            outcome=outcome,
            detail=detail,
        )

    if not name or len(name) > 200:
        await record("refused", "a client name (1 to 200 characters) is required")
        return await pages.invitations_page(
            request,
            ctx,
            session,
            error="Type the client's name (1 to 200 characters).",
            status_code=400,
        )
    if not ctx.settings.qonto_client_id:
        await record("failed", "RELAY_QONTO_CLIENT_ID is not set: no setup link can be made")
        raise errors.ConfigurationError("RELAY_QONTO_CLIENT_ID: required for a setup link")
    created = await invitations.create(ctx.settings, ctx.pool, name)
    await record(
        "ok",
        f"invitation for {name}, valid until {created.expires_at:%Y-%m-%d %H:%M} UTC",
        target=str(created.id),
    )
    return await pages.invitations_page(request, ctx, session, created=created, status_code=201)


async def revoke_invitation(
    request: Request, ctx: views.Context, session: sessions.Session, fields: dict[str, str]
) -> auth.Plan | Response:
    """Plan **Revoke**, after which the invitation's link stops working."""
    try:
        invitation_id = uuid.UUID(fields.get("id", ""))
    except ValueError:
        return _not_found(ctx, session, "invitation")
    pool = ctx.pool

    async def run() -> str:
        revoked = await overview.revoke_invitation(pool, invitation_id)
        if revoked is None:
            raise errors.Refused("this invitation is used, expired or revoked already")
        return f"invitation for {revoked} revoked: its link no longer works"

    return auth.Plan(
        "revoke_invitation", "invitation", str(invitation_id), "/console/invitations", run
    )
