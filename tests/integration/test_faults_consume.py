"""`relay consume` under a broker and a database that go away beneath it (fault tests, run apart).

Each test feeds events before, during and after the fault, and checks that every one becomes
exactly one row of ``events`` with no restart by hand; a batch held in the consumer's hand when the
broker goes away is delivered again and found to be a duplicate. An outage longer than
RELAY_OUTAGE_LIMIT ends the process with exit 1 and one line saying why.
"""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aio_pika.abc
import asyncpg
import pytest

from relay import config
from relay.broker import amqp
from relay.store import db
from tests import services
from tests.integration import factories, outages, processes

pytestmark = pytest.mark.fault


@pytest.fixture
async def connection(pool: asyncpg.Pool, settings: config.Settings) -> uuid.UUID:
    return await factories.make_connection(pool, settings)


@pytest.fixture
async def role(
    settings: config.Settings, tmp_path: pathlib.Path
) -> AsyncIterator[Callable[..., Awaitable[processes.Role]]]:
    """Start `relay consume` (info logs) and wait for its subscription; killed at the end."""
    started: list[processes.Role] = []

    async def start(**env: str) -> processes.Role:
        process = processes.Role(
            settings,
            "consume",
            log_path=tmp_path / f"consume-{len(started)}.log",
            env={"RELAY_LOG_LEVEL": "info", **env},
        )
        started.append(process)
        await process.logged("consume_started")
        return process

    yield start
    for process in started:
        process.close()


def _duplicates(process: processes.Role) -> int:
    return sum(int(line.get("duplicate", 0)) for line in process.events("batch_committed"))


def _one_clear_line(process: processes.Role) -> str:
    """The process's one line of its own (not a JSON log line) on standard error."""
    plain = [line for line in process.log_path.read_text().splitlines() if not line.startswith("{")]
    assert len(plain) == 1, process.log()
    assert plain[0].startswith("relay: "), plain
    return plain[0]


