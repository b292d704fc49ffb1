"""Forms posted by the pages, URL-encoded, small, and carrying the session's CSRF token."""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qs

from starlette.requests import Request

MAX_BYTES: Final = 16 * 1024
CSRF_FIELD: Final = "csrf_token"


class Invalid(Exception):
    """The body is not a small URL-encoded form."""


async def read(request: Request) -> dict[str, str]:
    """Read the form's fields (the first value of each) from a body of at most :data:`MAX_BYTES`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise Invalid("expected a URL-encoded form")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BYTES:
            raise Invalid("form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid("not a URL-encoded form") from exc
    return {key: values[0] for key, values in fields.items() if values}
