"""Server-side browser sessions in PostgreSQL, and the CSRF token of each.

A session expires after :data:`IDLE` without use and :data:`ABSOLUTE` after it began, unless its
caller passes limits of its own (the console: a day without use).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from typing import Any, Final

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from relay import config, crypto, store

COOKIE: Final = "relay_session"
IDLE: Final = dt.timedelta(hours=8)
ABSOLUTE: Final = dt.timedelta(hours=24)


class Session:
    """One browser's session, with its id (never shown), its data and its CSRF token.

    The cookie holds only the random id (256 bits); the database holds its SHA-256 and the
    session's data (small JSON). The cookie is HttpOnly, SameSite=Lax, and Secure when the relay is
    reached over https.

    The CSRF token of a session is an HMAC of its id: a page can render it, a form must send it
    back, and another site, which cannot read the cookie, cannot forge it.
    """

    __slots__ = ("_id", "created_at", "data", "is_new")

    def __init__(
        self, session_id: str, data: dict[str, Any], created_at: dt.datetime, *, is_new: bool
    ) -> None:
        self._id = session_id
        self.data = data
        self.created_at = created_at
        self.is_new = is_new

    def __repr__(self) -> str:
        return "Session(***)"

    @property
    def id_hash(self) -> bytes:
        return crypto.token_digest(self._id)

    @property
    def csrf_token(self) -> str:
        digest = hmac.new(self._id.encode("ascii"), b"relay-csrf", hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and crypto.constant_time_equal(str(token), self.csrf_token)

    @property
    def cookie_value(self) -> str:
        return self._id


async def current(
    pool: asyncpg.Pool,
    request: Request,
    *,
    idle: dt.timedelta = IDLE,
    absolute: dt.timedelta = ABSOLUTE,
) -> Session | None:
    """Find the request's live session (its expiry pushed back by ``idle``), or None."""
    session_id = request.cookies.get(COOKIE, "")
    if not session_id or len(session_id) > 100 or not session_id.isascii():
        return None
    now = dt.datetime.now(dt.UTC)
    stored = await store.web_sessions.touch(
        pool, crypto.token_digest(session_id), now + idle, now - absolute
    )
    if stored is None:
        return None
    return Session(session_id, stored.data, stored.created_at, is_new=False)


async def start(
    pool: asyncpg.Pool, request: Request, *, fresh: bool = False, idle: dt.timedelta = IDLE
) -> Session:
    """Find the request's live session, or start one (stored now, its cookie set by ``attach``).

    ``fresh``: always a new one (a sign-in never keeps the id a browser had before).
    """
    found = None if fresh else await current(pool, request, idle=idle)
    if found is not None:
        return found
    session_id = secrets.token_urlsafe(32)
    now = dt.datetime.now(dt.UTC)
    await store.web_sessions.delete_expired(pool)
    await store.web_sessions.insert(pool, crypto.token_digest(session_id), {}, now + idle)
    return Session(session_id, {}, now, is_new=True)


async def save(pool: asyncpg.Pool, session: Session) -> None:
    """Store the session's data."""
    await store.web_sessions.set_data(pool, session.id_hash, session.data)


async def end(pool: asyncpg.Pool, session: Session) -> None:
    await store.web_sessions.delete(pool, session.id_hash)


def attach(
    response: Response,
    session: Session,
    settings: config.Settings,
    *,
    absolute: dt.timedelta = ABSOLUTE,
) -> Response:
    """Set the session's cookie on ``response`` (HttpOnly, SameSite=Lax, Secure under https)."""
    response.set_cookie(
        COOKIE,
        session.cookie_value,
        max_age=int(absolute.total_seconds()),
        path="/",
        secure=settings.https,
        httponly=True,
        samesite="lax",
    )
    return response
