"""What went wrong, classified by what the caller should do about it.

Foreign exceptions (asyncpg, aio-pika, httpx) are translated into these at exactly one boundary per
dependency (`db`, `amqp`, `qonto`, `cegid`), chained with ``from exc``. Decisions (ack or dead-letter,
retry or fail a document) are taken from the class alone.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


# --- Retryable: the same work may succeed later, unchanged -------------------------------------------


class Retryable(RelayError):
    """Try again later: nothing about the work itself is wrong."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatabaseUnavailable(Retryable):
    """PostgreSQL did not answer or refused the connection."""


class OutageTooLong(DatabaseUnavailable):
    """PostgreSQL stayed unavailable longer than ``RELAY_OUTAGE_LIMIT``: the role stops (exit 1)."""


class BrokerUnavailable(Retryable):
    """RabbitMQ did not answer, refused the publish or did not confirm it."""


class QontoUnavailable(Retryable):
    """Qonto answered 5xx, timed out, or the connection failed before a usable answer."""


class CegidUnavailable(Retryable):
    """Cegid Loop did not keep the file: connection refused, DNS/TLS failure, 5xx (nothing ambiguous)."""


class RateLimited(Retryable):
    """The upstream answered 429; ``retry_after`` holds its Retry-After when it sent one."""


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
    """PostgreSQL refused the data itself (a character it cannot store, a number out of range...):
    the same record fails the same way every time, so the consumer dead-letters its message."""


class InvalidEvent(Permanent):
    """A message is not a Qonto event the relay can use (not JSON, missing fields, unknown version)."""


class QontoAuthRejected(Permanent):
    """Qonto refused the connection's credentials (401/403) or the OAuth consent was revoked."""


class QontoNotFound(Permanent):
    """Qonto answered 404: the resource (typically an attachment) no longer exists."""


class QontoProtocolError(Permanent):
    """Qonto answered something unusable: non-JSON 200 (e.g. the sandbox login page), bad shape."""


class CegidAccessRefused(Permanent):
    """Cegid refused the firm's credentials or the key has no access to the dossier (401/403)."""


class CegidFileRejected(Permanent):
    """Cegid refused the file itself (400/413/415): the document fails with this reason."""

    def __init__(self, message: str, *, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NotFound(Permanent):
    """The connection, document or message named by an operator does not exist."""


class Refused(Permanent):
    """A request the relay will not carry out as asked (ineligible role, wrong state...)."""


# --- Outcomes that are neither success nor plain failure ---------------------------------------------


class AlreadyRecorded(RelayError):
    """The event or document was already recorded: processing it again is a no-op."""


class OutcomeUnknown(RelayError):
    """The request was fully sent but no answer came back: the upstream may or may not have kept it."""
