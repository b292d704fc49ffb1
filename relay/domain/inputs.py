"""A new connection as an operator gives it, and the checks of its values before anything else.

The command line's flags and the admin API's JSON fields become a :class:`NewConnection` (with
:func:`qonto_credentials` for the Qonto authentication), and :func:`validate` checks it before the
configuration is read or any upstream is contacted: what is wrong is an :class:`InvalidInput`, named
as the caller knows it (a ``Label``: ``--flag-name`` by default, a JSON key for the admin API).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence

from relay import config, errors
from relay.domain import credentials

# How a field is named to the user: a flag for the command line, a JSON key for the admin API.
Label = Callable[[str], str]


def flag_name(field: str) -> str:
    """Name a field as the command line does (``webhook_secret`` -> ``--webhook-secret``)."""
    return "--" + field.replace("_", "-")


class InvalidInput(errors.Refused):
    """The values given are wrong by themselves (bad flags or fields).

    A usage error, caught before anything is contacted (exit 2 on the command line, 400 from the
    admin API).
    """


@dataclasses.dataclass(frozen=True, slots=True)
class NewConnection:
    client_name: str
    qonto_organization_id: str
    qonto: credentials.QontoCredentials
    cegid: credentials.CegidCredentials
    cegid_dossier: str
    cegid_domain: str
    webhook_secrets: Sequence[str] = ()
    subscribe: bool = False
    since: dt.datetime | None = None


def qonto_credentials(
    api_key: object, refresh_token: object, *, label: Label = flag_name
) -> credentials.QontoCredentials:
    """Read the Qonto authentication, one of an API key ``LOGIN:SECRET`` or a refresh token."""
    if bool(api_key) == bool(refresh_token):
        raise InvalidInput(
            f"give exactly one of {label('qonto_api_key')} LOGIN:SECRET or "
            f"{label('qonto_refresh_token')}"
        )
    if api_key:
        login, sep, secret = api_key.partition(":") if isinstance(api_key, str) else ("", "", "")
        if not sep or not login.strip() or not secret.strip():
            raise InvalidInput(f"{label('qonto_api_key')} must be LOGIN:SECRET")
        return credentials.QontoApiKey(login=login, secret=config.Secret(secret))
    if not isinstance(refresh_token, str) or not refresh_token.strip():
        raise InvalidInput(f"{label('qonto_refresh_token')} must be a non-empty string")
    return credentials.QontoOAuth(refresh_token=config.Secret(refresh_token))


def validate(new: NewConnection, *, label: Label = flag_name) -> None:
    """Check a new connection's own values before anything is contacted, raising InvalidInput."""
    for field, value in (
        ("client_name", new.client_name),
        ("qonto_organization_id", new.qonto_organization_id),
        ("cegid_dossier", new.cegid_dossier),
        ("cegid_domain", new.cegid_domain),
        ("cegid_api_key", new.cegid.api_key.reveal()),
        ("cegid_api_secret", new.cegid.api_secret.reveal()),
    ):
        if not value.strip():
            raise InvalidInput(f"{label(field)} must not be empty")
    if not new.webhook_secrets and not new.subscribe:
        raise InvalidInput(
            f"give at least one {label('webhook_secret')}, or {label('subscribe')} so the relay "
            "registers the webhooks itself"
        )
    for secret in new.webhook_secrets:
        if not 16 <= len(secret) <= 256:
            raise InvalidInput(
                f"a webhook secret ({label('webhook_secret')}) must be 16 to 256 characters long"
            )
