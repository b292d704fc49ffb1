"""Operators' tools end to end: the dead-letter queue round trip, and `relay demo` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import aio_pika.abc
import pytest

from relay import config, errors
from relay.broker import amqp, dlq


async def _dead_letter(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, body: bytes, dlq_id: str
) -> None:
    publisher = await amqp.Publisher.open(conn, settings)
    await publisher.publish(
        settings.dead_letter_queue,
        body,
        message_id=f"evt-{dlq_id}",
        headers={
            amqp.HEADER_CONNECTION: str(uuid.uuid4()),
            amqp.HEADER_REASON: "not JSON",
            amqp.HEADER_DLQ_ID: dlq_id,
        },
    )
    await publisher.close()


async def test_list_show_replay_and_purge(
    settings: config.Settings, amqp_connection: aio_pika.abc.AbstractRobustConnection
) -> None:
    """Dead letters keep their body and reason; replay sends them back; purge drops them."""
    for name in ("a", "b", "c"):
        await _dead_letter(settings, amqp_connection, f"body {name}".encode(), name)
    listed = await dlq.list_messages(settings, amqp_connection)
    assert sorted(m.id for m in listed) == ["a", "b", "c"]
    shown = await dlq.show(settings, amqp_connection, "b")
    assert shown.body == b"body b"
    assert shown.to_json(with_body=True)["reason"] == "not JSON"
    assert await dlq.replay(settings, amqp_connection, ["a"]) == 1
    assert await dlq.purge(settings, amqp_connection, ["c"]) == 1
    assert [m.id for m in await dlq.list_messages(settings, amqp_connection)] == ["b"]
    channel = await amqp_connection.channel()
    queue = await channel.get_queue(settings.events_queue, ensure=False)
    replayed = await queue.get(no_ack=True, timeout=5)
    assert replayed is not None
    assert replayed.body == b"body a"
    assert amqp.HEADER_REASON not in (replayed.headers or {})
    await channel.close()
    with pytest.raises(errors.NotFound):
        await dlq.show(settings, amqp_connection, "nope")


def test_relay_demo_ends_with_the_report(settings: config.Settings) -> None:
    """`relay demo --json` runs the whole product on its sandboxes and exits 0 with everything right."""
    env = dict(os.environ)
    env["RELAY_DATABASE_URL"] = settings.database_url.reveal()
    env.pop("RELAY_SECRET_KEY", None)  # the demo needs no configuration
    done = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["ok"] is True
    states = {(d["source"], d["state"], d["reason"]) for d in result["documents"]}
    assert ("transaction", "skipped", "unsupported type: HEIC image") in states
    assert ("transaction", "skipped", "deleted before sync") in states
    assert ("supplier_invoice", "uploaded", None) in states
    assert ("client_invoice", "uploaded", None) in states
    assert len(result["loop_received"]) == result["report"]["totals"]["uploaded"]
