"""Backoff between attempts and the outage limit a long-running role gives up at."""

from __future__ import annotations

import pytest

from relay import errors, outage


def test_backoff_doubles_up_to_its_cap_with_jitter_and_starts_again_after_a_reset() -> None:
    """Each delay lies between half and all of min(cap, first x 2^n); reset starts over."""
    backoff = outage.Backoff(first_s=0.5, cap_s=4.0)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next() <= ceiling
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_an_outage_past_its_limit_raises_naming_the_service_and_the_setting() -> None:
    """The first failure starts the clock; a failure past the limit raises OutageTooLong."""
    clock = outage.Outage("consume", "PostgreSQL", limit_s=0)
    clock.failed("ping: PostgreSQL unavailable (ConnectionRefusedError)")
    assert clock.ongoing
    with pytest.raises(errors.OutageTooLong) as raised:
        clock.failed("ping: PostgreSQL unavailable (ConnectionRefusedError)")
    assert str(raised.value).startswith(
        "PostgreSQL unavailable for more than 0 s (RELAY_OUTAGE_LIMIT): relay consume exits"
    )


def test_a_recovery_stops_the_clock() -> None:
    """After recovered(), the next failure starts a new outage instead of ending the role."""
    clock = outage.Outage("scheduler", "PostgreSQL", limit_s=0)
    clock.failed("down")
    clock.recovered()
    assert not clock.ongoing
    assert clock.remaining_s() == 0
    clock.failed("down again")  # a new outage: no exception yet
    assert clock.ongoing
