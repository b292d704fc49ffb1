"""Signing webhooks the way Qonto does (what the sandboxes, tests and demo send)."""

from __future__ import annotations

import hashlib
import hmac
import time


def sign(body: bytes, secret: str, t: int | None = None) -> str:
    """Return the ``X-Qonto-Signature`` value of ``body``, ``t={unix},v1={hex}``.

    ``v1`` is the HMAC-SHA256 of ``"{t}." + body``.
    """
    stamp = int(time.time()) if t is None else t
    digest = hmac.new(secret.encode("utf-8"), f"{stamp}.".encode() + body, hashlib.sha256)
    return f"t={stamp},v1={digest.hexdigest()}"
