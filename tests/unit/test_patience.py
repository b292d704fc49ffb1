"""The flush's outage guard: writes wait for PostgreSQL, the lease first; past the limit, one stop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumers import patience
from relay import errors


class Database:
    """What the guard asks of a pool: a ping that fails for the next ``down_pings`` pings."""

    def __init__(self, down_pings: int = 0) -> None:
        self.down_pings = down_pings
        self.expired = 0
        self.pings = 0

    async def fetchval(self, query: str, *args: Any, **options: Any) -> int:
        self.pings += 1
        if self.pings <= self.down_pings:
            raise ConnectionRefusedError("refused")
        return 1

    async def expire_connections(self) -> None:
        self.expired += 1


def _guard(database: Database, limit_s: float, **kwargs: Any) -> patience.Guard:
    return patience.Guard(database, limit_s, **kwargs)  # type: ignore[arg-type]


async def test_an_operation_waits_for_the_database_then_runs_again_after_the_lease() -> None:
    """Lost: the idle connections expired, the lease re-taken once the database answers, then the
    operation runs again; several operations failing together share one outage."""
    database = Database(down_pings=2)
    order: list[str] = []

    async def on_back() -> None:
        order.append("lease")

    guard = _guard(database, 30, on_back=on_back)
    runs = {"a": 0, "b": 0}
    both_out = asyncio.Event()

    def operation(name: str) -> Any:
        async def run() -> str:
            runs[name] += 1
            if runs[name] == 1:  # both in flight when the database goes
                if all(runs.values()):
                    both_out.set()
                await both_out.wait()
                raise errors.DatabaseUnavailable(f"{name}: PostgreSQL unavailable")
            order.append(name)
            return name

        return run

    done = await asyncio.wait_for(
        asyncio.gather(guard.run("a", operation("a")), guard.run("b", operation("b"))), 10
    )
    assert done == ["a", "b"]
    assert order[0] == "lease"
    assert sorted(order[1:]) == ["a", "b"]
    assert runs == {"a": 2, "b": 2}
    assert (database.expired, database.pings) == (1, 3)
    assert len(guard.outages) == 1
    await guard.close()


async def test_past_the_limit_every_waiting_and_later_operation_raises_outage_too_long() -> None:
    """The database does not come back within the limit: the waiting operations and any later
    one raise OutageTooLong, saying the limit."""
    database = Database(down_pings=1_000)
    guard = _guard(database, 0.3)

    async def failing() -> None:
        raise errors.DatabaseUnavailable("PostgreSQL unavailable")

    with pytest.raises(errors.OutageTooLong, match=r"more than 0.3 s \(RELAY_OUTAGE_LIMIT\)"):
        await asyncio.wait_for(guard.run("write", failing), 10)
    assert guard.gave_up is not None
    never_run = asyncio.Event()

    async def later() -> None:
        never_run.set()

    with pytest.raises(errors.OutageTooLong):
        await guard.run("later", later)
    assert not never_run.is_set()
    assert database.pings >= 1
    await guard.close()


async def test_an_operation_failing_while_the_database_answers_is_given_up() -> None:
    """A statement that fails every time though PostgreSQL answers: raised after a bounded number
    of runs, not retried forever (the flush does not give up on the database for it)."""
    database = Database()
    guard = _guard(database, 30)
    runs = 0

    async def always() -> None:
        nonlocal runs
        runs += 1
        raise errors.DatabaseUnavailable("statement timeout")

    with pytest.raises(errors.DatabaseUnavailable) as raised:
        await asyncio.wait_for(guard.run("slow", always), 30)
    assert not isinstance(raised.value, errors.OutageTooLong)
    assert runs == patience.OPERATION_TRIES
    assert guard.gave_up is None
    await guard.close()


async def test_a_lease_that_cannot_be_taken_yet_keeps_the_operations_waiting() -> None:
    """The lease is held by a recovery for a moment: the guard keeps probing, and the operations
    run only once it is re-taken."""
    database = Database()
    attempts = 0

    async def on_back() -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise errors.DatabaseUnavailable("worker lock held by a recovery")

    guard = _guard(database, 30, on_back=on_back)
    runs = 0

    async def write() -> str:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise errors.DatabaseUnavailable("lost")
        return "done"

    assert await asyncio.wait_for(guard.run("write", write), 10) == "done"
    assert attempts == 3
    await guard.close()


async def test_without_a_guard_an_operation_runs_once() -> None:
    """patience.run without a guard (the scan on its own): one run, the error as it came."""
    runs = 0

    async def failing() -> None:
        nonlocal runs
        runs += 1
        raise errors.DatabaseUnavailable("down")

    with pytest.raises(errors.DatabaseUnavailable):
        await patience.run(None, "write", failing)
    assert runs == 1
