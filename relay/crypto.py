"""Encryption of stored secrets with ``RELAY_SECRET_KEY`` (Fernet), and digests of bearer tokens.

``RELAY_SECRET_KEY`` may list several keys separated by commas (key rotation): the first seals,
every one opens (``cryptography``'s MultiFernet); :meth:`Box.reseal` moves a sealed value under the
first.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from relay import errors


def generate_key() -> str:
    """Generate a key for ``RELAY_SECRET_KEY``, 32 random bytes in URL-safe base64."""
    return Fernet.generate_key().decode("ascii")


def split_keys(value: str) -> list[str]:
    """Split a comma-separated ``RELAY_SECRET_KEY`` into its keys, in order, blanks ignored."""
    return [part.strip() for part in value.split(",") if part.strip()]


def is_valid_key(key: str) -> bool:
    """Tell whether ``key`` is one Fernet key, 32 bytes in URL-safe base64."""
    try:
        Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def invalid_keys(value: str) -> list[int]:
    """Find the 1-based positions of the keys in ``value`` that are not Fernet keys.

    ``[0]`` when ``value`` holds no key at all.
    """
    keys = split_keys(value)
    if not keys:
        return [0]
    return [position for position, key in enumerate(keys, 1) if not is_valid_key(key)]


class Box:
    """The keys that seal and open small secrets (its ``repr`` never shows them)."""

    __slots__ = ("_fernet", "_first")

    def __init__(self, keys: str) -> None:
        fernets = [Fernet(key.encode("ascii")) for key in split_keys(keys)]
        if not fernets:
            raise ValueError("no key given")
        self._first = fernets[0]
        self._fernet = MultiFernet(fernets)

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

    def sealed_by_first(self, token: bytes) -> bool:
        """Tell whether the first key opens this value (nothing to re-seal)."""
        try:
            self._first.decrypt(bytes(token))
        except InvalidToken:
            return False
        return True

    def reseal(self, token: bytes) -> bytes:
        """Seal the same secret under the first key (opened with whichever key sealed it)."""
        try:
            return self._fernet.rotate(bytes(token))
        except InvalidToken as exc:
            raise errors.ConfigurationError(
                "a stored secret cannot be decrypted with any key of RELAY_SECRET_KEY"
            ) from exc


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def fingerprint(value: str) -> str:
    """Label a secret shortly and irreversibly (for display and grouping, never for auth)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]


def token_digest(token: str) -> bytes:
    """Digest a random bearer token (setup link, session id, OAuth state) to the SHA-256 stored.

    These tokens carry 256 random bits, so a plain hash cannot be reversed by guessing; the database
    never holds one in clear.
    """
    return hashlib.sha256(token.encode("utf-8")).digest()
