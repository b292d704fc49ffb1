"""The one Settings object, built once from ``RELAY_*`` variables and validated at start.

Nothing else reads ``os.environ``. Every bad variable is reported at once, in one message. Secrets are
held in :class:`Secret`, whose ``repr`` and ``str`` are masked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit, urlunsplit

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
_SENSITIVE_PARAM = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any password and sensitive query value replaced by ``***`` (for logs).

    A value that does not parse as a URL with a host is never returned as is: only its scheme (when
    it has one) survives, since a typo'd URL may still carry a password.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "***"
    if not parts.scheme or not parts.netloc or not host:
        return f"{parts.scheme}://***" if _SCHEME.fullmatch(parts.scheme) else "***"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    if port:
        host = f"{host}:{port}"
    if parts.password is not None:
        netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    else:
        netloc = f"{parts.username}@{host}" if parts.username else host
    query = "&".join(
        f"{key}=***" if _SENSITIVE_PARAM.search(key) else f"{key}={value}"
        for key, _, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


DEFAULTS: Final[Mapping[str, str]] = {
    "RELAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/relay",
    "RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
    "RELAY_QONTO_API_URL": "https://thirdparty.qonto.com",
    "RELAY_QONTO_OAUTH_URL": "https://oauth.qonto.com",
    "RELAY_CEGID_API_URL": "https://api.cegid.com/loop-api-publiques",
    "RELAY_PUBLIC_URL": "http://127.0.0.1:8000",
    "RELAY_FLUSH_AT": "20:00",
    "RELAY_HOST": "127.0.0.1",
    "RELAY_PORT": "8000",
    "RELAY_WORKERS": "2",
    "RELAY_UPLOAD_CONCURRENCY": "16",
    "RELAY_UPLOAD_CONCURRENCY_PER_FIRM": "4",
    "RELAY_QONTO_REQUESTS_PER_10S": "900",
    "RELAY_AMQP_PREFIX": "relay",
    "RELAY_LOG_LEVEL": "info",
    "RELAY_OUTAGE_LIMIT": "300",
    "RELAY_HEARTBEAT_INTERVAL": "5",
    "RELAY_STALL_AFTER": "60",
    "RELAY_LOOP_APPLICATION_NAME": "Qonto",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything the relay can be configured with. Tests build it directly."""

    secret_key: Secret
    database_url: Secret = Secret(DEFAULTS["RELAY_DATABASE_URL"])
    amqp_url: Secret = Secret(DEFAULTS["RELAY_AMQP_URL"])
    qonto_api_url: str = DEFAULTS["RELAY_QONTO_API_URL"]
    qonto_oauth_url: str = DEFAULTS["RELAY_QONTO_OAUTH_URL"]
    qonto_client_id: str | None = None
    qonto_client_secret: Secret | None = None
    qonto_staging_token: Secret | None = None
    cegid_api_url: str = DEFAULTS["RELAY_CEGID_API_URL"]
    cegid_subscription_key: Secret | None = None
    admin_token: Secret | None = None
    public_url: str = DEFAULTS["RELAY_PUBLIC_URL"]
    flush_at: dt.time = dt.time(20, 0)
    host: str = DEFAULTS["RELAY_HOST"]
    port: int = 8000
    workers: int = 2
    upload_concurrency: int = 16
    upload_concurrency_per_firm: int = 4
    qonto_requests_per_10s: int = 900  # Qonto allows 1,000 per 10 s per IP: keep headroom
    amqp_prefix: str = DEFAULTS["RELAY_AMQP_PREFIX"]
    log_level: str = DEFAULTS["RELAY_LOG_LEVEL"]
    # how long a role waits for PostgreSQL or RabbitMQ to answer again before it gives up (exit 1)
    outage_limit_s: int = 300
    # every role records its heartbeat this often; `relay status` calls a role stalled when its
    # heartbeat is three beats old, or when it holds work without finishing any for stall_after_s
    heartbeat_interval_s: int = 5
    stall_after_s: int = 60
    # what the accountant types in Loop Hub when declaring the partner (the setup pages show them)
    loop_application_name: str = DEFAULTS["RELAY_LOOP_APPLICATION_NAME"]
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
        """Loop Hub's "Email prestataire" for a firm's domain, when the operator set the local part."""
        if not self.loop_provider_email_local_part:
            return None
        return f"{self.loop_provider_email_local_part}@{domain}.onmicrosoft.com"


