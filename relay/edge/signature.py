"""Verification of Qonto's webhook signature, the ``X-Qonto-Signature`` header.

The header reads ``t={unix},v1={hex}[,v1=...]``. ``v1`` is the lower-case hex HMAC-SHA256, keyed
with the subscription secret's UTF-8 bytes, of ``"{t}."`` followed by the raw body exactly as
received. Any ``v1`` may match any currently valid secret (rotation). Timestamps more than five
minutes away from now are refused either way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

TOLERANCE_S: Final = 300


class Rejected(Exception):
    """A request not provably from Qonto, with a ``reason`` safe to return to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse(header: str) -> tuple[int, list[str]]:
    """Parse the header into ``(timestamp, [v1 signatures])``, raising Rejected when malformed."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise Rejected("malformed signature")
        if key == "t":
            if not (value.isascii() and value.isdigit()) or len(value) > 12:
                raise Rejected("malformed signature")
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value.strip().lower())
    if timestamp is None or not signatures:
        raise Rejected("malformed signature")
    return timestamp, signatures


def compute(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(
        secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256
    ).hexdigest()


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: int = TOLERANCE_S,
) -> None:
    """Return if the signature is valid for one of ``secrets``, else raise Rejected saying why."""
    if not header:
        raise Rejected("missing signature")
    timestamp, signatures = parse(header)
    if abs(now - timestamp) > tolerance_s:
        raise Rejected("stale timestamp")
    for secret in secrets:
        expected = compute(secret, timestamp, body).encode("ascii")
        for candidate in signatures:
            if hmac.compare_digest(expected, candidate.encode("ascii", "replace")):
                return
    raise Rejected("bad signature")
