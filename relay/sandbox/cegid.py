"""Cegid Loop's public API as Cegid's public documentation describes it, on a loopback socket.

:class:`CegidSandbox` holds firms, their keys and dossiers, and what was deposited;
:class:`CegidFaults` injects faults, the ambiguous "stored then connection dropped" among them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import hashlib
import random
import threading
import uuid
from typing import Any

import orjson

from relay.sandbox.http import Drop, Request, Response, ServerThread

MAX_BYTES = 50 * 1024 * 1024
TYPES = ("application/pdf", "image/jpeg", "image/png")
FAULTS = ("429", "500", "503", "slow", "store_then_drop", "drop_before_store")


@dataclasses.dataclass(frozen=True)
class StoredDocument:
    dossier: str
    filename: str
    transaction: str
    content_type: str
    sha256: str
    size: int
    document_id: str
    received_at: dt.datetime


@dataclasses.dataclass
class Firm:
    api_key: str
    api_secret: str
    dossiers: set[str]
    domain: str


class CegidFaults:
    """One fault per storeDocument request from a queue, or at random with a seeded generator.

    Faults are 429, 5xx, 4xx, slow answers, "stored then connection dropped" (the ambiguous case)
    and "dropped before storing".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[str] = collections.deque()
        self._random: random.Random | None = None
        self._rate = 0.0
        self._kinds: tuple[str, ...] = FAULTS
        self.retry_after = "0.05"
        self.injected: collections.Counter[str] = collections.Counter()

    def push(self, *faults: str) -> None:
        with self._lock:
            self._queue.extend(faults)

    def random_plan(self, seed: int, rate: float, kinds: tuple[str, ...] = FAULTS) -> None:
        with self._lock:
            self._random, self._rate, self._kinds = random.Random(seed), rate, kinds

    @property
    def ambiguous(self) -> int:
        return self.injected["store_then_drop"] + self.injected["drop_before_store"]

    def take(self) -> str | None:
        with self._lock:
            fault = self._queue.popleft() if self._queue else None
            if fault is None and self._random is not None and self._random.random() < self._rate:
                fault = self._random.choice(self._kinds)
                if fault == "slow":
                    fault = f"slow:{self._random.uniform(0.05, 0.4):.2f}"
            if fault is not None:
                self.injected[fault.split(":")[0]] += 1
            return fault