_FLUSH_AT = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_EMAIL_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _url(name: str, value: str, schemes: tuple[str, ...], bad: list[str]) -> str:
    """Check a URL; a problem is described without the value (a typo'd URL may hold a password)."""
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


def from_env(
    environ: Mapping[str, str] | None = None,
    *,
    require_secret_key: bool = True,
    require_admin_token: bool = False,
    require_cegid_subscription_key: bool = False,
) -> Settings:
    """Build Settings from the environment; raise ConfigurationError naming every bad variable."""
    env = dict(os.environ if environ is None else environ)

    def get(name: str) -> str:
        value = env.get(name, "").strip()
        return value or DEFAULTS.get(name, "")

    def optional_secret(name: str) -> Secret | None:
        value = env.get(name, "").strip()
        return Secret(value) if value else None

    bad: list[str] = []

    key = env.get("RELAY_SECRET_KEY", "").strip()
    if not key:
        if require_secret_key:
            bad.append("RELAY_SECRET_KEY: required (generate one with `relay keygen`)")
        key = crypto.generate_key()
    elif bad_keys := crypto.invalid_keys(key):
        which = (
            ""
            if bad_keys == [0] or len(crypto.split_keys(key)) == 1
            else f" (key {', '.join(map(str, bad_keys))} of the comma-separated list)"
        )
        bad.append(
            f"RELAY_SECRET_KEY: expected 32 bytes in URL-safe base64{which} (a Fernet key; "
            "`relay keygen` prints one; several keys are separated by commas)"
        )

    database_url = _url(
        "RELAY_DATABASE_URL", get("RELAY_DATABASE_URL"), ("postgresql", "postgres"), bad
    )
    amqp_url = _url("RELAY_AMQP_URL", get("RELAY_AMQP_URL"), ("amqp", "amqps"), bad)
    qonto_api_url = _url("RELAY_QONTO_API_URL", get("RELAY_QONTO_API_URL"), ("http", "https"), bad)
    qonto_oauth_url = _url(
        "RELAY_QONTO_OAUTH_URL", get("RELAY_QONTO_OAUTH_URL"), ("http", "https"), bad
    )
    cegid_api_url = _url("RELAY_CEGID_API_URL", get("RELAY_CEGID_API_URL"), ("http", "https"), bad)
    public_url = _url("RELAY_PUBLIC_URL", get("RELAY_PUBLIC_URL"), ("http", "https"), bad)

    flush_at = dt.time(20, 0)
    match = _FLUSH_AT.match(get("RELAY_FLUSH_AT"))
    if match:
        flush_at = dt.time(int(match.group(1)), int(match.group(2)))
    else:
        bad.append(f"RELAY_FLUSH_AT: expected HH:MM in UTC, got {get('RELAY_FLUSH_AT')!r}")

    port = _int("RELAY_PORT", get("RELAY_PORT"), 0, 65535, bad)
    workers = _int("RELAY_WORKERS", get("RELAY_WORKERS"), 1, 64, bad)
    upload_concurrency = _int(
        "RELAY_UPLOAD_CONCURRENCY", get("RELAY_UPLOAD_CONCURRENCY"), 1, 1024, bad
    )
    per_firm = _int(
        "RELAY_UPLOAD_CONCURRENCY_PER_FIRM", get("RELAY_UPLOAD_CONCURRENCY_PER_FIRM"), 1, 1024, bad
    )
    qonto_budget = _int(
        "RELAY_QONTO_REQUESTS_PER_10S", get("RELAY_QONTO_REQUESTS_PER_10S"), 1, 1_000_000, bad
    )
    outage_limit = _int("RELAY_OUTAGE_LIMIT", get("RELAY_OUTAGE_LIMIT"), 1, 86_400, bad)
    heartbeat_interval = _int(
        "RELAY_HEARTBEAT_INTERVAL", get("RELAY_HEARTBEAT_INTERVAL"), 1, 300, bad
    )
    stall_after = _int("RELAY_STALL_AFTER", get("RELAY_STALL_AFTER"), 1, 86_400, bad)
    prefix = get("RELAY_AMQP_PREFIX")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", prefix):
        bad.append(f"RELAY_AMQP_PREFIX: expected letters, digits, '.', '_' or '-', got {prefix!r}")
    log_level = get("RELAY_LOG_LEVEL").lower()
    if log_level not in _LOG_LEVELS:
        bad.append(f"RELAY_LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")

    client_id = env.get("RELAY_QONTO_CLIENT_ID", "").strip() or None
    client_secret = optional_secret("RELAY_QONTO_CLIENT_SECRET")
    if bool(client_id) != bool(client_secret):
        bad.append(
            "RELAY_QONTO_CLIENT_ID and RELAY_QONTO_CLIENT_SECRET: set both or neither "
            "(they are the OAuth app's credentials)"
        )

    admin_token = optional_secret("RELAY_ADMIN_TOKEN")
    if require_admin_token and admin_token is None:
        bad.append("RELAY_ADMIN_TOKEN: required for the admin API")
    elif admin_token is not None and len(admin_token.reveal()) < 16:
        bad.append("RELAY_ADMIN_TOKEN: must be at least 16 characters")

    cegid_subscription_key = optional_secret("RELAY_CEGID_SUBSCRIPTION_KEY")
    if require_cegid_subscription_key and cegid_subscription_key is None:
        bad.append(
            "RELAY_CEGID_SUBSCRIPTION_KEY: required to call Cegid Loop (the partner's "
            "Ocp-Apim-Subscription-Key, issued by Cegid; without it Loop answers 401 to every call)"
        )

    application_name = get("RELAY_LOOP_APPLICATION_NAME")
    if len(application_name) > 100:
        bad.append("RELAY_LOOP_APPLICATION_NAME: at most 100 characters")
    local_part = env.get("RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART", "").strip() or None
    if local_part is not None and (
        not _EMAIL_LOCAL_PART.fullmatch(local_part) or "@" in local_part
    ):
        bad.append(
            "RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART: expected the part of an email address before "
            f"the @ (letters, digits, '.', '_', '-', '+'), got {local_part!r}"
        )

    if bad:
        raise errors.ConfigurationError(
            "invalid configuration:\n" + "\n".join(f"  - {line}" for line in bad)
        )

    return Settings(
        secret_key=Secret(key),
        database_url=Secret(database_url),
        amqp_url=Secret(amqp_url),
        qonto_api_url=qonto_api_url.rstrip("/"),
        qonto_oauth_url=qonto_oauth_url.rstrip("/"),
        qonto_client_id=client_id,
        qonto_client_secret=client_secret,
        qonto_staging_token=optional_secret("RELAY_QONTO_STAGING_TOKEN"),
        cegid_api_url=cegid_api_url.rstrip("/"),
        cegid_subscription_key=cegid_subscription_key,
        admin_token=admin_token,
        public_url=public_url.rstrip("/"),
        flush_at=flush_at,
        host=get("RELAY_HOST"),
        port=port,
        workers=workers,
        upload_concurrency=upload_concurrency,
        upload_concurrency_per_firm=per_firm,
        qonto_requests_per_10s=qonto_budget,
        amqp_prefix=prefix,
        log_level=log_level,
        outage_limit_s=outage_limit,
        heartbeat_interval_s=heartbeat_interval,
        stall_after_s=stall_after,
        loop_application_name=application_name,
        loop_provider_email_local_part=local_part,
    )


def debug_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether RELAY_LOG_LEVEL asks for debug output (tracebacks), read without validating the rest."""
    env = os.environ if environ is None else environ
    return env.get("RELAY_LOG_LEVEL", "").strip().lower() == "debug"
