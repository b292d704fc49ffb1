"""What the topology relies on, measured on the real RabbitMQ rather than assumed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import aio_pika.abc
import pytest

from relay import config, errors
from relay.broker import amqp
from tests.integration.conftest import AMQP_URL


@pytest.fixture
async def broker() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    async with await aio_pika.connect(AMQP_URL, timeout=5) as conn:
        yield conn


async def _deliver_and_hand_back(
    broker: aio_pika.abc.AbstractConnection, queue_name: str, how: str
) -> None:
    """Take the message with a subscription on a channel of its own, then hand it back."""
    channel = await broker.channel()
    queue = await channel.get_queue(queue_name, ensure=False)
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(inbox.put)
    await asyncio.wait_for(inbox.get(), 5)
    if how == "cancel-and-close":
        await queue.cancel(tag)
    await channel.close()  # the unacknowledged message goes back to the queue


@pytest.mark.parametrize("how", ["close", "cancel-and-close"])
async def test_a_message_handed_back_by_a_closing_channel_counts_as_a_delivery(
    broker: aio_pika.abc.AbstractConnection, how: str
) -> None:
    """A quorum queue counts unacknowledged messages returned by a closed channel toward its
    delivery limit (measured: why a stopping consumer processes its prefetched messages instead)."""
    name = f"test.limit.{uuid.uuid4().hex[:12]}"
    channel = await broker.channel()
    queue = await channel.declare_queue(
        name, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 1}
    )
    try:
        await channel.default_exchange.publish(aio_pika.Message(b"m"), routing_key=name)
        await _deliver_and_hand_back(broker, name, how)  # delivery count 1: within the limit
        await _deliver_and_hand_back(broker, name, how)  # 2 > 1: dropped (no dead-letter route)
        count = -1
        for _ in range(250):
            declared = await channel.declare_queue(name, passive=True)
            count = declared.declaration_result.message_count
            if count == 0:
                break
            await asyncio.sleep(0.02)
        assert count == 0
    finally:
        await queue.delete(if_unused=False, if_empty=False)


async def test_a_queue_declared_with_other_arguments_is_a_configuration_error(
    settings: config.Settings, broker: aio_pika.abc.AbstractConnection
) -> None:
    """An existing deployment's dead-letter queue declared as a quorum queue (before this version):
    the relay refuses to start with a message naming the queue, not 'RabbitMQ unavailable'."""
    channel = await broker.channel()
    await channel.declare_queue(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    with pytest.raises(errors.ConfigurationError, match=settings.dead_letter_queue):
        await amqp.declare(await broker.channel(), settings)
