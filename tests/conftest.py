"""Fixtures every test may use: the contracts' example payloads, a Settings object, a secret key."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from relay import config, crypto, log
from tests import services

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Copies of the contracts' example payloads and Qonto's signature test vector: the repository
# stands alone, nothing outside it is read when the tests run.
FIXTURES = ROOT / "tests" / "fixtures"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture(scope="session", autouse=True)
def quiet_logs() -> None:
    """The product's logs at warning level during tests (a failing test shows them)."""
    log.configure("warning")


@pytest.fixture
def secret_key() -> str:
    return crypto.generate_key()


@pytest.fixture
def unit_settings(secret_key: str) -> config.Settings:
    """Settings for tests that run nothing (no database, no broker)."""
    return config.Settings(secret_key=config.Secret(secret_key))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its waits for the services lock to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["services_lock_waited_s"] = sum(session.config.stash.get(services.WAITED, []))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controller adds up its workers' waits for the services lock (xdist)."""
    waited = getattr(node, "workeroutput", {}).get("services_lock_waited_s", 0.0)
    node.config.stash.setdefault(services.WAITED, []).append(float(waited))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Says how long the tests waited for the services lock (other sessions' fault tests): part
    of the wall time that is not theirs (summed over xdist workers)."""
    waited = sum(config.stash.get(services.WAITED, []))
    if waited >= 1:
        terminalreporter.write_line(f"waited {waited:.0f} s for the services lock")
