"""A connection's secrets, typed, masked in ``repr``, sealed at rest with ``RELAY_SECRET_KEY``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import asyncpg
import orjson

from relay import config, crypto, errors, store

Secret = config.Secret


@dataclasses.dataclass(frozen=True, slots=True)
class QontoApiKey:
    """One organization's API key, sent in the ``Authorization`` header as ``{login}:{secret}``."""

    login: str
    secret: Secret

    kind = "api_key"

    def header(self) -> str:
        return f"{self.login}:{self.secret.reveal()}"


@dataclasses.dataclass(frozen=True, slots=True)
class QontoOAuth:
    """OAuth tokens whose refresh token rotates on every refresh and must be stored at once."""

    refresh_token: Secret
    access_token: Secret | None = None
    expires_at: dt.datetime | None = None

    kind = "oauth"


QontoCredentials = QontoApiKey | QontoOAuth


@dataclasses.dataclass(frozen=True, slots=True)
class CegidCredentials:
    """The firm's Loop API key and secret, sent in the ``x-apikey`` header as ``{key}:{secret}``."""

    api_key: Secret
    api_secret: Secret

    def header(self) -> str:
        return f"{self.api_key.reveal()}:{self.api_secret.reveal()}"


def seal_qonto(box: crypto.Box, creds: QontoCredentials) -> bytes:
    payload: dict[str, Any]
    if isinstance(creds, QontoApiKey):
        payload = {"login": creds.login, "secret": creds.secret.reveal()}
    else:
        payload = {
            "refresh_token": creds.refresh_token.reveal(),
            "access_token": creds.access_token.reveal() if creds.access_token else None,
            "expires_at": creds.expires_at.isoformat() if creds.expires_at else None,
        }
    return box.seal(orjson.dumps(payload).decode("utf-8"))


def open_qonto(box: crypto.Box, kind: str, sealed: bytes) -> QontoCredentials:
    payload = orjson.loads(box.open(sealed))
    if kind == "api_key":
        return QontoApiKey(login=payload["login"], secret=Secret(payload["secret"]))
    expires = payload.get("expires_at")
    access = payload.get("access_token")
    return QontoOAuth(
        refresh_token=Secret(payload["refresh_token"]),
        access_token=Secret(access) if access else None,
        expires_at=dt.datetime.fromisoformat(expires) if expires else None,
    )


def seal_cegid(box: crypto.Box, creds: CegidCredentials) -> bytes:
    payload = {"api_key": creds.api_key.reveal(), "api_secret": creds.api_secret.reveal()}
    return box.seal(orjson.dumps(payload).decode("utf-8"))


def open_cegid(box: crypto.Box, sealed: bytes) -> CegidCredentials:
    payload = orjson.loads(box.open(sealed))
    return CegidCredentials(
        api_key=Secret(payload["api_key"]), api_secret=Secret(payload["api_secret"])
    )


async def load(
    pool: asyncpg.Pool, box: crypto.Box, connection_id: uuid.UUID
) -> tuple[QontoCredentials, CegidCredentials]:
    """Open one connection's sealed credentials (raises NotFound for an unknown id)."""
    sealed = await store.connections.sealed_credentials(pool, connection_id)
    if sealed is None:
        raise errors.NotFound(f"no connection {connection_id}")
    return (
        open_qonto(box, sealed.qonto_auth_kind, sealed.qonto_credentials),
        open_cegid(box, sealed.cegid_credentials),
    )


async def store_qonto(
    pool: asyncpg.Pool, box: crypto.Box, connection_id: uuid.UUID, creds: QontoCredentials
) -> None:
    """Persist rotated OAuth tokens (the old refresh token stays valid only 60 s)."""
    await store.connections.set_qonto_credentials(pool, connection_id, seal_qonto(box, creds))
