"""Integration fixtures: the real PostgreSQL and RabbitMQ, isolated per test.

Each test gets a fresh database cloned from a template migrated once per session, and an AMQP prefix
of its own; both are removed afterwards. A missing service fails the test loudly: a skipped test would
hide it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import aio_pika.abc
import asyncpg
import pytest

from relay import config, crypto
from relay.broker import amqp
from relay.store import db
from tests import services

BASE_DSN = os.environ.get("RELAY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432")
AMQP_URL = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEMPLATE = f"relay_test_template_{os.getpid()}"


_LOCK = pytest.StashKey[services.Lock]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LOCK] = services.Lock()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """No fault test restarts a service under another test (see tests/services.py): the lock is
    held around the whole test, fixtures included, taken before its timeout starts."""
    asked = time.monotonic()
    with item.config.stash[_LOCK].held(exclusive=item.get_closest_marker("fault") is not None):
        item.config.stash.setdefault(services.WAITED, []).append(time.monotonic() - asked)
        yield


@pytest.fixture(scope="session")
def services_lock(pytestconfig: pytest.Config) -> services.Lock:
    return pytestconfig.stash[_LOCK]


@pytest.fixture
async def faults(services_lock: services.Lock) -> AsyncIterator[services.Services]:
    """The real PostgreSQL and RabbitMQ to break (fault tests only), restored afterwards."""
    async with services.faults() as value:
        yield value


def _dsn(database: str) -> str:
    return f"{BASE_DSN.rstrip('/')}/{database}"


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(_dsn("postgres"), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {BASE_DSN} ({exc!r}): start it "
            "(`make services` does) before running the integration tests",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def migrated_template(services_lock: services.Lock) -> Iterator[str]:
    """A database with every migration applied, cloned by each test (made and dropped under the
    services lock)."""
    import asyncio

    async def create() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        finally:
            await admin.close()
        settings = config.Settings(
            secret_key=config.Secret(crypto.generate_key()),
            database_url=config.Secret(_dsn(TEMPLATE)),
        )
        await db.migrate(settings)

    async def drop() -> None:
        admin = await _admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())  # in the test that first needs it, which holds the lock
    yield TEMPLATE
    with services_lock.held(exclusive=services_lock.kind == "fault"):
        asyncio.run(drop())  # maybe after the session's last integration test


@pytest.fixture
async def database_url(migrated_template: str) -> AsyncIterator[str]:
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"')
    finally:
        await admin.close()
    yield _dsn(name)
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def amqp_prefix() -> str:
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def settings(
    database_url: str, amqp_prefix: str, secret_key: str
) -> AsyncIterator[config.Settings]:
    """Settings pointing at this test's own database and queues; the queues are deleted after."""
    value = config.Settings(
        secret_key=config.Secret(secret_key),
        database_url=config.Secret(database_url),
        amqp_url=config.Secret(AMQP_URL),
        amqp_prefix=amqp_prefix,
        admin_token=config.Secret("test-admin-token-0123456789"),
    )
    yield value
    try:
        conn = await aio_pika.connect(AMQP_URL, timeout=5)
    except OSError:
        return
    async with conn:
        channel = await conn.channel()
        await amqp.delete_topology(channel, value)


@pytest.fixture
async def pool(settings: config.Settings) -> AsyncIterator[asyncpg.Pool]:
    async with db.pool_for(settings) as value:
        yield value


@pytest.fixture
async def amqp_connection(
    settings: config.Settings,
) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    try:
        async with amqp.connection(settings, name="test") as conn:
            channel = await conn.channel()
            await amqp.declare(channel, settings)
            await channel.close()
            yield conn
    except Exception as exc:
        if "RabbitMQ unavailable" in str(exc):
            pytest.fail(
                f"RabbitMQ is not reachable at {AMQP_URL}: start it (`make services` does)",
                pytrace=False,
            )
        raise


# ------------------------------------------------------------------------------------ upstreams

from relay.sandbox import cegid as cegid_sandbox  # noqa: E402
from relay.sandbox import qonto as qonto_sandbox  # noqa: E402
from tests.integration import factories  # noqa: E402


@pytest.fixture
def qonto() -> Iterator[qonto_sandbox.QontoSandbox]:
    """The Qonto sandbox on a real socket."""
    with qonto_sandbox.QontoSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def loop() -> Iterator[cegid_sandbox.CegidSandbox]:
    """The Cegid Loop sandbox, with one firm owning dossiers ACME001 and OTHER002."""
    with cegid_sandbox.CegidSandbox() as sandbox:
        sandbox.add_firm("firm-key-0001", "firm-secret-0001", dossiers=["ACME001", "OTHER002"])
        yield sandbox


@pytest.fixture
def upstream_settings(
    settings: config.Settings, qonto: qonto_sandbox.QontoSandbox, loop: cegid_sandbox.CegidSandbox
) -> config.Settings:
    """The test's settings pointed at both sandboxes."""
    import dataclasses

    return dataclasses.replace(
        settings,
        qonto_api_url=qonto.url,
        qonto_oauth_url=qonto.oauth_url,
        cegid_api_url=loop.url,
        cegid_subscription_key=config.Secret(loop.subscription_key),
    )


@pytest.fixture
async def connection_id(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> uuid.UUID:
    """A connection made the way `relay connections add` makes it, against the sandboxes."""
    return await factories.connect(upstream_settings, pool, qonto)


@pytest.fixture
async def publisher(
    settings: config.Settings, amqp_connection: aio_pika.abc.AbstractRobustConnection
) -> AsyncIterator[amqp.Publisher]:
    """A confirm channel publishing to the test's queues."""
    value = await amqp.Publisher.open(amqp_connection, settings)
    yield value
    await value.close()
