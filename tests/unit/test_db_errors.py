"""PostgreSQL errors no retry fixes become configuration errors that say what to do (exit 2)."""

from __future__ import annotations

import asyncpg
import pytest

from relay import errors
from relay.store import db


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            asyncpg.InvalidCatalogNameError('database "relay" does not exist'),
            'database "relay" does not exist (RELAY_DATABASE_URL): run `relay migrate`',
        ),
        (
            asyncpg.UndefinedTableError('relation "connections" does not exist'),
            "the database schema is missing or out of date",
        ),
        (
            asyncpg.UndefinedColumnError('column "connected_at" does not exist'),
            "run `relay migrate`",
        ),
        (
            asyncpg.InvalidPasswordError('password authentication failed for user "relay"'),
            "PostgreSQL refused RELAY_DATABASE_URL's credentials",
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "",
)
def test_misconfigured_database_errors_say_what_to_do(raised: Exception, expected: str) -> None:
    """A missing database, an unmigrated schema or a refused password is configuration, not an outage."""
    with pytest.raises(errors.ConfigurationError) as caught, db.translate("list"):
        raise raised
    assert expected in str(caught.value)
    assert caught.value.__cause__ is raised


@pytest.mark.parametrize(
    "raised",
    [
        ConnectionRefusedError("refused"),
        # a pool connection whose backend went mid-operation, which asyncpg could not reset
        asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
    ],
    ids=lambda v: type(v).__name__,
)
def test_postgresql_down_stays_retryable(raised: Exception) -> None:
    """Unavailability is still DatabaseUnavailable (retried), not a configuration error."""
    with pytest.raises(errors.DatabaseUnavailable), db.translate("list"):
        raise raised
