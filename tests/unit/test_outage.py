"""The outage limit a long-running role gives up at."""

from __future__ import annotations

import pytest

from relay import errors, outage


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
