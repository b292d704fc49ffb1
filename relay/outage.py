"""How long a long-running role waits for PostgreSQL or RabbitMQ before it exits 1.

Past ``RELAY_OUTAGE_LIMIT`` the role exits, so that its supervisor restarts it instead of leaving it
alive and idle. The delays between its attempts are :data:`relay.retry.OUTAGE`'s.
"""

from __future__ import annotations

import time

from relay import errors, log

logger = log.get(__name__)


class Outage:
    """One dependency's outage as one role sees it, when it began and whether it lasted too long.

    ``failed`` at each failed attempt (the first one starts the clock and logs ``{role}_lost``);
    past ``limit_s`` it raises :class:`errors.OutageTooLong`. ``recovered`` at the first success
    logs how long it lasted and stops the clock.
    """

    def __init__(self, role: str, service: str, limit_s: float) -> None:
        self.role = role
        self.service = service
        self.limit_s = limit_s
        self.since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def remaining_s(self) -> float:
        """Return the seconds left before the limit (all of it when no outage is under way)."""
        if self.since is None:
            return self.limit_s
        return max(0.0, self.limit_s - (time.monotonic() - self.since))

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
            logger.warning("outage_started", role=self.role, service=self.service, reason=reason)
        elif now - self.since >= self.limit_s:
            raise errors.OutageTooLong(
                f"{self.service} unavailable for more than {self.limit_s:g} s "
                f"(RELAY_OUTAGE_LIMIT): relay {self.role} exits for its supervisor to restart it "
                f"(last error: {reason})"
            )

    def recovered(self) -> None:
        if self.since is not None:
            logger.info(
                "outage_ended",
                role=self.role,
                service=self.service,
                duration_ms=round((time.monotonic() - self.since) * 1000),
            )
            self.since = None
