"""Security headers on every page, set by the :class:`Headers` middleware.

A Content-Security-Policy without inline script, no framing, no referrer (a setup link's URL is a
secret), no caching, no MIME sniffing; HSTS under https.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import config


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def headers(settings: config.Settings) -> list[tuple[bytes, bytes]]:
    """Build the headers added to every page's response.

    ``form-action`` names Qonto's OAuth origin too: the **Connect with Qonto** form posts here and
    is redirected there, and browsers check form redirects against it.
    """
    csp = "; ".join(
        [
            "default-src 'none'",
            "style-src 'self'",
            "img-src 'self'",
            f"form-action 'self' {origin(settings.qonto_oauth_url)}",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )
    values = {
        "content-security-policy": csp,
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
        "cross-origin-opener-policy": "same-origin",
        "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=()",
    }
    if settings.https:
        values["strict-transport-security"] = "max-age=31536000"
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in values.items()]


class Headers:
    """ASGI middleware setting the security headers on every response of the wrapped application."""

    def __init__(self, app: ASGIApp, settings: config.Settings) -> None:
        self.app = app
        self.headers = headers(settings)
        self.names = {name for name, _ in self.headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k not in self.names]
                message = {**message, "headers": [*kept, *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
