"""The console's pages (GET), none of which reads more than one page of documents.

Sign-in, Today (the connections), a connection and its documents, runs, dead letters, invitations
and health.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import urllib.parse
import uuid
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response

from relay import errors, log, models
from relay.broker import dlq
from relay.domain import folders, invitations, stalls, status
from relay.edge.console import auth, words
from relay.edge.pages import sessions, views
from relay.store import audit, flush_requests, overview, runs

logger = log.get(__name__)

PAGE_SIZE: Final = 50
RUNS_PAGE: Final = 20
SEARCH_MAX: Final = 100


def render(
    ctx: views.Context,
    session: sessions.Session,
    template: str,
    *,
    section: str,
    status_code: int = 200,
    **values: Any,
) -> Response:
    response = views.page(
        f"console/{template}", session, ctx, section=section, words=words, **values
    )
    response.status_code = status_code
    return response


def _query(values: dict[str, Any]) -> str:
    """Return ``?k=v&...`` of the values that are set (empty when none is)."""
    kept = {k: v for k, v in values.items() if v is not None}
    return "?" + urllib.parse.urlencode(kept) if kept else ""


def _number(raw: str | None) -> int | None:
    """Read a positive id from a page's input, or None (ASCII digits only: "²" is a digit to
    ``str.isdigit`` but not to ``int``)."""
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


async def notice_and_entries(
    request: Request, ctx: views.Context, kind: str, target: str | None
) -> dict[str, Any]:
    """Read the page's recent changes (the audit of what it shows) and the one just made, if any."""
    entries = await audit.for_target(ctx.pool, kind, target)
    wanted = _number(request.query_params.get("notice"))
    notice = next((e for e in entries if e.id == wanted), None)
    return {"entries": entries, "notice": notice}


# ------------------------------------------------------------------------------------ sign-in


async def login(request: Request) -> Response:
    """Show ``/console/login`` with the field **Admin token** and **Sign in** (or Today)."""
    ctx = views.context(request)
    if await auth.operator(request, ctx) is not None:
        return views.see("/console/")
    session = await sessions.start(ctx.pool, request, idle=dt.timedelta(minutes=30))
    return views.page("console/login.html", session, ctx, error=None, section="login")


# ------------------------------------------------------------------------------------ Today


async def _health(ctx: views.Context, request: Request) -> tuple[status.Report | None, str | None]:
    """Look once at the roles and queues (never twice, since a page must answer at once)."""
    try:
        report = await status.check(ctx.settings, ctx.pool, request.app.state.amqp, confirm=False)
    except errors.DatabaseUnavailable:
        raise
    except errors.RelayError as exc:
        return None, str(exc)
    return report, None


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """A connection on the Today page, with its row, its counts by state and what it needs."""

    row: overview.ConnectionRow
    counts: dict[str, int]
    attention: words.Attention


