"""The database boundary on the real PostgreSQL: data it refuses is permanent, not an outage."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import pytest

from relay import errors
from relay.store import db


@pytest.mark.parametrize(
    ("sql", "args", "refusal"),
    [
        ("SELECT $1::text", ("a\x00b",), "CharacterNotInRepertoireError"),
        ("SELECT $1::text::jsonb", ('{"a": "\\u0000"}',), "UntranslatableCharacterError"),
        ("SELECT $1::text::jsonb", ('{"a": 1e-20000}',), "NumericValueOutOfRangeError"),
        ("SELECT $1::text::int", ("twelve",), "InvalidTextRepresentationError"),
        ("SELECT $1::int", (2**40,), "DataError"),  # refused by asyncpg before it is sent
    ],
)
async def test_data_postgresql_refuses_is_invalid_data_a_permanent_error(
    pool: asyncpg.Pool, sql: str, args: tuple[Any, ...], refusal: str
) -> None:
    """NUL in text or jsonb, bad text for a type, numbers out of range: InvalidData, never retried."""
    with pytest.raises(errors.InvalidData, match=refusal) as caught, db.translate("probe"):
        await pool.fetchval(sql, *args)
    assert isinstance(caught.value, errors.Permanent)
    assert not isinstance(caught.value, errors.Retryable)
    assert str(caught.value).startswith("probe: PostgreSQL refused the data")
    async with pool.acquire() as conn:  # the connection is still usable afterwards
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_value_too_large_for_an_index_is_invalid_data(pool: asyncpg.Pool) -> None:
    """An index entry over PostgreSQL's limit (a huge event id, say) fails the same way every time."""
    async with pool.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE probe (k text PRIMARY KEY)")
        huge = secrets.token_hex(5000)  # incompressible, well over the 2704-byte btree limit
        with (
            pytest.raises(errors.InvalidData, match="ProgramLimitExceededError"),
            db.translate("probe"),
        ):
            await conn.execute("INSERT INTO probe VALUES ($1)", huge)


async def test_postgresql_gone_is_still_unavailable(pool: asyncpg.Pool) -> None:
    """A closed pool is an outage (retry later), not bad data."""
    await pool.close()
    with pytest.raises(errors.DatabaseUnavailable), db.translate("probe"):
        await pool.fetchval("SELECT 1")