class CegidSandbox:
    """Cegid Loop for the firms declared with :meth:`add_firm`.

    Point the relay at ``url``.

    Two static headers (``Ocp-Apim-Subscription-Key`` and ``x-apikey: key:secret``), ``POST
    /storeDocument`` with the raw bytes (hashed as they stream, never held), ``GET /journal``
    scoped to a dossier, and the contract's trap: a deposit into a dossier that does not exist
    still succeeds and goes nowhere. A read of a dossier answers 401 for a wrong key, 403 "the
    collaborator ... has no access to the folder ..." for a dossier that exists in Loop but is not
    associated with the key, and 200 without data for a code Loop does not know (Loop's answers
    are undocumented: this is the sandbox's model).
    """

    def __init__(self, *, subscription_key: str = "sandbox-subscription-key") -> None:
        self.subscription_key = subscription_key
        self.faults = CegidFaults()
        self.latency_s = 0.0
        self.stored: list[StoredDocument] = []
        self.lost: list[StoredDocument] = []  # deposited into a dossier that does not exist
        self.in_flight = 0  # deposits being received or answered now
        self.peak_in_flight = 0  # the most at once since start: the client's concurrency cap
        self._firms: dict[str, Firm] = {}
        self._existing: set[str] = set()  # every dossier Loop knows, associated with a key or not
        self._lock = threading.Lock()
        self._server = ServerThread(self._handle, name="cegid-sandbox")

    def __enter__(self) -> CegidSandbox:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        return self._server.url

    def add_firm(
        self, api_key: str, api_secret: str, dossiers: list[str], domain: str = "SANDBOX"
    ) -> None:
        """Declare (or redeclare) a firm's key and the dossiers associated with it.

        A dossier dissociated later still exists.
        """
        with self._lock:
            self._firms[api_key] = Firm(api_key, api_secret, set(dossiers), domain)
            self._existing.update(dossiers)

    def add_dossier(self, dossier: str) -> None:
        """Add a dossier that exists in Loop without being associated with any key."""
        with self._lock:
            self._existing.add(dossier)

    def stored_by_dossier(self, dossier: str) -> list[StoredDocument]:
        with self._lock:
            return [s for s in self.stored if s.dossier == dossier]

    def duplicates(self) -> list[str]:
        """List the content stored more than once in one dossier, which must never happen."""
        with self._lock:
            counts = collections.Counter((s.dossier, s.sha256) for s in self.stored)
        return [sha for (_, sha), n in counts.items() if n > 1]

    def _all_dossiers(self) -> set[str]:
        return {d for firm in self._firms.values() for d in firm.dossiers}

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response(
            status, orjson.dumps({"statusCode": status, "message": message}), headers=headers or {}
        )

    def _firm(self, request: Request) -> Firm | Response:
        if request.headers.get("ocp-apim-subscription-key") != self.subscription_key:
            return self._error(
                401,
                "Access denied due to invalid subscription key. Make sure to provide a "
                "valid key for an active subscription.",
            )
        key, _, secret = request.headers.get("x-apikey", "").partition(":")
        with self._lock:
            firm = self._firms.get(key)
        if firm is None or firm.api_secret != secret:
            return self._error(401, "Invalid API key")
        return firm

    async def _handle(self, request: Request) -> Response:
        firm = self._firm(request)
        if isinstance(firm, Response):
            return firm
        if request.method == "GET" and request.path.rstrip("/").lower() == "/journal":
            dossier = request.arg("codeDossier", "") or ""
            with self._lock:
                exists = dossier in self._existing
            if not exists:
                return Response(200, orjson.dumps({"data": []}))
            if dossier not in firm.dossiers:
                return self._error(
                    403, f"the collaborator {firm.api_key} has no access to the folder {dossier}"
                )
            return Response(200, orjson.dumps({"data": [{"code": "ACH", "libelle": "Achats"}]}))
        if request.method == "POST" and request.path.rstrip("/") == "/storeDocument":
            return await self._store(request, firm)
        return self._error(404, f"Resource not found: {request.method} {request.path}")

    async def _store(self, request: Request, firm: Firm) -> Response:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._store_counted(request, firm)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _delay(self, fault: str | None) -> None:
        """Apply a dropped connection or a slow answer the faults asked for, then the latency."""
        if fault == "drop_before_store":
            raise Drop
        if fault and fault.startswith("slow:"):
            await asyncio.sleep(float(fault.split(":")[1]))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

    def _refusal(
        self,
        firm: Firm,
        dossier: str,
        filename: str,
        transaction: str,
        content_type: str,
        size: int,
    ) -> Response | None:
        """Return Loop's answer to a deposit it refuses, or None when it stores it."""
        if content_type not in TYPES:
            return self._error(415, f"Unsupported media type {content_type!r}")
        if size > MAX_BYTES:
            return self._error(413, "File too large (50 MB at most)")
        if not dossier or not filename or transaction not in ("PURCHASE", "SALE") or size == 0:
            return self._error(
                400, "context, filename, transaction (PURCHASE or SALE) and a body are required"
            )
        with self._lock:
            known = self._all_dossiers()
        if dossier in known and dossier not in firm.dossiers:
            return self._error(
                403, f"the collaborator {firm.api_key} has no access to the folder {dossier}"
            )
        return None

    async def _store_counted(self, request: Request, firm: Firm) -> Response:
        fault = self.faults.take()
        if fault is not None and fault.isdigit():  # an HTTP status: 429, 5xx or a 4xx refusal
            await request.body()
            headers = {"Retry-After": self.faults.retry_after} if fault == "429" else {}
            return self._error(int(fault), f"injected fault {fault}", headers)
        dossier = request.arg("context", "") or ""
        filename = request.arg("filename", "") or ""
        transaction = request.arg("transaction", "") or ""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        await self._delay(fault)
        refusal = self._refusal(firm, dossier, filename, transaction, content_type, size)
        if refusal is not None:
            return refusal
        with self._lock:
            known = self._all_dossiers()
        document = StoredDocument(
            dossier=dossier,
            filename=filename,
            transaction=transaction,
            content_type=content_type,
            sha256=digest.hexdigest(),
            size=size,
            document_id=str(uuid.uuid4()),
            received_at=dt.datetime.now(dt.UTC),
        )
        with self._lock:
            (self.stored if dossier in known else self.lost).append(document)
        if fault == "store_then_drop":
            raise Drop
        answer: dict[str, Any] = {
            "id": document.document_id,
            "fileName": filename,
            "context": dossier,
            "transaction": transaction,
            "collectionStage": "PIA",
            "size": size,
        }
        return Response(200, orjson.dumps(answer))