async def today(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show ``/console/``, every connection with its next action, those needing someone first."""
    rows = await overview.connections(ctx.pool)
    counts = await overview.counts(ctx.pool)
    now = dt.datetime.now(dt.UTC)
    items: list[Item] = []
    for row in rows:
        by_state = counts.get(row.connection.id, {})
        waiting = sum(by_state.get(s, 0) for s in ("pending", "uploading", "in_doubt"))
        warning = folders.folder_warning(
            row.connection,
            now,
            waiting_documents=waiting,
            connected_at=row.connected_at,
            first_deposit_at=row.first_deposit_at,
        )
        items.append(Item(row, by_state, words.attention(row, by_state, warning)))
    items.sort(key=lambda i: (i.attention.priority, i.row.connection.client_name.lower()))
    report, health_error = await _health(ctx, request)
    stalled = report.problems() if report is not None else []
    return render(
        ctx,
        session,
        "today.html",
        section="connections",
        items=items,
        needing=sum(1 for i in items if i.attention.priority < words.LATER),
        stalled=stalled,
        health_error=health_error,
        states=[s.value for s in models.DocumentState],
    )


# ------------------------------------------------------------------------------------ a connection


def _filter(request: Request) -> overview.DocumentFilter:
    params = request.query_params
    state = params.get("state") or None
    source = params.get("source") or None
    # PostgreSQL text holds no NUL: one in a search would be refused by the database, not found.
    search = (params.get("q") or "").replace("\x00", "").strip()[:SEARCH_MAX] or None
    return overview.DocumentFilter(
        state=state if state in set(models.DocumentState) else None,
        source=source if source in set(models.Source) else None,
        search=search,
    )


async def connection(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show a connection's state, warnings, actions and one page of its documents (newest first)."""
    try:
        connection_id = uuid.UUID(request.path_params["connection_id"])
    except ValueError:
        connection_id = None
    row = await overview.connection(ctx.pool, connection_id) if connection_id else None
    if row is None or connection_id is None:
        return views.problem(
            ctx, 404, "No such connection", "This connection does not exist.", session=session
        )
    which = _filter(request)
    before = _number(request.query_params.get("before"))
    found = await overview.documents_page(
        ctx.pool, connection_id, which, before=before, limit=PAGE_SIZE + 1
    )
    documents, more = found[:PAGE_SIZE], len(found) > PAGE_SIZE
    by_state = (await overview.counts(ctx.pool, connection_id)).get(connection_id, {})
    waiting = sum(by_state.get(s, 0) for s in ("pending", "uploading", "in_doubt"))
    warning = folders.folder_warning(
        row.connection,
        dt.datetime.now(dt.UTC),
        waiting_documents=waiting,
        connected_at=row.connected_at,
        first_deposit_at=row.first_deposit_at,
    )
    query = {
        k: v
        for k, v in (("state", which.state), ("source", which.source), ("q", which.search))
        if v
    }
    return render(
        ctx,
        session,
        "connection.html",
        section="connections",
        row=row,
        counts=by_state,
        attention=words.attention(row, by_state, warning),
        warning=warning,
        documents=documents,
        older={**query, "before": documents[-1].document.id} if more else None,
        newest=query if before is not None else None,
        which=which,
        here=request.url.path + _query({**query, "before": before}),
        states=[s.value for s in models.DocumentState],
        sources=[s.value for s in models.Source],
        **await notice_and_entries(request, ctx, "connection", str(connection_id)),
    )


# ------------------------------------------------------------------------------------ runs


async def runs_page(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show every flush run, newest first (a page at a time), and the flushes asked for."""
    before = _number(request.query_params.get("before"))
    found = await runs.page(ctx.pool, before=before, limit=RUNS_PAGE + 1)
    shown, more = found[:RUNS_PAGE], len(found) > RUNS_PAGE
    report, _ = await _health(ctx, request)
    schedulers = report.matching(role="scheduler") if report is not None else []
    return render(
        ctx,
        session,
        "runs.html",
        section="runs",
        runs=shown,
        older=shown[-1].id if more else None,
        requests=await flush_requests.list_open(ctx.pool),
        scheduler_running=any(j.state == stalls.OK for j in schedulers),
        **await notice_and_entries(request, ctx, "run", None),
    )


async def run_page(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show one run's report, per connection."""
    run_id = _number(request.path_params["run_id"])
    run = await runs.get(ctx.pool, run_id) if run_id is not None else None
    if run is None:
        return views.problem(ctx, 404, "No such run", "This run does not exist.", session=session)
    report = run.report or {}
    return render(
        ctx,
        session,
        "run.html",
        section="runs",
        run=run,
        report=report,
        connections=report.get("connections") or [],
    )


# ------------------------------------------------------------------------------------ dead letters


def letter_filter(values: Any) -> tuple[str | None, str | None]:
    """Read the dead letters' filter as (reason, connection id), each None when not given."""
    return (values.get("reason") or None), (values.get("connection") or None)


def matching(
    letters: list[dlq.DeadLetter], reason: str | None, connection_id: str | None
) -> list[dlq.DeadLetter]:
    return [
        m
        for m in letters
        if (reason is None or m.reason == reason)
        and (connection_id is None or m.connection_id == connection_id)
    ]


async def dead_letters(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show the dead-letter queue with each message's reason, topic, connection and failures."""
    letters = await dlq.list_messages(ctx.settings, request.app.state.amqp)
    reason, connection_id = letter_filter(request.query_params)
    names = {
        r.connection.id: r.connection.client_name for r in await overview.connections(ctx.pool)
    }
    return render(
        ctx,
        session,
        "dead_letters.html",
        section="dead-letters",
        letters=matching(letters, reason, connection_id),
        total=len(letters),
        reasons=sorted({m.reason for m in letters}),
        connections=sorted({m.connection_id for m in letters if m.connection_id}),
        names={str(k): v for k, v in names.items()},
        reason=reason,
        connection=connection_id,
        **await notice_and_entries(request, ctx, "dead_letter", None),
    )


async def dead_letter(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show one dead-lettered message, its secrets masked."""
    letter_id = request.path_params["letter_id"]
    try:
        letter = await dlq.show(ctx.settings, request.app.state.amqp, letter_id)
    except errors.NotFound:
        return views.problem(
            ctx,
            404,
            "No such message",
            "This message is not in the dead-letter queue (replayed or purged already?).",
            session=session,
        )
    return render(
        ctx,
        session,
        "dead_letter.html",
        section="dead-letters",
        letter=letter,
        body=words.masked_body(letter.body),
    )


# ------------------------------------------------------------------------------------ invitations


async def invitations_page(
    request: Request,
    ctx: views.Context,
    session: sessions.Session,
    *,
    created: invitations.Created | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    """Show the pending invitations with their expiry (revocable), and **Create invitation**."""
    now = dt.datetime.now(dt.UTC)
    pending = [i for i in await invitations.list_all(ctx.pool) if i.usable(now)]
    pending.sort(key=lambda i: i.expires_at)
    return render(
        ctx,
        session,
        "invitations.html",
        section="invitations",
        status_code=status_code,
        pending=pending,
        created=created,
        error=error,
        configured=bool(ctx.settings.qonto_client_id),
        **await notice_and_entries(request, ctx, "invitation", None),
    )


async def invitations_get(
    request: Request, ctx: views.Context, session: sessions.Session
) -> Response:
    return await invitations_page(request, ctx, session)


# ------------------------------------------------------------------------------------ health


async def health(request: Request, ctx: views.Context, session: sessions.Session) -> Response:
    """Show health at a glance (the queues, each role's last heartbeat, the last scheduled run)."""
    report, error = await _health(ctx, request)
    last = await runs.last_scheduled(ctx.pool)
    queues = None
    if report is not None:
        with contextlib.suppress(KeyError):
            queues = report.to_json()["queues"]
    return render(
        ctx,
        session,
        "health.html",
        section="health",
        report=report,
        error=error,
        queues=queues,
        roles=[j.to_json() for j in report.roles] if report is not None else [],
        problems=report.problems() if report is not None else [],
        last=last,
    )
