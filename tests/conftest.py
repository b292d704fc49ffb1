"""Fixtures every test may use: paths to the shared contracts, a Settings object, a secret key."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from relay import config, crypto

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRACTS = ROOT.parent / "shared" / "contracts"
FIXTURES = CONTRACTS / "fixtures"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
def secret_key() -> str:
    return crypto.generate_key()


@pytest.fixture
def unit_settings(secret_key: str) -> config.Settings:
    """Settings for tests that run nothing (no database, no broker)."""
    return config.Settings(secret_key=config.Secret(secret_key))
