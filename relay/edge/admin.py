"""The admin API under ``/admin``, JSON mirroring the CLI behind a bearer token.

Routes read what the application's lifespan put on ``app.state``: ``settings``, ``pool`` and ``amqp``.
Every request under ``/admin`` is authenticated first (:class:`Authenticate`), whatever its path or
method. Errors follow the CLI's: unknown ids 404, refused operations 409, bad input 400 (checked by the
same validation as the command line's flags), dependencies down or the relay misconfigured 503.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import config, crypto, errors, log, models
from relay.domain import connections, credentials, documents, inputs
from relay.store import flush_requests, runs

logger = log.get(__name__)
Handler = Callable[[Request], Awaitable[Any]]


BIGINT_MAX = 2**63 - 1  # PostgreSQL's bigint: ids and limits beyond it are bad requests


class BadRequest(Exception):
    pass


def _whole_number(text: str, what: str) -> int:
    """Read a whole number from 1 to BIGINT_MAX, else raise BadRequest naming ``what``."""
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > 19
        or not 1 <= int(text) <= BIGINT_MAX
    ):
        raise BadRequest(f"{what}: a whole number from 1 to {BIGINT_MAX}")
    return int(text)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(value), status_code=status, media_type="application/json", headers=headers
    )


def _refusal(request: Request) -> str | None:
    """Say why the request may not use the admin API, or ``None`` when it may."""
    settings: config.Settings = request.app.state.settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if settings.admin_token is None:
        return "admin API disabled"
    if scheme.lower() != "bearer" or not token.strip():
        return "missing token"
    if not crypto.constant_time_equal(token.strip(), settings.admin_token.reveal()):
        return "wrong token"
    return None


def _authorized(request: Request) -> bool:
    return _refusal(request) is None


def _unauthorized() -> Response:
    return JSONResponse(
        {"error": "admin API: missing or wrong bearer token"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


class Authenticate:
    """ASGI middleware that requires the bearer token on every HTTP request under ``/admin``.

    It runs before routing, so an unknown path or a wrong method answers 401 too, not 404 or 405.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admin = scope["type"] == "http" and is_admin_path(scope["path"])
        if admin:
            request = Request(scope)
            reason = _refusal(request)
            if reason is not None:
                # never the token: the path, the client's address and why
                logger.warning(
                    "admin_auth_failed",
                    path=scope["path"][:200],
                    method=scope["method"],
                    client=request.client.host if request.client else None,
                    reason=reason,
                )
                request.app.state.metrics.admin_auth_failed(reason)
                await _unauthorized()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, run, and turn the error tree into statuses (never a 500 for client input)."""

    async def wrapped(request: Request) -> Response:
        if not _authorized(request):
            return _unauthorized()
        try:
            result = await handler(request)
        except (BadRequest, inputs.InvalidInput) as exc:
            return _json({"error": str(exc)}, 400)
        except errors.ConfigurationError as exc:
            return _json({"error": str(exc)}, 503)
        except errors.NotFound as exc:
            return _json({"error": str(exc)}, 404)
        except (errors.Refused, errors.Permanent) as exc:
            return _json({"error": str(exc)}, 409)
        except errors.Retryable as exc:
            return _json({"error": str(exc)}, 503)
        return result if isinstance(result, Response) else _json(result)

    return wrapped


def _connection_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["connection_id"])
    except ValueError:
        raise errors.NotFound("no such connection") from None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("body must be a JSON object")
    return value


def _text(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key}: a non-empty string is required")
    return value


def _since(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    try:
        day = dt.date.fromisoformat(str(value))
    except ValueError:
        raise BadRequest("since: expected YYYY-MM-DD") from None
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=dt.UTC)


async def list_connections(request: Request) -> Any:
    return [c.to_json() for c in await connections.list_all(request.app.state.pool)]


def _field(name: str) -> str:
    """Name a field in the admin API's messages by its JSON key."""
    return {"webhook_secret": "webhook_secrets"}.get(name, name)


