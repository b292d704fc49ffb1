"""PostgreSQL's pool, migrations and transactions, and the translation of asyncpg's errors.

The statements themselves live in the table modules beside this one (see :mod:`relay.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from relay import config, errors, log
from relay.store import queries

# A connection, whether from a pool (a proxy) or opened directly.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
# What a store function runs its statement on: the pool (a connection of its own) or a connection
# (the caller's transaction, or a session holding advisory locks).
Executor = asyncpg.Pool | Conn

logger = log.get(__name__)

# A fixed key for the migration advisory lock (arbitrary, stable): "relay-migrate".
MIGRATION_LOCK = 0x72656C6179_6D67

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionFailureError,
    # a connection its backend left mid-operation (terminated, restarted) that the pool could not
    # reset on release: asyncpg drops it, a fresh one serves the next try
    asyncpg.InternalClientError,
)


# What no retry fixes: the database, the schema or the credentials are not what the relay expects.
_MISCONFIGURED: tuple[type[BaseException], ...] = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,  # wrong password, unknown role, pg_hba refusal
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
)


def _misconfigured(what: str, exc: BaseException) -> str:
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"{exc} (RELAY_DATABASE_URL): run `relay migrate`, which creates it"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"PostgreSQL refused RELAY_DATABASE_URL's credentials ({exc}): check its user and password"
    return f"{what}: the database schema is missing or out of date ({exc}): run `relay migrate`"


# PostgreSQL refusing the data itself (SQLSTATE class 22: a NUL character, text that is not valid
# for its type, a number out of range; class 54: a value too large for an index or a row), and
# asyncpg refusing to encode a query argument. The same data fails the same way every time.
_INVALID_DATA: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.ProgramLimitExceededError,
    asyncpg.exceptions._base.DataError,  # client side; a subclass of InterfaceError (below)
)


# What the enclosing db.transaction block does: its statements' errors are named after it.
_BLOCK: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_db_block", default=None)


@contextlib.contextmanager
def translate(what: str = "database") -> Any:
    """Translate asyncpg's and the socket's errors into the relay's.

    'PostgreSQL is not there' becomes DatabaseUnavailable; 'PostgreSQL refuses this data' becomes
    errors.InvalidData (permanent, since retrying the same data fails again). Inside a
    :func:`transaction` block, errors are named after the block.
    """
    what = _BLOCK.get() or what
    try:
        yield
    except _INVALID_DATA as exc:
        raise errors.InvalidData(
            f"{what}: PostgreSQL refused the data ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    except _UNAVAILABLE as exc:
        raise errors.DatabaseUnavailable(
            f"{what}: PostgreSQL unavailable ({type(exc).__name__})"
        ) from exc
    except _MISCONFIGURED as exc:
        raise errors.ConfigurationError(_misconfigured(what, exc)) from exc
    except asyncpg.SerializationError as exc:
        raise errors.DatabaseUnavailable(f"{what}: serialization conflict, retry") from exc
    except asyncpg.DeadlockDetectedError as exc:
        raise errors.DatabaseUnavailable(f"{what}: deadlock detected, retry") from exc


async def acquire(pool: asyncpg.Pool, what: str) -> asyncpg.pool.PoolConnectionProxy:
    """Take a pool connection held past one block (a session's advisory lock), errors translated."""
    with translate(what):
        return await pool.acquire()


async def release(pool: asyncpg.Pool, conn: asyncpg.pool.PoolConnectionProxy, what: str) -> None:
    """Give back a connection :func:`acquire` took, translating errors."""
    with translate(what):
        await pool.release(conn)


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool, what: str) -> AsyncIterator[Conn]:
    """Lend a pool connection for several statements, translating errors in the block."""
    with translate(what):
        async with pool.acquire() as conn:
            yield conn


@contextlib.asynccontextmanager
async def transaction(pool: asyncpg.Pool, what: str) -> AsyncIterator[Conn]:
    """Run the block in one transaction on a pool connection, errors (the commit's) translated."""
    with translate(what):
        async with pool.acquire() as conn, conn.transaction():
            token = _BLOCK.set(what)
            try:
                yield conn
            finally:
                _BLOCK.reset(token)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no message"


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog"
    )


def _json_dumps(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode("utf-8")


def _json_loads(value: str) -> Any:
    import orjson

    return orjson.loads(value)


async def create_pool(
    settings: config.Settings, *, min_size: int = 1, max_size: int = 10
) -> asyncpg.Pool:
    with translate("connect"):
        pool = await asyncpg.create_pool(
            settings.database_url.reveal(),
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            command_timeout=60,
            timeout=10,
        )
    assert pool is not None
    return pool


async def connect(settings: config.Settings) -> asyncpg.Connection:
    """Open a single connection (LISTEN, advisory session locks) with the pool's codecs."""
    with translate("connect"):
        conn = await asyncpg.connect(settings.database_url.reveal(), timeout=10)
        await _init_connection(conn)
    return conn


async def listen(
    settings: config.Settings,
    channel: str,
    on_notify: Callable[..., None],
    on_lost: Callable[..., None],
) -> asyncpg.Connection:
    """Open a connection that LISTENs on ``channel`` and calls ``on_lost`` when it dies."""
    conn = await connect(settings)
    try:
        with translate("listen"):
            await conn.add_listener(channel, on_notify)
            conn.add_termination_listener(on_lost)
    except BaseException:
        conn.terminate()
        raise
    return conn


@contextlib.asynccontextmanager
async def pool_for(settings: config.Settings, **kwargs: Any) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings, **kwargs)
    try:
        yield pool
    finally:
        await pool.close()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


async def create_database_if_missing(settings: config.Settings) -> bool:
    """Create the database named in RELAY_DATABASE_URL if missing, returning True if it did."""
    url = settings.database_url.reveal()
    name = database_name(url)
    with translate("create database"):
        admin = await asyncpg.connect(_with_database(url, "postgres"), timeout=10)
        try:
            exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if exists:
                return False
            try:
                await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                return False  # created concurrently by another `relay migrate`
            return True
        finally:
            await admin.close()


async def migrate(settings: config.Settings) -> list[str]:
    """Create the database if missing and apply every migration not yet applied.

    Idempotent and safe to run concurrently: a session advisory lock serialises runners, and each
    migration is applied in its own transaction together with its ``schema_migrations`` row.
    """
    created = await create_database_if_missing(settings)
    if created:
        logger.info("database_created", database=database_name(settings.database_url.reveal()))
    applied: list[str] = []
    conn = await connect(settings)
    try:
        with translate("migrate"):
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for version, sql in queries.migrations():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)", version
                        )
                    applied.append(version)
                    logger.info("migration_applied", version=version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied


async def ping(pool: asyncpg.Pool) -> None:
    with translate("ping"):
        await pool.fetchval("SELECT 1", timeout=2)


async def drop_database(settings: config.Settings) -> None:
    """Drop the database named in the settings (a throwaway one, the demo's or the benchmarks')."""
    url = settings.database_url.reveal()
    name = database_name(url).replace('"', "")
    with translate("drop database"):
        admin = await asyncpg.connect(_with_database(url, "postgres"), timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