@pytest.mark.parametrize("fault", ["rabbitmq_restart", "close_all_connections"])
async def test_the_consumer_comes_back_by_itself_after_rabbitmq_goes_away(
    fault: str,
    settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """RabbitMQ restarted, or every connection closed: the consumer subscribes again by itself; the
    batch it held is delivered again and deduped; events before, in flight and after land once."""
    process = await role()
    before = await outages.publish(settings, connection, 10)
    await outages.until_landed(pool, before, within_s=30)
    async with outages.events_table_locked(settings.database_url.reveal()) as blocked:
        in_flight = await outages.publish(settings, connection, 10)
        await blocked()
        if fault == "rabbitmq_restart":
            await faults.rabbitmq_restart(down_s=2)
        else:
            await faults.rabbitmq_close_connections()
    after = await outages.publish(settings, connection, 10)
    await outages.until_landed(pool, [*before, *in_flight, *after], within_s=30)
    await outages.exactly_once(pool, [*before, *in_flight, *after])
    assert _duplicates(process) >= 1, process.log()  # the held batch came back, a no-op
    assert process.alive()


@pytest.mark.parametrize("fault", ["postgres_restart", "backends_terminated"])
async def test_the_consumer_holds_its_batch_while_postgresql_is_away(
    fault: str,
    settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """PostgreSQL restarted, or the consumer's backends terminated: the batch stays in hand,
    unacknowledged, and is applied once PostgreSQL answers; no retry is used up."""
    process = await role()
    before = await outages.publish(settings, connection, 10)
    await outages.until_landed(pool, before, within_s=30)
    if fault == "postgres_restart":
        await faults.postgres_stop()
        during = await outages.publish(settings, connection, 10)
        await process.logged("consume_holding_batch")
        await faults.postgres_start()
    else:
        async with outages.events_table_locked(settings.database_url.reveal()) as blocked:
            during = await outages.publish(settings, connection, 10)
            await blocked()
            await faults.postgres_terminate(db.database_name(settings.database_url.reveal()))
            await process.logged("consume_holding_batch")
    after = await outages.publish(settings, connection, 10)
    await outages.until_landed(pool, [*before, *during, *after], within_s=30)
    await outages.exactly_once(pool, [*before, *during, *after])
    assert not process.events("event_retried"), process.log()
    assert process.alive()


@pytest.mark.parametrize("service", ["RabbitMQ", "PostgreSQL"])
async def test_an_outage_past_the_limit_ends_the_consumer_with_exit_1_and_loses_nothing(
    service: str,
    settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """RELAY_OUTAGE_LIMIT=3: RabbitMQ or PostgreSQL away longer than that, the consumer exits 1 with
    one line naming the service (for its supervisor to restart it); nothing it held is lost."""
    process = await role(RELAY_OUTAGE_LIMIT="3")
    if service == "RabbitMQ":
        await faults.rabbitmq_stop()
        held: list[str] = []
    else:
        await faults.postgres_stop()
        held = await outages.publish(settings, connection, 5)
    assert await process.exit_code(within_s=30) == 1
    line = _one_clear_line(process)
    assert f"{service} unavailable for more than 3 s (RELAY_OUTAGE_LIMIT)" in line, line
    await faults.restore()
    await role()
    after = await outages.publish(settings, connection, 5)
    await outages.until_landed(pool, [*held, *after], within_s=30)
    await outages.exactly_once(pool, [*held, *after])


@pytest.mark.parametrize("cancel", ["received", "lost", "lost_beside_another_consumer"])
async def test_a_subscription_cancelled_or_silently_gone_is_made_again(
    cancel: str,
    settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """The events queue deleted under the consumer: when RabbitMQ's basic.cancel reaches it, it
    subscribes again at once; when the cancel is lost on the way and the queue is declared again,
    the check of the queue every few seconds finds the subscription gone (no consumer, or, beside
    another consumer, messages waiting that nobody delivers to it) and it subscribes again."""
    async with outages.AmqpProxy() as proxy:
        if cancel != "received":
            proxy.drop.add(outages.BASIC_CANCEL)
        process = await role(RELAY_AMQP_URL=proxy.url(settings))
        before = await outages.publish(settings, connection, 5)
        await outages.until_landed(pool, before, within_s=30)
        async with contextlib.AsyncExitStack() as stack:
            broker = await stack.enter_async_context(
                await aio_pika.connect(settings.amqp_url.reveal(), timeout=5)
            )
            channel = await broker.channel()
            await channel.queue_delete(settings.events_queue)
            if cancel == "received":
                lost = await process.logged("consume_connection_lost")
                assert "cancelled the subscription" in lost["reason"], lost
            else:
                await factories.until(lambda: proxy.dropped == 1, what="the cancel dropped")
                await amqp.declare(channel, settings)
            if cancel == "lost_beside_another_consumer":  # takes one message and sits on it
                await channel.set_qos(prefetch_count=1)
                queue = await channel.get_queue(settings.events_queue, ensure=False)
                await queue.consume(_keep)
            after = await outages.publish(settings, connection, 5)
            await process.logged("consume_resubscribed")
        if cancel != "received":
            [found] = process.events("consume_subscription_lost")
            expected = "no consumer" if cancel == "lost" else "none delivered to this consumer"
            assert expected in found["reason"], found
        await outages.until_landed(pool, [*before, *after], within_s=30)
        await outages.exactly_once(pool, [*before, *after])


async def _keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that never settles what it is given."""


async def test_a_network_pause_is_noticed_and_the_consumer_comes_back(
    settings: config.Settings,
    pool: asyncpg.Pool,
    connection: uuid.UUID,
    faults: services.Services,
    role: Callable[..., Awaitable[processes.Role]],
) -> None:
    """No byte between the consumer and RabbitMQ for several seconds: the unanswered check ends the
    connection, the consumer connects again once the network is back; nothing lost or doubled."""
    async with outages.AmqpProxy() as proxy:
        process = await role(RELAY_AMQP_URL=proxy.url(settings))
        before = await outages.publish(settings, connection, 5)
        await outages.until_landed(pool, before, within_s=30)
        async with outages.events_table_locked(settings.database_url.reveal()) as blocked:
            during = await outages.publish(settings, connection, 5)
            await blocked()
            proxy.pause()
        lost = await process.logged("consume_connection_lost")
        assert "could not be checked" in lost["reason"], lost
        proxy.resume()
        after = await outages.publish(settings, connection, 5)
        await outages.until_landed(pool, [*before, *during, *after], within_s=30)
        await outages.exactly_once(pool, [*before, *during, *after])
