"""`relay migrate`: creates the database, applies every migration once, safe to run concurrently."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay import config, crypto
from relay.store import db, queries
from tests.integration.conftest import BASE_DSN


@pytest.fixture
async def fresh_settings() -> AsyncIterator[config.Settings]:
    """Settings naming a database that does not exist yet; dropped afterwards."""
    settings = config.Settings(
        secret_key=config.Secret(crypto.generate_key()),
        database_url=config.Secret(f"{BASE_DSN.rstrip('/')}/relay_migrate_{uuid.uuid4().hex[:10]}"),
    )
    yield settings
    await db.drop_database(settings)


async def test_migrate_creates_the_database_and_applies_everything(
    fresh_settings: config.Settings,
) -> None:
    """On an empty server, migrate creates the database and applies every numbered migration."""
    applied = await db.migrate(fresh_settings)
    assert applied == [version for version, _ in queries.migrations()]
    conn = await asyncpg.connect(fresh_settings.database_url.reveal())
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
    finally:
        await conn.close()
    assert {"connections", "webhook_secrets", "events", "documents", "uploads", "runs"} <= tables


async def test_migrate_twice_is_a_no_op(fresh_settings: config.Settings) -> None:
    """A second run applies nothing."""
    await db.migrate(fresh_settings)
    assert await db.migrate(fresh_settings) == []


async def test_concurrent_migrations_apply_each_version_once(
    fresh_settings: config.Settings,
) -> None:
    """Several replicas starting together: the advisory lock serialises them, nothing fails."""
    results = await asyncio.gather(*(db.migrate(fresh_settings) for _ in range(4)))
    flattened = [version for result in results for version in result]
    assert sorted(flattened) == [version for version, _ in queries.migrations()]


def test_relay_migrate_command_reports_json(fresh_settings: config.Settings) -> None:
    """The command prints one JSON document and exits 0."""
    env = dict(
        os.environ,
        RELAY_DATABASE_URL=fresh_settings.database_url.reveal(),
        RELAY_SECRET_KEY=crypto.generate_key(),
    )
    done = subprocess.run(
        [sys.executable, "-m", "relay", "migrate", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["database_created"] is True
    assert len(result["applied"]) == len(queries.migrations())
