"""Qonto's Business API as Qonto's public documentation describes it, on a loopback socket.

:class:`QontoSandbox` is one organization to seed and point the relay at, OAuth consent included;
:class:`QontoFaults` injects faults (429, 5xx, slow answers, expired URLs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import hmac
import html
import random
import re
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson

from relay.sandbox import files, signing
from relay.sandbox.http import Request, Response, ServerThread, json_error

URL_LIFETIME_S = 30 * 60
RATE_LIMIT, RATE_WINDOW_S = 1000, 10.0
CODE_LIFETIME_S = 10 * 60
SCOPES = frozenset(
    {
        "webhook",
        "organization.read",
        "attachment.read",
        "supplier_invoice.read",
        "client_invoices.read",
        "subscription.read",
        "offline_access",
    }
)


def plan(name: str, code: str | None = None) -> dict[str, Any]:
    """Build a ``GET /v2/subscription`` plan object as the contract shows it."""
    return {
        "code": code or f"team_{name.lower().replace(' ', '_')}",
        "name": name,
        "lineup": "teams",
        "status": "active",
        "recurrence": "monthly",
        "monthly_price": {"amount": "99.00", "currency": "EUR"},
        "trial_ends_at": None,
    }


def _iso(moment: dt.datetime) -> str:
    """Format a moment as an ISO 8601 UTC stamp, to the microsecond.

    Qonto shows milliseconds; the sandbox keeps microseconds so that stamps it hands out in a
    burst stay strictly increasing without running ahead of the clock.
    """
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclasses.dataclass
class _Fault:
    prefix: str
    status: int | None  # None: slow
    remaining: int
    retry_after: float | None = None
    seconds: float = 0.0


class QontoFaults:
    """Faults injected into the next matching requests, or at random with a seeded generator."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Fault] = []
        self._expire_next = 0
        self._random: random.Random | None = None
        self._rate = 0.0
        self.omit_retry_after = False
        self.injected: collections.Counter[str] = collections.Counter()

    def fail_next(
        self, prefix: str, status: int, count: int = 1, retry_after: float | None = None
    ) -> None:
        with self._lock:
            self._queue.append(_Fault(prefix, status, count, retry_after))

    def slow(self, prefix: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            self._queue.append(_Fault(prefix, None, count, seconds=seconds))

    def expire_next_urls(self, count: int = 1) -> None:
        with self._lock:
            self._expire_next += count

    def random_plan(self, seed: int, rate: float) -> None:
        """Fail each API or storage request at ``rate``, chosen by ``random.Random(seed)``.

        A failure is a 429, 500, 503, a slow answer or an expired URL.
        """
        with self._lock:
            self._random, self._rate = random.Random(seed), rate

    def take(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._queue:
                if path.startswith(fault.prefix) and fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._queue.remove(fault)
                    self.injected[str(fault.status or "slow")] += 1
                    return fault
            if self._random is not None and self._random.random() < self._rate:
                kind = self._random.choice(["429", "500", "503", "slow"])
                self.injected[kind] += 1
                if kind == "slow":
                    return _Fault(path, None, 0, seconds=self._random.uniform(0.05, 0.3))
                return _Fault(path, int(kind), 0, retry_after=0.05 if kind == "429" else None)
        return None

    def take_expired(self) -> bool:
        with self._lock:
            if self._expire_next > 0:
                self._expire_next -= 1
                self.injected["expired_url"] += 1
                return True
            if self._random is not None and self._random.random() < self._rate / 2:
                self.injected["expired_url"] += 1
                return True
        return False


class QontoSandbox:
    """Qonto for one organization with one bank account.

    Seed it, then point the relay at ``url``.

    It answers as the documentation says: authentication (``login:secret`` verbatim, or an OAuth
    bearer from its token endpoint), the staging token trap (an HTML page with status 200),
    pagination with ``meta.next_page`` and 422 past the end, presigned attachment URLs valid 30
    minutes that refuse an ``Authorization`` header, 404 for deleted attachments, and the 1,000
    requests / 10 s limit. :meth:`deliver` posts a signed event to every subscription of its topic
    (what Qonto does).
    """

    def __init__(
        self,
        *,
        organization_id: str | None = None,
        login: str = "sandbox-login",
        secret_key: str = "sandbox-secret-key",
        staging_token: str | None = None,
    ) -> None:
        self.organization_id = organization_id or str(uuid.uuid4())
        self.membership_id = str(uuid.uuid4())
        self.bank_account_id = str(uuid.uuid4())
        self.login, self.secret_key, self.staging_token = login, secret_key, staging_token
        self.membership_role = "admin"
        self.plan: dict[str, Any] | None = plan("Business")  # None: {"plan": null}
        self.legal_name = "Atelier Demo SAS"
        # Qonto wants HTTPS callbacks; a local demo or browser test on plain HTTP adds "http"
        self.callback_schemes: tuple[str, ...] = ("https",)
        self.rate_limit = RATE_LIMIT  # requests per RATE_WINDOW_S, as documented
        self.clock_offset_s = 0.0
        self.rate_limit, self.rate_window_s = RATE_LIMIT, RATE_WINDOW_S
        self.faults = QontoFaults()
        self.requests: list[tuple[str, str, bool]] = []
        self.list_totals = True  # meta.total_count and meta.total_pages (undocumented) included
        self._page_hooks: list[tuple[str, Callable[[int], object], list[int]]] = []
        self._instant: str | None = None
        self.subscription_id = str(uuid.uuid4())
        self._lock = threading.RLock()
        self._route_table = self._routes()
        self._signing_key = secrets.token_bytes(32)
        self._attachments: dict[str, dict[str, Any]] = {}
        self._contents: dict[str, bytes | files.Synthetic] = {}
        self._transactions: dict[str, dict[str, Any]] = {}
        self._supplier_invoices: dict[str, dict[str, Any]] = {}
        self._client_invoices: dict[str, dict[str, Any]] = {}
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._oauth_clients: dict[str, str] = {}
        self._refresh_tokens: dict[str, float] = {}  # token -> valid until (sandbox time)
        self._access_tokens: dict[str, float] = {}
        self._token_scopes: dict[str, frozenset[str]] = {}  # consented tokens -> their scopes
        self._codes: dict[str, dict[str, Any]] = {}  # authorization code -> grant
        self.consents: list[dict[str, Any]] = []  # every consent page answer, for tests
        self._last_stamp = 0.0
        self._hits: collections.deque[float] = collections.deque()
        self._server = ServerThread(self._handle, name="qonto-sandbox")

    # -------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> QontoSandbox:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def oauth_url(self) -> str:
        return self._server.url

    @property
    def api_key_header(self) -> str:
        return f"{self.login}:{self.secret_key}"

    @property
    def clock(self) -> float:
        """The sandbox clock's offset from real time, in seconds (alias of ``clock_offset_s``)."""
        return self.clock_offset_s

    @clock.setter
    def clock(self, offset_s: float) -> None:
        self.clock_offset_s = offset_s

    def now(self) -> float:
        return time.time() + self.clock_offset_s

    def _stamp(self) -> str:
        """Hand out a strictly increasing updated_at (the same one inside :meth:`one_instant`)."""
        with self._lock:
            if self._instant is not None:
                return self._instant
            moment = max(self.now(), self._last_stamp + 0.000001)
            self._last_stamp = moment
        return _iso(dt.datetime.fromtimestamp(moment, dt.UTC))

    @contextlib.contextmanager
    def one_instant(self) -> Iterator[str]:
        """Make every stamp handed out inside the block one instant (a bulk import or update)."""
        stamp = self._stamp()
        with self._lock:
            self._instant = stamp
        try:
            yield stamp
        finally:
            with self._lock:
                self._instant = None

    def after_page(self, path: str, hook: Callable[[int], object]) -> None:
        """Call ``hook(n)`` right after the n-th page of the list at ``path`` is answered.

        Pages are counted from this call; the hook runs before the next request is read, to update
        items mid-walk.
        """
        with self._lock:
            self._page_hooks.append((path, hook, [0]))

    # -------------------------------------------------------------------------------- seeding

    def add_attachment(
        self, content: bytes | files.Synthetic, *, file_name: str, content_type: str
    ) -> str:
        attachment_id = str(uuid.uuid4())
        size = content.size if isinstance(content, files.Synthetic) else len(content)
        with self._lock:
            self._contents[attachment_id] = content
            self._attachments[attachment_id] = {
                "id": attachment_id,
                "created_at": self._stamp(),
                "file_name": file_name,
                "file_size": str(size),
                "file_content_type": content_type,
                "probative_attachment": {"status": "unavailable"},
            }
        return attachment_id

    def delete_attachment(self, attachment_id: str) -> None:
        with self._lock:
            self._attachments.pop(attachment_id, None)
            self._contents.pop(attachment_id, None)

    def add_transaction(
        self,
        *,
        side: str,
        amount: str | float,
        label: str,
        attachment_ids: list[str],
        settled_at: str | None = None,
        counterparty: str | None = None,
        currency: str = "EUR",
    ) -> dict[str, Any]:
        transaction_id = str(uuid.uuid4())
        stamp = self._stamp()
        tx = {
            "id": transaction_id,
            "transaction_id": f"sandbox-{transaction_id[:8]}",
            "amount": float(amount),
            "currency": currency,
            "local_amount": float(amount),
            "local_currency": currency,
            "side": side,
            "operation_type": "card" if side == "debit" else "income",
            "status": "completed",
            "label": label,
            "clean_counterparty_name": counterparty or label.title(),
            "note": None,
            "reference": None,
            "settled_at": settled_at or stamp,
            "emitted_at": settled_at or stamp,
            "updated_at": stamp,
            "attachment_ids": list(attachment_ids),
            "subject_type": "Card" if side == "debit" else "Income",
            "bank_account_id": self.bank_account_id,
        }
        with self._lock:
            self._transactions[transaction_id] = tx
        return copy.deepcopy(tx)

    def update_transaction(
        self, transaction_id: str, *, attachment_ids: list[str]
    ) -> dict[str, Any]:
        with self._lock:
            tx = self._transactions[transaction_id]
            tx["attachment_ids"] = list(attachment_ids)
            tx["updated_at"] = self._stamp()
            return copy.deepcopy(tx)

    def add_supplier_invoice(
        self,
        *,
        attachment_id: str,
        supplier_name: str,
        total: str,
        status: str = "to_pay",
        invoice_number: str | None = None,
        file_name: str | None = None,
    ) -> dict[str, Any]:
        invoice_id = str(uuid.uuid4())
        stamp = self._stamp()
        invoice = {
            "id": invoice_id,
            "organization_id": self.organization_id,
            "file_name": file_name or self._attachments[attachment_id]["file_name"],
            "status": status,
            "source_type": "email",
            "attachment_id": attachment_id,
            "supplier_name": supplier_name,
            "invoice_number": invoice_number or f"INV-{invoice_id[:6]}",
            "total_amount": {"value": total, "currency": "EUR"},
            "issue_date": stamp[:10],
            "due_date": stamp[:10],
            "created_at": stamp,
            "updated_at": stamp,
        }
        with self._lock:
            self._supplier_invoices[invoice_id] = invoice
        return copy.deepcopy(invoice)

    def set_supplier_invoice_status(self, invoice_id: str, status: str) -> dict[str, Any]:
        with self._lock:
            invoice = self._supplier_invoices[invoice_id]
            invoice["status"] = status
            invoice["updated_at"] = self._stamp()
            return copy.deepcopy(invoice)

    def add_client_invoice(
        self, *, attachment_id: str, status: str, total: str, number: str | None = None
    ) -> dict[str, Any]:
        invoice_id = str(uuid.uuid4())
        stamp = self._stamp()
        invoice = {
            "id": invoice_id,
            "number": number or f"F-{invoice_id[:6]}",
            "status": status,
            "attachment_id": attachment_id,
            "invoice_url": f"https://pay.example.invalid/invoices/{invoice_id[:8]}",
            "currency": "EUR",
            "total_amount": {"value": total, "currency": "EUR"},
            "client": {"name": "Atelier Nova"},
            "issue_date": stamp[:10],
            "due_date": stamp[:10],
            "created_at": stamp,
            "finalized_at": None if status == "draft" else stamp,
            "paid_at": stamp if status == "paid" else None,
            "updated_at": stamp,
        }
        with self._lock:
            self._client_invoices[invoice_id] = invoice
        return copy.deepcopy(invoice)

    def set_client_invoice_status(self, invoice_id: str, status: str) -> dict[str, Any]:
        with self._lock:
            invoice = self._client_invoices[invoice_id]
            invoice["status"] = status
            invoice["updated_at"] = stamp = self._stamp()
            if status != "draft" and invoice["finalized_at"] is None:
                invoice["finalized_at"] = stamp
            if status == "paid":
                invoice["paid_at"] = stamp
            return copy.deepcopy(invoice)

    def add_oauth_client(self, client_id: str, client_secret: str) -> str:
        """Register an OAuth app and return a refresh token for this organization."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._oauth_clients[client_id] = client_secret
            self._refresh_tokens[token] = float("inf")
        return token

    # -------------------------------------------------------------------------------- events

    def _envelope(self, topic: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()),
            "subscription_id": self.subscription_id,
            "organization_id": self.organization_id,
            "membership_id": self.membership_id,
            "type": topic,
            "created_at": self._stamp(),
            "data": data,
        }

    def transaction_event(self, tx: dict[str, Any]) -> dict[str, Any]:
        data = {"event": "updated", **copy.deepcopy(tx)}
        return self._envelope("v1/transactions", data)

    def client_invoice_event(
        self, invoice: dict[str, Any], *, with_attachment_id: bool = False
    ) -> dict[str, Any]:
        data = copy.deepcopy(invoice)
        if not with_attachment_id:
            data.pop("attachment_id", None)
        return self._envelope("v1/client-invoices", data)

    def consent_revocation_event(self) -> dict[str, Any]:
        stamp = self._stamp()
        return self._envelope(
            "v1/consent-revocations", {"client_id": str(uuid.uuid4()), "revoked_at": stamp}
        )

    def subscriptions(self) -> list[dict[str, Any]]:
        """List every webhook subscription, with its secret (as created)."""
        with self._lock:
            return [copy.deepcopy(s) for s in self._subscriptions.values()]

    def deliver(self, event: dict[str, Any], *, timeout: float = 5.0) -> list[int]:
        """POST ``event``, signed, to every subscription of its topic, and return the statuses."""
        body = orjson.dumps(event)
        statuses = []
        for subscription in self.subscriptions():
            if event.get("type") not in subscription["types"]:
                continue
            response = httpx.post(
                subscription["callback_url"],
                content=body,
                headers={
                    "content-type": "application/json",
                    "x-qonto-signature": signing.sign(body, subscription["secret"]),
                },
                timeout=timeout,
            )
            statuses.append(response.status_code)
        return statuses

    # -------------------------------------------------------------------------------- HTTP

    async def _handle(self, request: Request) -> Response:
        self.requests.append((request.method, request.path, "authorization" in request.headers))
        if request.path.startswith("/storage/"):
            return await self._storage(request)
        fault = self.faults.take(request.path)
        if fault is not None:
            if fault.status is None:
                await asyncio.sleep(fault.seconds)
            else:
                headers = {}
                if fault.status == 429 and not self.faults.omit_retry_after:
                    headers["Retry-After"] = str(
                        fault.retry_after if fault.retry_after is not None else 1
                    )
                return json_error(fault.status, "sandbox_fault", "injected fault", headers)
        if self._rate_limited():
            headers = {} if self.faults.omit_retry_after else {"Retry-After": "1"}
            return json_error(429, "too_many_requests", "rate limit exceeded", headers)
        if request.path == "/oauth2/token" and request.method == "POST":
            return await self._token(request)
        if request.path == "/oauth2/auth":  # a browser page: no staging token, no API auth
            return await self._consent(request)
        if (
            self.staging_token is not None
            and request.headers.get("x-qonto-staging-token") != self.staging_token
        ):
            return Response(200, b"<html><body>Sign in to Qonto</body></html>", "text/html")
        if not self._authenticated(request.headers.get("authorization", "")):
            return json_error(401, "unauthorized", "invalid credentials")
        return self._route(request, await request.body())

    def _rate_limited(self) -> bool:
        now = time.monotonic()
        with self._lock:
            while self._hits and now - self._hits[0] > self.rate_window_s:
                self._hits.popleft()
            if len(self._hits) >= self.rate_limit:
                return True
            self._hits.append(now)
        return False

    def _authenticated(self, header: str) -> bool:
        if hmac.compare_digest(header.encode(), self.api_key_header.encode()):
            return True
        if header.startswith("Bearer "):
            with self._lock:
                return self._access_tokens.get(header[7:], 0) > self.now()
        return False

    def _scoped(self, header: str, scope: str) -> bool:
        """Tell whether the header is an API key, or a token whose consent included ``scope``.

        Tokens issued without a consent (older ones) have all scopes.
        """
        if not header.startswith("Bearer "):
            return True
        with self._lock:
            scopes = self._token_scopes.get(header[7:])
        return scopes is None or scope in scopes

    async def _consent(self, request: Request) -> Response:
        """Show the consent page (GET) and send the member's answer (POST) back to redirect_uri.

        As the contract describes it: ``GET /oauth2/auth`` shows a consent page (buttons
        **Authorize** and **Deny**, no script) for a registered app, and sends the browser back to
        ``redirect_uri`` with ``code`` and ``state``, or ``error=access_denied``; the code is valid
        10 minutes, once, at the token endpoint with ``grant_type=authorization_code`` and the same
        ``redirect_uri``. The tokens it gives carry the scopes consented to: ``GET
        /v2/subscription`` needs ``subscription.read``.
        """
        if request.method == "POST":
            params = {
                k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()
            }
        else:
            params = {k: v[0] for k, v in request.query.items() if v}
        client_id, redirect = params.get("client_id", ""), params.get("redirect_uri", "")
        state, scope = params.get("state", ""), params.get("scope", "")
        with self._lock:
            known = client_id in self._oauth_clients
        problem = None
        if not known:
            problem = "unknown client_id"
        elif params.get("response_type") != "code":
            problem = "response_type must be code"
        elif not redirect:
            problem = "redirect_uri is required"
        elif not set(scope.split()) <= SCOPES or not scope.split():
            problem = f"unknown scope in {scope!r}"
        if problem is not None:
            return Response(
                400, f"<p>invalid_request: {html.escape(problem)}</p>".encode(), "text/html"
            )
        if request.method == "GET":
            return Response(200, self._consent_page(params).encode(), "text/html; charset=utf-8")
        decision = params.get("decision")
        self.consents.append({"decision": decision, "state": state, "scope": scope})
        if decision == "authorize":
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = {
                    "client_id": client_id,
                    "redirect_uri": redirect,
                    "scopes": frozenset(scope.split()),
                    "expires": self.now() + CODE_LIFETIME_S,
                }
            answer = {"code": code, "state": state}
        else:
            answer = {"error": "access_denied", "state": state}
        separator = "&" if "?" in redirect else "?"
        location = f"{redirect}{separator}{urllib.parse.urlencode(answer)}"
        return Response(302, b"", "text/html", headers={"location": location})

    def _consent_page(self, params: dict[str, str]) -> str:
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in params.items()
            if k in ("client_id", "redirect_uri", "response_type", "scope", "state")
        )
        scopes = "".join(f"<li>{html.escape(s)}</li>" for s in params.get("scope", "").split())
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            "<title>Qonto sandbox: authorize access</title></head><body>"
            "<h1>Qonto (sandbox)</h1>"
            f"<p>An application asks to access <strong>{html.escape(self.legal_name)}</strong> "
            f"as Claire Martin ({html.escape(self.membership_role)}):</p><ul>{scopes}</ul>"
            f'<form method="post" action="/oauth2/auth">{hidden}'
            '<button type="submit" name="decision" value="authorize">Authorize</button> '
            '<button type="submit" name="decision" value="deny">Deny</button>'
            "</form></body></html>"
        )

    async def _token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()}
        grant = form.get("grant_type")
        with self._lock:
            if grant not in ("refresh_token", "authorization_code") or self._oauth_clients.get(
                form.get("client_id", "")
            ) != form.get("client_secret"):
                return Response(401, orjson.dumps({"error": "invalid_client"}))
            scopes: frozenset[str] | None = None
            if grant == "authorization_code":
                issued = self._codes.pop(form.get("code", ""), None)  # a code is used once
                if (
                    issued is None
                    or issued["expires"] < self.now()
                    or issued["client_id"] != form.get("client_id")
                    or issued["redirect_uri"] != form.get("redirect_uri")
                ):
                    return Response(400, orjson.dumps({"error": "invalid_grant"}))
                scopes = issued["scopes"]
            else:
                token = form.get("refresh_token", "")
                if self._refresh_tokens.get(token, 0) < self.now():
                    return Response(400, orjson.dumps({"error": "invalid_grant"}))
                self._refresh_tokens[token] = min(self._refresh_tokens[token], self.now() + 60)
                scopes = self._token_scopes.get(token)
            new_refresh, access = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            self._refresh_tokens[new_refresh] = self.now() + 90 * 86400
            self._access_tokens[access] = self.now() + 3600
            if scopes is not None:
                self._token_scopes[new_refresh] = self._token_scopes[access] = scopes
        return Response(
            200,
            orjson.dumps(
                {
                    "access_token": access,
                    "refresh_token": new_refresh,
                    "expires_in": 3600,
                    "token_type": "bearer",
                }
            ),
        )

    def _routes(self) -> list[tuple[str, re.Pattern[str], Callable[..., Response]]]:
        """List the API's routes as (method, path pattern, handler(request, body, *path groups))."""
        table: list[tuple[str, str, Callable[..., Response]]] = [
            ("GET", "/v2/membership", self._membership),
            ("GET", "/v2/subscription", self._subscription_plan),
            ("GET", "/v2/organization", self._organization),
            ("GET", "/[^/]+/attachments/([^/]+)", lambda _r, _b, id_: self._attachment(id_)),
            ("GET", "/v2/transactions", lambda request, _b: self._transactions_page(request)),
            ("GET", "/[^/]+/transactions/([^/]+)/attachments", self._transaction_attachments),
            ("GET", "/v2/supplier_invoices", self._supplier_invoices_page),
            ("GET", "/v2/client_invoices", self._client_invoices_page),
            ("GET", "/[^/]+/client_invoices/([^/]+)", self._client_invoice),
            ("POST", "/v2/webhook_subscriptions", lambda _r, body: self._subscribe(body)),
            ("GET", "/v2/webhook_subscriptions", self._subscriptions_list),
            ("GET", "/[^/]+/webhook_subscriptions/([^/]+)", self._subscription_get),
            ("DELETE", "/[^/]+/webhook_subscriptions/([^/]+)", self._subscription_delete),
        ]
        return [(method, re.compile(pattern), handler) for method, pattern, handler in table]

    def _route(self, request: Request, body: bytes) -> Response:
        path, method = request.path.rstrip("/"), request.method
        for route_method, pattern, handler in self._route_table:
            match = pattern.fullmatch(path)
            if match is not None and route_method == method:
                return handler(request, body, *match.groups())
        return json_error(404, "not_found", f"no route {method} {path}")

    def _membership(self, _request: Request, _body: bytes) -> Response:
        return self._json(
            {
                "membership": {
                    "id": self.membership_id,
                    "first_name": "Claire",
                    "last_name": "Martin",
                    "role": self.membership_role,
                    "status": "active",
                    "organization_id": self.organization_id,
                }
            }
        )

    def _subscription_plan(self, request: Request, _body: bytes) -> Response:
        if not self._scoped(request.headers.get("authorization", ""), "subscription.read"):
            return json_error(403, "forbidden", "the token lacks the scope subscription.read")
        return self._json({"plan": copy.deepcopy(self.plan)})

    def _organization(self, _request: Request, _body: bytes) -> Response:
        return self._json(
            {
                "organization": {
                    "id": self.organization_id,
                    "slug": "atelier-demo",
                    "legal_name": self.legal_name,
                    "bank_accounts": [
                        {
                            "id": self.bank_account_id,
                            "slug": "atelier-demo-main",
                            "iban": "FR7616958000019876543210987",
                            "currency": "EUR",
                        }
                    ],
                }
            }
        )

    def _transaction_attachments(
        self, _request: Request, _body: bytes, transaction_id: str
    ) -> Response:
        with self._lock:
            tx = self._transactions.get(transaction_id)
            if tx is None:
                return json_error(404, "not_found", "transaction not found")
            found = [
                self._attachment_json(a) for a in tx["attachment_ids"] if a in self._attachments
            ]
        return self._json({"attachments": found})

    def _supplier_invoices_page(self, request: Request, _body: bytes) -> Response:
        return self._list(
            request,
            "supplier_invoices",
            self._supplier_invoices,
            "filter[updated_at_from]",
            "filter[updated_at_to]",
            None,
        )

    def _client_invoices_page(self, request: Request, _body: bytes) -> Response:
        return self._list(
            request,
            "client_invoices",
            self._client_invoices,
            "filter[updated_at_from]",
            "filter[updated_at_to]",
            "filter[status]",
        )

    def _client_invoice(self, _request: Request, _body: bytes, invoice_id: str) -> Response:
        with self._lock:
            invoice = self._client_invoices.get(invoice_id)
        if invoice is None:
            return json_error(404, "not_found", "client invoice not found")
        return self._json({"client_invoice": invoice})

    def _subscriptions_list(self, _request: Request, _body: bytes) -> Response:
        with self._lock:
            items = [
                {k: v for k, v in s.items() if k != "secret"} for s in self._subscriptions.values()
            ]
        return self._json({"subscriptions": items})

    def _subscription_get(self, _request: Request, _body: bytes, subscription_id: str) -> Response:
        with self._lock:
            subscription = self._subscriptions.get(subscription_id)
        if subscription is None:
            return json_error(404, "not_found", "subscription not found")
        return self._json(
            {"webhook_subscription": {k: v for k, v in subscription.items() if k != "secret"}}
        )

    def _subscription_delete(
        self, _request: Request, _body: bytes, subscription_id: str
    ) -> Response:
        with self._lock:
            removed = self._subscriptions.pop(subscription_id, None)
        if removed is None:
            return json_error(404, "not_found", "subscription not found")
        return Response(204)

    def _json(self, value: Any, status: int = 200) -> Response:
        return Response(status, orjson.dumps(value))

    def _attachment_json(self, attachment_id: str) -> dict[str, Any]:
        expires = int(self.now()) + URL_LIFETIME_S
        if self.faults.take_expired():
            expires = int(self.now()) - 1
        sig = hmac.new(
            self._signing_key, f"{attachment_id}:{expires}".encode(), hashlib.sha256
        ).hexdigest()
        return {
            **self._attachments[attachment_id],
            "url": f"{self.url}/storage/{attachment_id}?expires={expires}&sig={sig}",
        }

    def _attachment(self, attachment_id: str) -> Response:
        with self._lock:
            if attachment_id not in self._attachments:
                return json_error(404, "not_found", "attachment not found")
            return self._json({"attachment": self._attachment_json(attachment_id)})

    async def _storage(self, request: Request) -> Response:
        attachment_id = request.path.rsplit("/", 1)[-1]
        if "authorization" in request.headers:
            return Response(
                400,
                b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed"
                b"</Message></Error>",
                "application/xml",
            )
        expires, sig = request.arg("expires", "0") or "0", request.arg("sig", "") or ""
        expected = hmac.new(
            self._signing_key, f"{attachment_id}:{expires}".encode(), hashlib.sha256
        ).hexdigest()
        if (
            not hmac.compare_digest(sig, expected)
            or not expires.isdigit()
            or int(expires) < self.now()
        ):
            return Response(
                403,
                b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                "application/xml",
            )
        fault = self.faults.take("/storage/")
        if fault is not None:
            if fault.status is None:
                await asyncio.sleep(fault.seconds)
            else:
                return Response(
                    fault.status, b"<Error><Code>SlowDown</Code></Error>", "application/xml"
                )
        with self._lock:
            content = self._contents.get(attachment_id)
            content_type = self._attachments.get(attachment_id, {}).get("file_content_type", "")
        if content is None:
            return Response(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        if isinstance(content, files.Synthetic):
            return Response(200, content.chunks(), content_type, length=content.size)
        return Response(200, content, content_type)

    def _filtered(
        self,
        request: Request,
        items: dict[str, dict[str, Any]],
        from_key: str,
        to_key: str,
        status_key: str | None,
    ) -> list[dict[str, Any]] | Response:
        try:
            low, high = _parse(request.arg(from_key)), _parse(request.arg(to_key))
        except ValueError:
            return json_error(422, "invalid_parameter", f"{from_key}/{to_key}: not a date")
        statuses = None
        if status_key and request.arg(status_key):
            statuses = {s for v in request.query[status_key] for s in v.split(",")}
        with self._lock:
            found = [
                copy.deepcopy(i)
                for i in items.values()
                if (low is None or _parse(i["updated_at"]) >= low)  # type: ignore[operator]
                and (high is None or _parse(i["updated_at"]) <= high)  # type: ignore[operator]
                and (statuses is None or i.get("status") in statuses)
            ]
        return sorted(found, key=lambda i: i["updated_at"])

    def _page(self, request: Request, key: str, items: list[dict[str, Any]]) -> Response:
        """Answer one page of ``items``, computed afresh for every page.

        That is how offset pagination over a live table behaves: an item updated between two page
        requests moves, and the items after it shift. :meth:`after_page` runs a hook between two
        page requests to make that happen on purpose; :meth:`one_instant` gives many items the same
        ``updated_at``; ``list_totals = False`` leaves ``total_count`` and ``total_pages`` out of
        ``meta`` (only ``next_page`` is documented).
        """
        page_text, per_page_text = (
            request.arg("page", "1") or "1",
            request.arg("per_page", "100") or "100",
        )
        if not page_text.isdigit() or not per_page_text.isdigit():
            return json_error(422, "invalid_parameter", "page and per_page are numbers")
        page, per_page = int(page_text), int(per_page_text)
        if not 1 <= per_page <= 100 or page < 1:
            return json_error(422, "invalid_parameter", "per_page must be 1 to 100")
        total_pages = max(1, -(-len(items) // per_page))
        if page > total_pages:
            return json_error(422, "invalid_parameter", "page is past the last page")
        meta: dict[str, Any] = {
            "current_page": page,
            "next_page": page + 1 if page < total_pages else None,
            "prev_page": page - 1 if page > 1 else None,
            "total_pages": total_pages,
            "total_count": len(items),
            "per_page": per_page,
        }
        if not self.list_totals:
            del meta["total_pages"], meta["total_count"]
        response = self._json({key: items[(page - 1) * per_page : page * per_page], "meta": meta})
        with self._lock:
            hooks = [
                (hook, served) for path, hook, served in self._page_hooks if path == request.path
            ]
            for _, served in hooks:
                served[0] += 1
        for hook, served in hooks:
            hook(served[0])
        return response

    def _list(
        self,
        request: Request,
        key: str,
        items: dict[str, dict[str, Any]],
        from_key: str,
        to_key: str,
        status_key: str | None,
    ) -> Response:
        found = self._filtered(request, items, from_key, to_key, status_key)
        return found if isinstance(found, Response) else self._page(request, key, found)

    def _transactions_page(self, request: Request) -> Response:
        account, iban = request.arg("bank_account_id"), request.arg("iban")
        if not account and not iban:
            return json_error(422, "missing_parameter", "bank_account_id or iban is required")
        if account not in (None, self.bank_account_id):
            return self._page(request, "transactions", [])
        found = self._filtered(
            request, self._transactions, "updated_at_from", "updated_at_to", None
        )
        if isinstance(found, Response):
            return found
        if request.arg("with_attachments") == "true":
            found = [t for t in found if t["attachment_ids"]]
        return self._page(request, "transactions", found)

    def _subscribe(self, body: bytes) -> Response:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return json_error(400, "invalid_json", "body is not JSON")
        callback, types, secret = (
            payload.get("callback_url"),
            payload.get("types"),
            payload.get("secret"),
        )
        if (
            not isinstance(callback, str)
            or urllib.parse.urlsplit(callback).scheme not in self.callback_schemes
            or len(callback) > 512
        ):
            return json_error(
                422, "invalid_parameter", "callback_url: an HTTPS URL of at most 512 characters"
            )
        if not isinstance(types, list) or not types:
            return json_error(422, "invalid_parameter", "types: at least one")
        if secret is not None and not (isinstance(secret, str) and 32 <= len(secret) <= 128):
            return json_error(422, "invalid_parameter", "secret: 32 to 128 characters")
        subscription = {
            "id": str(uuid.uuid4()),
            "callback_url": callback,
            "types": types,
            "description": payload.get("description"),
            "secret": secret or secrets.token_hex(32),
            "created_at": self._stamp(),
        }
        with self._lock:
            self._subscriptions[subscription["id"]] = subscription
        return self._json({"webhook_subscription": subscription}, 201)