async def add_connection(request: Request) -> Any:
    body = await _body(request)
    qonto_creds = inputs.qonto_credentials(
        body.get("qonto_api_key"), body.get("qonto_refresh_token"), label=_field
    )
    secrets = body.get("webhook_secrets") or []
    if not isinstance(secrets, list) or not all(isinstance(s, str) for s in secrets):
        raise BadRequest("webhook_secrets: a list of strings")
    new = inputs.NewConnection(
        client_name=str(_text(body, "client_name")),
        qonto_organization_id=str(_text(body, "qonto_organization_id")),
        qonto=qonto_creds,
        cegid=credentials.CegidCredentials(
            api_key=config.Secret(str(_text(body, "cegid_api_key"))),
            api_secret=config.Secret(str(_text(body, "cegid_api_secret"))),
        ),
        cegid_dossier=str(_text(body, "cegid_dossier")),
        cegid_domain=str(_text(body, "cegid_domain")),
        webhook_secrets=tuple(secrets),
        subscribe=bool(body.get("subscribe", False)),
        since=_since(body.get("since")),
    )
    inputs.validate(new, label=_field)
    created = await connections.add(request.app.state.settings, request.app.state.pool, new)
    return _json(created.to_json(), 201)


async def show_connection(request: Request) -> Any:
    return await connections.describe(request.app.state.pool, _connection_id(request))


async def check_connection(request: Request) -> Any:
    state = request.app.state
    return await connections.check(state.settings, state.pool, _connection_id(request))


async def disconnect_connection(request: Request) -> Any:
    connection = await connections.disconnect(request.app.state.pool, _connection_id(request))
    return connection.to_json()


async def reconnect_connection(request: Request) -> Any:
    state = request.app.state
    return await connections.reconnect(state.settings, state.pool, _connection_id(request))


async def list_documents(request: Request) -> Any:
    params = request.query_params
    connection_id = None
    if params.get("connection"):
        try:
            connection_id = uuid.UUID(params["connection"])
        except ValueError:
            raise BadRequest("connection: not a UUID") from None
    limit = _whole_number(params["limit"], "limit") if params.get("limit") else None
    state = params.get("state")
    if state is not None and state not in set(models.DocumentState):
        raise BadRequest(
            f"unknown state {state!r}: expected one of {', '.join(models.DocumentState)}"
        )
    items = await documents.list_documents(
        request.app.state.pool, connection_id=connection_id, state=state, limit=limit
    )
    return [d.to_json() for d in items]


async def resolve_document(request: Request) -> Any:
    from relay.domain import resolve

    body = await _body(request)
    decision = body.get("decision")
    if decision not in ("uploaded", "resend"):
        raise BadRequest('decision: "uploaded" or "resend"')
    document_id = _whole_number(request.path_params["document_id"], "document id")
    document = await resolve.resolve(
        request.app.state.pool, document_id, uploaded=decision == "uploaded"
    )
    return document.to_json()


async def retry_document(request: Request) -> Any:
    from relay.domain import resolve

    raw_id = request.path_params["document_id"]
    if not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 18:
        raise errors.NotFound("no such document")
    return (await resolve.retry(request.app.state.pool, int(raw_id))).to_json()


async def list_dlq(request: Request) -> Any:
    from relay.broker import dlq

    state = request.app.state
    return [m.to_json() for m in await dlq.list_messages(state.settings, state.amqp)]


async def show_dlq(request: Request) -> Any:
    from relay.broker import dlq

    state = request.app.state
    message = await dlq.show(state.settings, state.amqp, request.path_params["dlq_id"])
    return message.to_json(with_body=True)


async def replay_dlq(request: Request) -> Any:
    from relay.broker import dlq

    body = await _body(request)
    ids = body.get("ids")
    if body.get("all") is True:
        ids = None
    elif not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise BadRequest('give "ids": [...] or "all": true')
    state = request.app.state
    return {"replayed": await dlq.replay(state.settings, state.amqp, ids)}


async def purge_dlq(request: Request) -> Any:
    from relay.broker import dlq

    body = await _body(request)
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise BadRequest('give "ids": [...]')
    state = request.app.state
    return {"purged": await dlq.purge(state.settings, state.amqp, ids)}


