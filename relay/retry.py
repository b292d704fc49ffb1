"""The one retry policy of every loop that tries again, and the one ``Retry-After`` parser.

A :class:`Policy` says how long to wait before each new try (doubling from ``first_s`` up to
``cap_s``, jittered), how many tries a call gets (``attempts``) and what ``Retry-After`` may ask
for. A call with a budget counts its tries with :meth:`Policy.tries`; a role that keeps trying
until its outage clock runs out draws its delays from a :class:`Backoff`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import random
import time
from collections.abc import Callable
from typing import Final

RETRY_AFTER_MAX_S: Final = 120.0  # the longest wait a Retry-After may impose
_MAX_DOUBLINGS: Final = 32


def retry_after(
    value: str | None,
    *,
    now: Callable[[], dt.datetime] | None = None,
    limit_s: float = RETRY_AFTER_MAX_S,
) -> float | None:
    """Read the seconds a ``Retry-After`` header value asks to wait, from either of its forms.

    Delay-seconds (``"7"``, ``"0.5"``) or an HTTP date (``"Wed, 21 Oct 2026 07:28:00 GMT"``, taken
    from ``now``); clamped to ``[0, limit_s]``. None when absent or garbled (the caller falls back
    to its backoff).
    """
    if value is None:
        return None
    text = value.strip()
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until(text, now)
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), limit_s)


def _seconds_until(text: str, now: Callable[[], dt.datetime] | None) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    moment = now() if now is not None else dt.datetime.now(dt.UTC)
    return (when - moment).total_seconds()


def retries_status(status: int) -> bool:
    """Whether an upstream's HTTP status is worth another try (429, rate limited, and 5xx)."""
    return status == 429 or status >= 500


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """How a loop tries again.

    ``first_s``, ``cap_s``: try n waits at most ``min(cap_s, first_s * 2**(n-1))`` seconds;
    ``floor``: the share of that ceiling it waits at least (0: full jitter, 0.5: between half and
    all of it, 1: no jitter); ``attempts``: tries a call gets in all (None: no budget, the caller's
    outage limit or deadline ends it). A ``Retry-After`` replaces the drawn delay, up to
    :data:`RETRY_AFTER_MAX_S`.
    """

    first_s: float
    cap_s: float
    attempts: int | None = None
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.cap_s:
            raise ValueError("a retry policy needs 0 < first_s <= cap_s")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError("a retry policy's floor is a share of the delay, in [0, 1]")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("a retry policy allows at least one try")

    def ceiling(self, attempt: int) -> float:
        """Return the longest wait after failed try ``attempt`` (1-based)."""
        doublings = min(max(attempt - 1, 0), _MAX_DOUBLINGS)
        return min(self.cap_s, self.first_s * float(2**doublings))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Return the seconds to wait after failed try ``attempt``.

        That is ``retry_after`` when the upstream gave one (clamped), else a jittered draw below
        the ceiling.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), RETRY_AFTER_MAX_S)
        ceiling = self.ceiling(attempt)
        return random.uniform(ceiling * self.floor, ceiling)

    def tries(
        self, *, deadline: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> Tries:
        """Start the tries of one call under this policy, bounded by ``deadline`` (on ``clock``)."""
        return Tries(self, deadline, clock)


class Tries:
    """The tries of one call, which one is under way and how long to wait before the next."""

    def __init__(self, policy: Policy, deadline: float | None, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.attempt = 1  # the try under way (1-based)
        self._deadline = deadline
        self._clock = clock

    @property
    def last(self) -> bool:
        """The try under way is the last one the budget allows."""
        return self.policy.attempts is not None and self.attempt >= self.policy.attempts

    def again(self, retry_after: float | None = None) -> float | None:
        """Count a failed try and return the seconds to wait before the next one.

        None when no try is left (the budget is spent or the deadline has passed). A wait never
        runs past the deadline.
        """
        if self.last:
            return None
        delay = self.policy.delay(self.attempt, retry_after)
        if self._deadline is not None:
            left = self._deadline - self._clock()
            if left <= 0:
                return None
            delay = min(delay, left)
        self.attempt += 1
        return delay


class Backoff:
    """Delays between the tries of a loop without a budget (a role waiting for a service).

    Each one is drawn from ``policy``, the ceiling doubling at each until :meth:`reset`.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._attempt = 0

    def next(self, retry_after: float | None = None) -> float:
        """Return the delay before the next try."""
        self._attempt = min(self._attempt + 1, _MAX_DOUBLINGS + 1)
        return self.policy.delay(self._attempt, retry_after)

    def reset(self) -> None:
        """Start the next outage from the shortest delay again, once the service answered."""
        self._attempt = 0


# A long-running role waiting for PostgreSQL or RabbitMQ: from a quarter of a second up to 4 s,
# each delay between half and all of its ceiling, so replicas that lost the same service do not
# come back in step. Its RELAY_OUTAGE_LIMIT clock is relay.outage.Outage.
OUTAGE: Final = Policy(first_s=0.25, cap_s=4.0, floor=0.5)
