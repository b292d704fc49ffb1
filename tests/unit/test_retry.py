"""The one retry policy (delays, budgets, deadlines) and the one Retry-After parser."""

from __future__ import annotations

import datetime as dt
import email.utils

import pytest

from relay import retry

NOW = dt.datetime(2026, 11, 23, 9, 41, 7, tzinfo=dt.UTC)


def _http_date(moment: dt.datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("0.5", 0.5),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("-4", 0.0),  # a wait in the past: no wait
        ("86400", retry.RETRY_AFTER_MAX_S),  # clamped: an upstream cannot park a flush for a day
        ("inf", retry.RETRY_AFTER_MAX_S),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("Wed, 99 Foo 2026 99:99:99 GMT", None),
    ],
)
def test_retry_after_reads_seconds_clamps_and_ignores_garbage(
    value: str | None, expected: float | None
) -> None:
    """Delay-seconds are read as they are, clamped to [0, RETRY_AFTER_MAX_S]; garbage is None."""
    assert retry.retry_after(value, now=lambda: NOW) == expected


def test_retry_after_as_an_http_date_is_the_seconds_until_it() -> None:
    """The HTTP-date form is the time left until that moment, clamped like the seconds form."""
    assert retry.retry_after(_http_date(NOW + dt.timedelta(seconds=42)), now=lambda: NOW) == 42.0
    assert retry.retry_after(_http_date(NOW - dt.timedelta(seconds=42)), now=lambda: NOW) == 0.0
    later = _http_date(NOW + dt.timedelta(hours=3))
    assert retry.retry_after(later, now=lambda: NOW) == retry.RETRY_AFTER_MAX_S
    assert retry.retry_after(later, now=lambda: NOW, limit_s=600) == 600


def test_retry_after_as_an_http_date_without_a_zone_is_utc() -> None:
    """An HTTP date written with -0000 (no zone said) is read as UTC."""
    naive = (NOW + dt.timedelta(seconds=10)).strftime("%a, %d %b %Y %H:%M:%S -0000")
    assert retry.retry_after(naive, now=lambda: NOW) == 10.0


@pytest.mark.parametrize(
    ("status", "retries"),
    [
        *[(status, False) for status in (200, 400, 401, 404, 408, 422)],
        *[(status, True) for status in (429, 500, 502, 503, 504)],
    ],
)
def test_429_and_5xx_are_worth_another_try_and_nothing_else(status: int, retries: bool) -> None:
    """Rate limited and server errors retry; an answer or a refusal does not."""
    assert retry.retries_status(status) is retries


def test_delays_double_from_first_up_to_cap_within_their_jitter() -> None:
    """Try n waits between floor x and all of min(cap, first x 2^(n-1)), spread over that range."""
    full = retry.Policy(first_s=0.5, cap_s=30.0)
    half = retry.Policy(first_s=0.25, cap_s=4.0, floor=0.5)
    for attempt in range(1, 12):
        for policy in (full, half):
            ceiling = min(policy.cap_s, policy.first_s * 2 ** (attempt - 1))
            assert policy.ceiling(attempt) == ceiling
            delays = [policy.delay(attempt) for _ in range(300)]
            assert all(ceiling * policy.floor <= d <= ceiling for d in delays)
            spread = ceiling * (1 - policy.floor)
            assert max(delays) - min(delays) > spread / 2  # jittered, not a constant
    steady = retry.Policy(first_s=1.0, cap_s=5.0, floor=1.0)
    assert [steady.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_huge_attempt_number_stays_at_the_cap() -> None:
    """No overflow however long a role has been retrying."""
    assert retry.Policy(first_s=0.25, cap_s=4.0, floor=1.0).delay(10_000) == 4.0


def test_retry_after_replaces_the_drawn_delay_within_its_ceiling() -> None:
    """An upstream's Retry-After is waited as given (even longer than the cap), never past the
    longest wait a Retry-After may impose, never negative."""
    policy = retry.Policy(first_s=0.5, cap_s=30.0)
    assert policy.delay(1, 7.0) == 7.0
    assert policy.delay(6, 0.0) == 0.0
    assert policy.delay(1, 90.0) == 90.0
    assert policy.delay(1, 10_000.0) == retry.RETRY_AFTER_MAX_S
    assert policy.delay(1, -3.0) == 0.0


def test_a_budget_of_attempts_counts_every_try() -> None:
    """With attempts=3: two waits, then no try is left; ``last`` says so before it is asked."""
    tries = retry.Policy(first_s=0.5, cap_s=30.0, attempts=3, floor=1.0).tries()
    assert (tries.attempt, tries.last) == (1, False)
    assert tries.again() == 0.5
    assert (tries.attempt, tries.last) == (2, False)
    assert tries.again(4.0) == 4.0
    assert (tries.attempt, tries.last) == (3, True)
    assert tries.again() is None
    assert tries.attempt == 3


def test_a_single_try_policy_never_waits() -> None:
    """attempts=1: the first failure is the end."""
    tries = retry.Policy(first_s=0.5, cap_s=30.0, attempts=1).tries()
    assert tries.last
    assert tries.again() is None


def test_a_deadline_shortens_the_last_wait_and_then_ends_the_tries() -> None:
    """Without a budget, the deadline ends the tries: a wait never runs past it, and once it has
    passed no try is left."""
    clock = [100.0]
    tries = retry.Policy(first_s=1.0, cap_s=8.0, floor=1.0).tries(
        deadline=103.5, clock=lambda: clock[0]
    )
    assert tries.again() == 1.0
    clock[0] += 1.0
    assert tries.again() == 2.0
    clock[0] += 2.0
    assert tries.again() == 0.5  # 4 s drawn, 0.5 s left
    clock[0] += 0.5
    assert tries.again() is None


def test_backoff_doubles_up_to_its_cap_with_jitter_and_starts_again_after_a_reset() -> None:
    """Each delay lies between half and all of min(cap, first x 2^n); reset starts over."""
    backoff = retry.Backoff(retry.Policy(first_s=0.5, cap_s=4.0, floor=0.5))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next() <= ceiling
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5
    assert backoff.next(retry_after=9.0) == 9.0


def test_the_roles_outage_policy_waits_a_quarter_second_first_and_4_s_at_most() -> None:
    """relay.retry.OUTAGE, shared by the consumer, the scheduler and relay run: jittered between
    half and all of 0.25 s, 0.5 s, ... up to 4 s, and no budget (the outage limit ends it)."""
    backoff = retry.Backoff(retry.OUTAGE)
    for ceiling in (0.25, 0.5, 1.0, 2.0, 4.0, 4.0):
        assert ceiling / 2 <= backoff.next() <= ceiling
    assert retry.OUTAGE.attempts is None


@pytest.mark.parametrize(
    "arguments",
    [
        {"first_s": 0.0, "cap_s": 1.0},
        {"first_s": 2.0, "cap_s": 1.0},
        {"first_s": 0.5, "cap_s": 1.0, "floor": 1.5},
        {"first_s": 0.5, "cap_s": 1.0, "attempts": 0},
    ],
)
def test_a_policy_that_cannot_work_is_refused(arguments: dict[str, float]) -> None:
    """A zero or inverted delay range, a floor outside [0, 1], or no try at all: ValueError."""
    with pytest.raises(ValueError, match="retry policy"):
        retry.Policy(**arguments)  # type: ignore[arg-type]
