"""The relay's errors, classified by what the caller should do about them.

Foreign exceptions (asyncpg, aio-pika, httpx) are translated into these at exactly one boundary
per dependency (``store.db``, ``broker.amqp``, ``upstreams.qonto``, ``upstreams.cegid``), chained
with ``from exc``. Decisions (ack or dead-letter, retry or fail a document) are taken from the
class alone.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


# --- Retryable: the same work may succeed later, unchanged -------------------------------------------


class Retryable(RelayError):
    """A failure to retry later (nothing about the work itself is wrong)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatabaseUnavailable(Retryable):
    """PostgreSQL did not answer or refused the connection."""


class BrokerUnavailable(Retryable):
    """RabbitMQ did not answer, refused the publish or did not confirm it."""


class QontoUnavailable(Retryable):
    """Qonto answered 5xx, timed out, or the connection failed before a usable answer."""


class CegidUnavailable(Retryable):
    """Cegid Loop certainly did not keep the file (connection refused, DNS/TLS failure, 5xx)."""


class RateLimited(Retryable):
    """An upstream's 429, its Retry-After in ``retry_after`` when it sent one."""


class QontoRateLimited(RateLimited, QontoUnavailable):
    """Qonto answered 429."""


class CegidRateLimited(RateLimited, CegidUnavailable):
    """Cegid Loop (Azure API Management) answered 429."""


# --- Permanent: the same work will fail again until someone changes something ------------------------


class Permanent(RelayError):
    """Retrying the same work will not help."""


class ConfigurationError(Permanent):
    """One or more settings are missing or malformed (the message names every one)."""


class InvalidData(Permanent):
    """PostgreSQL refused the data itself (a character it cannot store, a number out of range...).

    The same record fails the same way every time, so the consumer dead-letters its message.
    """


class InvalidEvent(Permanent):
    """A message is not a Qonto event the relay can use (not JSON, missing fields, unknown version)."""


class QontoAuthRejected(Permanent):
    """Qonto refused the connection's credentials (401/403) or the OAuth consent was revoked."""


class QontoNotFound(Permanent):
    """Qonto answered 404, so the resource (typically an attachment) no longer exists."""


class QontoProtocolError(Permanent):
    """Qonto answered something unusable (a non-JSON 200 like the sandbox login, a bad shape)."""


class CegidAccessRefused(Permanent):
    """Cegid refused the firm's credentials or the key has no access to the dossier (401/403)."""


class CegidKeyRefused(CegidAccessRefused):
    """Loop refused the firm's API key and secret themselves (401)."""


class CegidDossierNotAssociated(CegidAccessRefused):
    """The key is valid but may not read the dossier (403), which is not associated in Loop Hub."""


class CegidDossierUnknown(CegidAccessRefused):
    """Loop knows no such dossier for this key (a read of it answered no data)."""


class CegidFileRejected(Permanent):
    """Cegid refused the file itself (400/413/415), so the document fails with this reason."""

    def __init__(self, message: str, *, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NotFound(Permanent):
    """The connection, document or message named by an operator does not exist."""


class Refused(Permanent):
    """A request the relay will not carry out as asked (ineligible role, wrong state...)."""


# --- Outcomes that are neither success nor plain failure ---------------------------------------------


class OutageTooLong(RelayError):
    """PostgreSQL or RabbitMQ stayed unavailable past RELAY_OUTAGE_LIMIT.

    The role exits 1, for its supervisor to restart it (alive and idle, it would hide the outage).
    """


class OutcomeUnknown(RelayError):
    """A request fully sent that got no answer, which the upstream may or may not have kept."""
