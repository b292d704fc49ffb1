"""The services lock the tests share with the fault tests (tests/services.py), on files of its own."""

from __future__ import annotations

import contextlib
import fcntl
import pathlib
import threading
from collections.abc import Iterator

import pytest

from tests import services


class Holder:
    """A thread holding a Lock of its own (as another test process would) until told to let go."""

    def __init__(
        self, tmp_path: pathlib.Path, *, exclusive: bool, gate_hold_s: float = 150.0
    ) -> None:
        self.lock = services.Lock(
            tmp_path / "lock", tmp_path / "gate", gate_hold_s=gate_hold_s, gate_open_s=0.05
        )
        self.entered = threading.Event()
        self.leave = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(exclusive,), daemon=True)
        self._thread.start()

    def _hold(self, exclusive: bool) -> None:
        with self.lock.held(exclusive=exclusive):
            self.entered.set()
            self.leave.wait()

    def done(self) -> None:
        self.leave.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


def _taken(path: pathlib.Path) -> bool:
    """Whether someone holds ``path`` (a non-blocking exclusive try fails)."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _wait(condition: threading.Event | pathlib.Path) -> None:
    if isinstance(condition, threading.Event):
        assert condition.wait(10)
        return
    for _ in range(1000):
        if _taken(condition):
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{condition} never taken")


@contextlib.contextmanager
def _holders() -> Iterator[list[Holder]]:
    found: list[Holder] = []
    try:
        yield found
    finally:
        for holder in found:
            holder.leave.set()


def test_a_waiting_fault_test_goes_before_tests_that_come_after_it(tmp_path: pathlib.Path) -> None:
    """A test holds the lock shared; a fault test waits for it; a test that comes next waits
    behind the fault test instead of joining the first one (no starvation), and runs after it."""
    with _holders() as holders:
        first = Holder(tmp_path, exclusive=False)
        holders.append(first)
        _wait(first.entered)
        fault = Holder(tmp_path, exclusive=True)
        holders.append(fault)
        _wait(tmp_path / "gate")  # the fault test is at the gate, waiting for the lock
        assert not fault.entered.is_set()
        later = Holder(tmp_path, exclusive=False)
        holders.append(later)
        first.done()
        _wait(fault.entered)
        assert not later.entered.is_set()  # the gate is closed while the fault test runs
        fault.done()
        _wait(later.entered)
        later.done()


def test_a_holder_that_never_lets_go_stops_the_fault_tests_only(tmp_path: pathlib.Path) -> None:
    """A shared holder that keeps the lock far longer than a test (stuck, or a whole session):
    the fault test waiting for it opens the gate now and then, so other tests still run."""
    with _holders() as holders:
        stuck = Holder(tmp_path, exclusive=False)
        holders.append(stuck)
        _wait(stuck.entered)
        fault = Holder(tmp_path, exclusive=True, gate_hold_s=0.2)
        holders.append(fault)
        _wait(tmp_path / "gate")
        later = Holder(tmp_path, exclusive=False)
        holders.append(later)
        _wait(later.entered)  # through the gate while the fault test still waits
        assert not fault.entered.is_set()
        later.done()
        stuck.done()
        _wait(fault.entered)
        fault.done()


def test_fault_tests_and_other_tests_never_share_a_session(tmp_path: pathlib.Path) -> None:
    """A session that held the lock shared and then asks for it exclusively fails, saying why."""
    lock = services.Lock(tmp_path / "lock", tmp_path / "gate")
    with lock.held(exclusive=False):
        pass
    with pytest.raises(pytest.fail.Exception, match="must run apart"), lock.held(exclusive=True):
        pass