async def get_status(request: Request) -> Any:
    """Answer what ``relay status --json`` prints (roles, queues, what is stalled).

    It is filtered by ``role`` and ``host`` when given, and always 200 (the verdict is in the body).
    """
    import socket

    from relay.domain import status

    params = request.query_params
    role = params.get("role") or None
    if role is not None and role not in ("serve", "consume", "scheduler", "flush"):
        raise BadRequest("role: serve, consume, scheduler or flush")
    host = socket.gethostname() if params.get("this_host") in ("1", "true") else params.get("host")
    state = request.app.state
    report = await status.check(state.settings, state.pool, state.amqp)
    return report.to_json(role, host or None)


async def flush_now(request: Request) -> Any:
    """Ask for a scan + flush, recorded for a scheduler to run (never run here).

    Answers 202 with the request's id and the URL that follows it.
    """
    body = await _body(request)
    connection_id = None
    if body.get("connection_id"):
        try:
            connection_id = uuid.UUID(str(body["connection_id"]))
        except ValueError:
            raise BadRequest("connection_id: not a UUID") from None
    state = request.app.state
    if connection_id is not None:
        await connections.get(state.pool, connection_id)  # 404 for an unknown connection
    asked = await flush_requests.insert(
        state.pool,
        connection_id=connection_id,
        since=_since(body.get("since")),
        requested_by="admin API",
    )
    url = flush_request_url(state.settings, asked.id)
    return _json({**asked.to_json(), "url": url}, 202, headers={"Location": url})


def flush_request_url(settings: config.Settings, request_id: int) -> str:
    return f"{settings.public_url.rstrip('/')}/admin/flush/{request_id}"


async def show_flush_request(request: Request) -> Any:
    """Show a flush request's state (waiting, running, finished or failed) and its run's report."""
    raw_id = request.path_params["request_id"]
    if not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 18:
        raise errors.NotFound("no such flush request")
    pool = request.app.state.pool
    asked = await flush_requests.get(pool, int(raw_id))
    if asked is None:
        raise errors.NotFound(f"no flush request {raw_id}")
    run = await runs.get(pool, asked.run_id) if asked.run_id is not None else None
    return {**asked.to_json(), "report": run.report if run is not None else None}


async def create_invitation(request: Request) -> Any:
    from relay.domain import invitations

    body = await _body(request)
    settings: config.Settings = request.app.state.settings
    if not settings.qonto_client_id:
        raise errors.ConfigurationError(
            "RELAY_QONTO_CLIENT_ID and RELAY_QONTO_CLIENT_SECRET: required for a setup link"
        )
    created = await invitations.create(
        settings, request.app.state.pool, str(_text(body, "client_name"))
    )
    return _json(
        {
            "id": str(created.id),
            "setup_url": created.setup_url,
            "expires_at": created.expires_at.isoformat(),
        },
        201,
    )


async def list_invitations(request: Request) -> Any:
    from relay.domain import invitations

    return [i.to_json() for i in await invitations.list_all(request.app.state.pool)]


def routes() -> list[BaseRoute]:
    def route(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, endpoint(handler), methods=methods)

    return [
        route("/connections", list_connections, ["GET"]),
        route("/connections", add_connection, ["POST"]),
        route("/connections/{connection_id}", show_connection, ["GET"]),
        route("/connections/{connection_id}/check", check_connection, ["POST"]),
        route("/connections/{connection_id}/disconnect", disconnect_connection, ["POST"]),
        route("/connections/{connection_id}/reconnect", reconnect_connection, ["POST"]),
        route("/documents", list_documents, ["GET"]),
        route("/documents/{document_id}/resolve", resolve_document, ["POST"]),
        route("/documents/{document_id}/retry", retry_document, ["POST"]),
        route("/dlq", list_dlq, ["GET"]),
        route("/dlq/replay", replay_dlq, ["POST"]),
        route("/dlq/purge", purge_dlq, ["POST"]),
        route("/dlq/{dlq_id}", show_dlq, ["GET"]),
        route("/flush", flush_now, ["POST"]),
        route("/flush/{request_id}", show_flush_request, ["GET"]),
        route("/status", get_status, ["GET"]),
        route("/invitations", list_invitations, ["GET"]),
        route("/invitations", create_invitation, ["POST"]),
    ]
