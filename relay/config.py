"""The one Settings object, built once from ``RELAY_*`` variables and validated at start.

Nothing else reads ``os.environ``. Every bad variable is reported at once, in one message. Secrets are
held in :class:`Secret`, whose ``repr`` and ``str`` are masked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from relay import crypto, errors


@dataclasses.dataclass(frozen=True, slots=True)
class Secret:
    """A value that must never be printed. ``reveal()`` is the only way to read it."""

    _value: str = dataclasses.field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,15}")  # a scheme that is safe to name in an error


def _url(name: str, value: str, schemes: tuple[str, ...], bad: list[str]) -> str:
    """Check a URL, describing a problem without the value (a typo'd URL may hold a password)."""
    expected = " or ".join(f"{scheme}://" for scheme in schemes)
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        problem = (
            "the port must be a number from 1 to 65535"
            if "port" in str(exc).lower()
            else "not a valid URL (it cannot be parsed: check the brackets around an IPv6 host)"
        )
        bad.append(f"{name}: {problem}")
        return value
    if parts.scheme not in schemes:
        got = f"scheme {parts.scheme!r}" if _SCHEME.fullmatch(parts.scheme) else "no scheme"
        bad.append(f"{name}: expected a URL starting with {expected}, got {got}")
    elif not parts.netloc or not host:
        bad.append(
            f"{name}: the {parts.scheme} URL has no host (expected "
            f"{parts.scheme}://[user[:password]@]host[:port]/...; is '//' missing?)"
        )
    elif port == 0:
        bad.append(f"{name}: the port must be a number from 1 to 65535")
    return value


def _int(name: str, value: str, low: int, high: int, bad: list[str]) -> int:
    try:
        number = int(value)
    except ValueError:
        bad.append(f"{name}: expected a whole number, got {value!r}")
        return low
    if not low <= number <= high:
        bad.append(f"{name}: expected {low} to {high}, got {number}")
    return number


Parse = Callable[[str, str, list[str]], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Variable:
    """A ``RELAY_*`` setting with a default, naming its Settings field and how it is read."""

    name: str
    field: str
    default: str
    parse: Parse

    def value(self, raw: str, bad: list[str]) -> Any:
        """Read the setting from ``raw`` (the default when empty), adding problems to ``bad``."""
        return self.parse(self.name, raw.strip() or self.default, bad)


def _urls(*schemes: str, secret: bool = False) -> Parse:
    def parse(name: str, value: str, bad: list[str]) -> Any:
        checked = _url(name, value, schemes, bad)
        return Secret(checked) if secret else checked.rstrip("/")

    return parse


def _integer(low: int, high: int) -> Parse:
    return lambda name, value, bad: _int(name, value, low, high, bad)


def _clock(name: str, value: str, bad: list[str]) -> dt.time:
    match = _FLUSH_AT.match(value)
    if match is None:
        bad.append(f"{name}: expected HH:MM in UTC, got {value!r}")
        return dt.time(20, 0)
    return dt.time(int(match.group(1)), int(match.group(2)))


def _prefix(name: str, value: str, bad: list[str]) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", value):
        bad.append(f"{name}: expected letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _log_level(name: str, value: str, bad: list[str]) -> str:
    level = value.lower()
    if level not in _LOG_LEVELS:
        bad.append(f"{name}: expected one of {', '.join(_LOG_LEVELS)}, got {level!r}")
    return level


def _text(longest: int) -> Parse:
    def parse(name: str, value: str, bad: list[str]) -> str:
        if len(value) > longest:
            bad.append(f"{name}: at most {longest} characters")
        return value

    return parse


_FLUSH_AT = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_EMAIL_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_LOG_LEVELS = ("debug", "info", "warning", "error")

# Every setting that has a default, each default written here only (README's table is checked
# against it by tests/unit/test_config.py).
VARIABLES: Final[tuple[Variable, ...]] = (
    Variable(
        "RELAY_DATABASE_URL",
        "database_url",
        "postgresql://postgres@127.0.0.1:5432/relay",
        _urls("postgresql", "postgres", secret=True),
    ),
    Variable(
        "RELAY_AMQP_URL",
        "amqp_url",
        "amqp://guest:guest@127.0.0.1:5672/",
        _urls("amqp", "amqps", secret=True),
    ),
    Variable(
        "RELAY_QONTO_API_URL",
        "qonto_api_url",
        "https://thirdparty.qonto.com",
        _urls("http", "https"),
    ),
    Variable(
        "RELAY_QONTO_OAUTH_URL",
        "qonto_oauth_url",
        "https://oauth.qonto.com",
        _urls("http", "https"),
    ),
    Variable(
        "RELAY_CEGID_API_URL",
        "cegid_api_url",
        "https://api.cegid.com/loop-api-publiques",
        _urls("http", "https"),
    ),
    Variable("RELAY_PUBLIC_URL", "public_url", "http://127.0.0.1:8000", _urls("http", "https")),
    Variable("RELAY_FLUSH_AT", "flush_at", "20:00", _clock),
    Variable("RELAY_HOST", "host", "127.0.0.1", lambda _name, value, _bad: value),
    Variable("RELAY_PORT", "port", "8000", _integer(0, 65535)),
    Variable("RELAY_WORKERS", "workers", "2", _integer(1, 64)),
    Variable("RELAY_UPLOAD_CONCURRENCY", "upload_concurrency", "16", _integer(1, 1024)),
    Variable(
        "RELAY_UPLOAD_CONCURRENCY_PER_FIRM", "upload_concurrency_per_firm", "4", _integer(1, 1024)
    ),
    # Qonto allows 1,000 requests per 10 s per IP: keep headroom
    Variable(
        "RELAY_QONTO_REQUESTS_PER_10S", "qonto_requests_per_10s", "900", _integer(1, 1_000_000)
    ),
    Variable("RELAY_AMQP_PREFIX", "amqp_prefix", "relay", _prefix),
    Variable("RELAY_LOG_LEVEL", "log_level", "info", _log_level),
    # how long a role waits for PostgreSQL or RabbitMQ to answer again before it gives up (exit 1)
    Variable("RELAY_OUTAGE_LIMIT", "outage_limit_s", "300", _integer(1, 86_400)),
    # every role records its heartbeat this often; `relay status` calls a role stalled when its
    # heartbeat is three beats old, or when it holds work without finishing any for stall_after_s
    Variable("RELAY_HEARTBEAT_INTERVAL", "heartbeat_interval_s", "5", _integer(1, 300)),
    Variable("RELAY_STALL_AFTER", "stall_after_s", "60", _integer(1, 86_400)),
    # bounds of every `relay serve` worker's HTTP connections (relay.edge.guard) and of the webhook
    # bodies it holds at once
    Variable("RELAY_MAX_CONNECTIONS", "max_connections", "1000", _integer(1, 1_000_000)),
    Variable("RELAY_MAX_HEADER_BYTES", "max_header_bytes", "8192", _integer(1024, 1_048_576)),
    Variable("RELAY_HEADER_TIMEOUT", "header_timeout_s", "10", _integer(1, 3600)),
    Variable("RELAY_BODY_TIMEOUT", "body_timeout_s", "10", _integer(1, 3600)),
    Variable("RELAY_KEEPALIVE_TIMEOUT", "keepalive_timeout_s", "5", _integer(1, 3600)),
    Variable(
        "RELAY_BODY_BUFFER_BYTES", "body_buffer_bytes", "33554432", _integer(1_048_576, 2**40)
    ),
    # what the accountant types in Loop Hub when declaring the partner (the setup pages show it)
    Variable("RELAY_LOOP_APPLICATION_NAME", "loop_application_name", "Qonto", _text(100)),
)
DEFAULTS: Final[Mapping[str, str]] = {v.name: v.default for v in VARIABLES}


def _default(field: str) -> Any:
    """Read a field's default from its variable's default text like any other value."""
    (variable,) = (v for v in VARIABLES if v.field == field)
    bad: list[str] = []
    value = variable.value("", bad)
    if bad:
        raise errors.ConfigurationError("; ".join(bad))
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything the relay can be configured with.

    Tests build it directly.
    """

    secret_key: Secret
    database_url: Secret = _default("database_url")
    amqp_url: Secret = _default("amqp_url")
    qonto_api_url: str = _default("qonto_api_url")
    qonto_oauth_url: str = _default("qonto_oauth_url")
    qonto_client_id: str | None = None
    qonto_client_secret: Secret | None = None
    qonto_staging_token: Secret | None = None
    cegid_api_url: str = _default("cegid_api_url")
    cegid_subscription_key: Secret | None = None
    admin_token: Secret | None = None
    public_url: str = _default("public_url")
    flush_at: dt.time = _default("flush_at")
    host: str = _default("host")
    port: int = _default("port")
    workers: int = _default("workers")
    upload_concurrency: int = _default("upload_concurrency")
    upload_concurrency_per_firm: int = _default("upload_concurrency_per_firm")
    qonto_requests_per_10s: int = _default("qonto_requests_per_10s")
    amqp_prefix: str = _default("amqp_prefix")
    log_level: str = _default("log_level")
    outage_limit_s: int = _default("outage_limit_s")
    heartbeat_interval_s: int = _default("heartbeat_interval_s")
    stall_after_s: int = _default("stall_after_s")
    max_connections: int = _default("max_connections")
    max_header_bytes: int = _default("max_header_bytes")
    header_timeout_s: int = _default("header_timeout_s")
    body_timeout_s: int = _default("body_timeout_s")
    keepalive_timeout_s: int = _default("keepalive_timeout_s")
    body_buffer_bytes: int = _default("body_buffer_bytes")
    loop_application_name: str = _default("loop_application_name")
    loop_provider_email_local_part: str | None = None

    @property
    def events_queue(self) -> str:
        return f"{self.amqp_prefix}.events"

    @property
    def retry_queue(self) -> str:
        return f"{self.amqp_prefix}.events.retry"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.amqp_prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.amqp_prefix}.events.dlq"

    def webhook_path(self, connection_id: str) -> str:
        return f"/webhooks/qonto/{connection_id}"

    def webhook_url(self, connection_id: str) -> str:
        return self.public_url.rstrip("/") + self.webhook_path(connection_id)

    @property
    def https(self) -> bool:
        """Whether the relay is reached over HTTPS (its cookies are then ``Secure``)."""
        return self.public_url.lower().startswith("https://")

    def provider_email(self, domain: str) -> str | None:
        """Return Loop Hub's "Email prestataire" for a firm's domain (None without a local part)."""
        if not self.loop_provider_email_local_part:
            return None
        return f"{self.loop_provider_email_local_part}@{domain}.onmicrosoft.com"


def from_env(
    environ: Mapping[str, str] | None = None,
    *,
    require_secret_key: bool = True,
    require_admin_token: bool = False,
    require_cegid_subscription_key: bool = False,
) -> Settings:
    """Build Settings from the environment, raising ConfigurationError naming every bad variable."""
    env = dict(os.environ if environ is None else environ)
    bad: list[str] = []
    key = _secret_key(env, bad, required=require_secret_key)
    values = {v.field: v.value(env.get(v.name, ""), bad) for v in VARIABLES}
    client_id, client_secret = _oauth_app(env, bad)
    admin_token = _admin_token(env, bad, required=require_admin_token)
    subscription_key = _subscription_key(env, bad, required=require_cegid_subscription_key)
    local_part = _provider_local_part(env, bad)
    if bad:
        raise errors.ConfigurationError(
            "invalid configuration:\n" + "\n".join(f"  - {line}" for line in bad)
        )
    return Settings(
        secret_key=Secret(key),
        qonto_client_id=client_id,
        qonto_client_secret=client_secret,
        qonto_staging_token=_optional_secret(env, "RELAY_QONTO_STAGING_TOKEN"),
        cegid_subscription_key=subscription_key,
        admin_token=admin_token,
        loop_provider_email_local_part=local_part,
        **values,
    )


def _optional_secret(env: Mapping[str, str], name: str) -> Secret | None:
    value = env.get(name, "").strip()
    return Secret(value) if value else None


def _secret_key(env: Mapping[str, str], bad: list[str], *, required: bool) -> str:
    key = env.get("RELAY_SECRET_KEY", "").strip()
    if not key:
        if required:
            bad.append("RELAY_SECRET_KEY: required (generate one with `relay keygen`)")
        return crypto.generate_key()
    if bad_keys := crypto.invalid_keys(key):
        which = (
            ""
            if bad_keys == [0] or len(crypto.split_keys(key)) == 1
            else f" (key {', '.join(map(str, bad_keys))} of the comma-separated list)"
        )
        bad.append(
            f"RELAY_SECRET_KEY: expected 32 bytes in URL-safe base64{which} (a Fernet key; "
            "`relay keygen` prints one; several keys are separated by commas)"
        )
    return key


def _oauth_app(env: Mapping[str, str], bad: list[str]) -> tuple[str | None, Secret | None]:
    client_id = env.get("RELAY_QONTO_CLIENT_ID", "").strip() or None
    client_secret = _optional_secret(env, "RELAY_QONTO_CLIENT_SECRET")
    if bool(client_id) != bool(client_secret):
        bad.append(
            "RELAY_QONTO_CLIENT_ID and RELAY_QONTO_CLIENT_SECRET: set both or neither "
            "(they are the OAuth app's credentials)"
        )
    return client_id, client_secret


def _admin_token(env: Mapping[str, str], bad: list[str], *, required: bool) -> Secret | None:
    admin_token = _optional_secret(env, "RELAY_ADMIN_TOKEN")
    if required and admin_token is None:
        bad.append("RELAY_ADMIN_TOKEN: required for the admin API")
    elif admin_token is not None and len(admin_token.reveal()) < 16:
        bad.append("RELAY_ADMIN_TOKEN: must be at least 16 characters")
    return admin_token


def _subscription_key(env: Mapping[str, str], bad: list[str], *, required: bool) -> Secret | None:
    key = _optional_secret(env, "RELAY_CEGID_SUBSCRIPTION_KEY")
    if required and key is None:
        bad.append(
            "RELAY_CEGID_SUBSCRIPTION_KEY: required to call Cegid Loop (the partner's "
            "Ocp-Apim-Subscription-Key, issued by Cegid; without it Loop answers 401 to every call)"
        )
    return key


def _provider_local_part(env: Mapping[str, str], bad: list[str]) -> str | None:
    local_part = env.get("RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART", "").strip() or None
    if local_part is not None and (
        not _EMAIL_LOCAL_PART.fullmatch(local_part) or "@" in local_part
    ):
        bad.append(
            "RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART: expected the part of an email address before "
            f"the @ (letters, digits, '.', '_', '-', '+'), got {local_part!r}"
        )
    return local_part


def debug_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether RELAY_LOG_LEVEL asks for debug output (tracebacks), read without validating the rest."""
    env = os.environ if environ is None else environ
    return env.get("RELAY_LOG_LEVEL", "").strip().lower() == "debug"
