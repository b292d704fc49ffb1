"""Encryption of stored credentials and webhook secrets with ``RELAY_SECRET_KEY`` (Fernet)."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken

from relay import errors


def generate_key() -> str:
    """A new key for ``RELAY_SECRET_KEY``: 32 random bytes, URL-safe base64."""
    return Fernet.generate_key().decode("ascii")


def is_valid_key(key: str) -> bool:
    try:
        Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    return True


class Box:
    """Seals and opens small secrets. Holds the key; its ``repr`` never shows it."""

    __slots__ = ("_fernet",)

    def __init__(self, key: str) -> None:
        self._fernet = Fernet(key.encode("ascii"))

    def __repr__(self) -> str:
        return "Box(key=***)"

    def seal(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def open(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode("utf-8")
        except InvalidToken as exc:
            raise errors.ConfigurationError(
                "a stored secret cannot be decrypted with RELAY_SECRET_KEY (was the key changed?)"
            ) from exc


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def fingerprint(value: str) -> str:
    """A short, non-reversible label for a secret (for display and grouping, never for auth)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
