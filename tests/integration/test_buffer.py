"""The consumer on the real RabbitMQ and PostgreSQL: commit before ack, dedupe, DLQ, retries, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aio_pika.abc
import asyncpg
import orjson
import pytest

from consumers import buffer, consume
from relay import config, errors, models
from relay.broker import amqp, dlq
from relay.domain import connections
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from relay.upstreams import qonto as qonto_client
from tests.integration import factories, outages


@pytest.fixture
async def consumer(upstream_settings: config.Settings) -> AsyncIterator[asyncio.Event]:
    """`relay consume` running in this loop until the test ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(consume.consume(upstream_settings, stop=stop))
    yield stop
    stop.set()
    await asyncio.wait_for(task, 15)


async def _publish(
    publisher: amqp.Publisher,
    connection_id: uuid.UUID,
    event: dict[str, Any] | bytes,
    **headers: Any,
) -> None:
    body = event if isinstance(event, bytes) else orjson.dumps(event)
    event_id = event["id"] if isinstance(event, dict) else str(uuid.uuid4())
    await publisher.publish(
        publisher.events_queue,
        body,
        message_id=str(event_id),
        headers={amqp.HEADER_CONNECTION: str(connection_id), **headers},
    )


async def _count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    return int(await pool.fetchval(sql, *args))


async def _wait_count(pool: asyncpg.Pool, sql: str, expected: int, *args: Any) -> None:
    counts = {"n": -1}

    async def reached() -> bool:
        counts["n"] = await _count(pool, sql, *args)
        return counts["n"] >= expected

    await factories.until(
        reached, within_s=10, what=lambda: f"{sql}: {expected} rows (found {counts['n']})"
    )


async def _dead_letters(
    settings: config.Settings, conn: aio_pika.abc.AbstractConnection, n: int
) -> list[dlq.DeadLetter]:
    found: list[dlq.DeadLetter] = []

    async def enough() -> bool:
        found[:] = await dlq.list_messages(settings, conn)
        return len(found) >= n

    await factories.until(enough, within_s=5, what=lambda: f"{n} dead letters (found {len(found)})")
    return found


async def test_transaction_events_become_pending_documents(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """One pending document per attachment: PURCHASE for a debit, SALE for a credit."""
    debit, _ = factories.receipt(qonto, seed=1)
    two = qonto.add_transaction(
        side="credit",
        amount="10",
        label="CLIENT",
        attachment_ids=[
            qonto.add_attachment(
                files.pdf(seed=2), file_name="a.pdf", content_type="application/pdf"
            ),
            qonto.add_attachment(
                files.pdf(seed=3), file_name="b.pdf", content_type="application/pdf"
            ),
        ],
    )
    await _publish(publisher, connection_id, qonto.transaction_event(debit))
    await _publish(publisher, connection_id, qonto.transaction_event(two))
    await _wait_count(pool, "SELECT count(*) FROM documents", 3)
    rows = await pool.fetch(
        "SELECT qonto_resource_id, direction, state, source FROM documents ORDER BY id"
    )
    assert [(r["qonto_resource_id"], r["direction"]) for r in rows] == [
        (debit["id"], "PURCHASE"),
        (two["id"], "SALE"),
        (two["id"], "SALE"),
    ]
    assert {r["state"] for r in rows} == {"pending"}
    assert {r["source"] for r in rows} == {"transaction"}


async def test_duplicate_deliveries_and_events_are_no_ops(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The same event delivered three times, and another event with the same snapshot: one document."""
    tx, _ = factories.receipt(qonto)
    event = qonto.transaction_event(tx)
    for _ in range(3):
        await _publish(publisher, connection_id, event)
    await _publish(publisher, connection_id, qonto.transaction_event(tx))
    await _wait_count(pool, "SELECT count(*) FROM events", 2)
    await _wait_count(pool, "SELECT count(*) FROM documents", 1)
    assert await _count(pool, "SELECT count(*) FROM documents") == 1
    assert await _count(pool, "SELECT count(*) FROM events") == 2


async def test_attachment_removed_before_the_flush_is_skipped(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """An attachment that disappears from a later event becomes skipped, deleted before sync."""
    keep = qonto.add_attachment(
        files.pdf(seed=1), file_name="k.pdf", content_type="application/pdf"
    )
    drop = qonto.add_attachment(
        files.pdf(seed=2), file_name="d.pdf", content_type="application/pdf"
    )
    tx = qonto.add_transaction(side="debit", amount="5", label="X", attachment_ids=[keep, drop])
    first = qonto.transaction_event(tx)
    later = qonto.transaction_event(qonto.update_transaction(tx["id"], attachment_ids=[keep]))
    await _publish(publisher, connection_id, first)
    await _wait_count(pool, "SELECT count(*) FROM documents", 2)
    await _publish(publisher, connection_id, later)
    late = {**first, "id": str(uuid.uuid4())}  # the older snapshot, delivered late
    await _publish(publisher, connection_id, late)
    await _wait_count(pool, "SELECT count(*) FROM events", 3)
    found = await factories.states(pool)
    assert found == {keep: "pending", drop: "skipped"}
    reason = await pool.fetchval(
        "SELECT reason FROM documents WHERE qonto_attachment_id = $1", drop
    )
    assert reason == models.SKIP_DELETED
    outcome = await pool.fetchval("SELECT outcome FROM events WHERE event_id = $1", late["id"])
    assert outcome == "stale"


@pytest.mark.parametrize("newer_first", [False, True], ids=["older-first", "newer-first"])
@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "two-batches"])
async def test_a_removed_attachment_is_listed_whatever_the_batching_and_order_of_events(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    qonto: qonto_sandbox.QontoSandbox,
    newer_first: bool,
    one_batch: bool,
) -> None:
    """A transaction event, then one removing an attachment: the removed file is listed, skipped
    as deleted before sync, whether the consumer takes both in one batch or in two, in either
    order; the older event is recorded as stale when the newer one came first or with it."""
    keep = qonto.add_attachment(
        files.pdf(seed=1), file_name="k.pdf", content_type="application/pdf"
    )
    drop = qonto.add_attachment(
        files.pdf(seed=2), file_name="d.pdf", content_type="application/pdf"
    )
    tx = qonto.add_transaction(side="debit", amount="5", label="X", attachment_ids=[keep, drop])
    older = qonto.transaction_event(tx)
    newer = qonto.transaction_event(qonto.update_transaction(tx["id"], attachment_ids=[keep]))
    for event in [newer, older] if newer_first else [older, newer]:
        await _publish(publisher, connection_id, event)
    for size in [2] if one_batch else [1, 1]:
        await factories.process_from_queue(
            upstream_settings, amqp_connection, pool, publisher, size
        )
    assert await factories.states(pool) == {keep: "pending", drop: "skipped"}
    reason = await pool.fetchval(
        "SELECT reason FROM documents WHERE qonto_attachment_id = $1", drop
    )
    assert reason == models.SKIP_DELETED
    outcomes = {r["event_id"]: r["outcome"] for r in await pool.fetch("SELECT * FROM events")}
    assert outcomes[str(newer["id"])] == "applied"
    assert outcomes[str(older["id"])] == ("applied" if not (newer_first or one_batch) else "stale")


async def test_client_invoices_paid_or_unpaid_are_sales_drafts_are_nothing(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A paid invoice without attachment_id in the payload is re-fetched; a draft creates nothing."""
    pdf = qonto.add_attachment(
        files.pdf(seed=4), file_name="F-1.pdf", content_type="application/pdf"
    )
    paid = qonto.add_client_invoice(attachment_id=pdf, status="paid", total="120.00")
    draft = qonto.add_client_invoice(
        attachment_id=qonto.add_attachment(
            files.pdf(seed=5), file_name="F-2.pdf", content_type="application/pdf"
        ),
        status="draft",
        total="99.00",
    )
    await _publish(
        publisher, connection_id, qonto.client_invoice_event(paid, with_attachment_id=False)
    )
    draft_event = qonto.client_invoice_event(draft, with_attachment_id=True)
    await _publish(publisher, connection_id, draft_event)
    await _wait_count(pool, "SELECT count(*) FROM events", 2)
    rows = await pool.fetch("SELECT qonto_attachment_id, direction, source FROM documents")
    assert [(r["qonto_attachment_id"], r["direction"], r["source"]) for r in rows] == [
        (pdf, "SALE", "client_invoice")
    ]
    outcome = await pool.fetchval(
        "SELECT outcome FROM events WHERE event_id = $1", draft_event["id"]
    )
    assert outcome == "not_a_document"


async def test_unusable_messages_go_to_the_dead_letter_queue_with_a_reason(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """Not JSON, an unknown version of a used topic, an unknown connection: DLQ, body kept."""
    future = {"id": "evt-v2", "type": "v2/transactions", "data": {"id": "t"}}
    await _publish(publisher, connection_id, b"definitely not json")
    await _publish(publisher, connection_id, future)
    await _publish(
        publisher, uuid.uuid4(), {"id": "evt-x", "type": "v1/transactions", "data": {"id": "t"}}
    )
    await _publish(publisher, connection_id, {"id": "evt-card", "type": "v1/cards", "data": {}})
    letters = await _dead_letters(upstream_settings, amqp_connection, 3)
    reasons = sorted(letter.reason for letter in letters)
    assert reasons == [
        "not JSON",
        "unknown connection",
        "unknown version of a used topic: v2/transactions (this relay knows v1)",
    ]
    assert any(letter.body == orjson.dumps(future) for letter in letters)
    await _wait_count(pool, "SELECT count(*) FROM events WHERE outcome = 'ignored_topic'", 1)


async def test_consent_revocation_marks_the_connection_revoked(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The organization revoked the relay's access: the connection is revoked, with the date."""
    await _publish(publisher, connection_id, qonto.consent_revocation_event())
    await _wait_count(pool, "SELECT count(*) FROM connections WHERE state = 'revoked'", 1)
    reason = await pool.fetchval("SELECT state_reason FROM connections")
    assert reason.startswith("consent revoked in Qonto at ")


async def test_database_down_settles_nothing_and_the_batch_is_applied_once_it_is_back(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    qonto: qonto_sandbox.QontoSandbox,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """With PostgreSQL gone the batch is settled in no way (no retry used up, nothing
    dead-lettered, not even a message at its last retry): it stays for the consumer to apply again;
    back in the queue, it lands once."""
    tx, attachment = factories.receipt(qonto)
    await _publish(publisher, connection_id, qonto.transaction_event(tx))
    exhausted, last = factories.receipt(qonto, seed=9)
    await _publish(
        publisher,
        connection_id,
        qonto.transaction_event(exhausted),
        **{amqp.HEADER_ATTEMPTS: len(amqp.RETRY_DELAYS_S)},
    )
    dead = await asyncpg.create_pool(
        upstream_settings.database_url.reveal(), min_size=1, max_size=1
    )
    await dead.close()
    with pytest.raises(errors.DatabaseUnavailable):  # the channel closes: both go back
        await factories.process_from_queue(upstream_settings, amqp_connection, dead, publisher, 2)
    stop = asyncio.Event()
    task = asyncio.create_task(consume.consume(upstream_settings, stop=stop))
    try:
        await _wait_count(
            pool,
            "SELECT count(*) FROM documents WHERE qonto_attachment_id = ANY($1::text[])",
            2,
            [attachment, last],
        )
    finally:
        stop.set()
        await task
    assert await _count(pool, "SELECT count(*) FROM events") == 2
    assert await dlq.list_messages(upstream_settings, amqp_connection) == []


async def test_a_consumer_killed_mid_stream_loses_nothing(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """SIGKILL while draining 1,500 events, then a new consumer: every event exactly once."""
    attachments = []
    for i in range(1500):
        attachment = str(uuid.uuid4())
        attachments.append(attachment)
        event = {
            "id": f"evt-{i}",
            "type": "v1/transactions",
            "created_at": "2026-11-23T10:00:00Z",
            "data": {
                "id": f"tx-{i}",
                "side": "debit",
                "amount": 1,
                "attachment_ids": [attachment],
                "updated_at": "2026-11-23T10:00:00Z",
            },
        }
        await _publish(publisher, connection_id, event)
    env = {**os.environ, **factories.environment(upstream_settings)}
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, then only signalled
        [sys.executable, "-m", "relay", "consume"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_count(pool, "SELECT count(*) FROM events", 200)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    landed = await _count(pool, "SELECT count(*) FROM events")
    assert landed < 1500, "the consumer finished before it was killed: the test proves nothing"
    stop = asyncio.Event()
    task = asyncio.create_task(consume.consume(upstream_settings, stop=stop))
    try:
        await _wait_count(pool, "SELECT count(*) FROM events", 1500)
    finally:
        stop.set()
        await task
    assert await _count(pool, "SELECT count(*) FROM events") == 1500
    assert await _count(pool, "SELECT count(DISTINCT qonto_attachment_id) FROM documents") == 1500
    assert await _count(pool, "SELECT count(*) FROM documents") == 1500


async def test_events_for_a_disconnected_connection_are_recorded_not_applied(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A disconnected connection's events are recorded as connection_inactive: no documents."""
    await connections.disconnect(pool, connection_id)
    tx, _ = factories.receipt(qonto)
    event = qonto.transaction_event(tx)
    await _publish(publisher, connection_id, event)
    await _wait_count(pool, "SELECT count(*) FROM events", 1)
    outcome = await pool.fetchval("SELECT outcome FROM events WHERE event_id = $1", event["id"])
    assert outcome == "connection_inactive"
    assert await _count(pool, "SELECT count(*) FROM documents") == 0


async def test_a_client_invoice_deleted_in_qonto_is_recorded_as_not_found(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
) -> None:
    """The re-fetch of a client invoice answers 404: event recorded invoice_not_found, no document."""
    event = {
        "id": "evt-gone",
        "type": "v1/client-invoices",
        "created_at": "2026-11-23T10:00:00Z",
        "data": {"id": str(uuid.uuid4()), "status": "paid", "number": "F-1"},
    }
    await _publish(publisher, connection_id, event)
    await _wait_count(pool, "SELECT count(*) FROM events", 1)
    assert await pool.fetchval("SELECT outcome FROM events") == "invoice_not_found"
    assert await _count(pool, "SELECT count(*) FROM documents") == 0


async def test_qonto_unavailable_during_a_re_fetch_retries_the_event_later(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Qonto rate-limits every try of the re-fetch: the event waits in the delay queue, then lands."""
    pdf = qonto.add_attachment(files.pdf(seed=6), file_name="F.pdf", content_type="application/pdf")
    invoice = qonto.add_client_invoice(attachment_id=pdf, status="unpaid", total="50.00")
    path = f"/v2/client_invoices/{invoice['id']}"
    qonto.faults.fail_next(path, 429, count=qonto_client.POLICY.attempts, retry_after=0)
    await _publish(publisher, connection_id, qonto.client_invoice_event(invoice))
    await _wait_count(pool, "SELECT count(*) FROM documents", 1)
    fetches = [r for r in list(qonto.requests) if r[1] == path]
    assert len(fetches) == qonto_client.POLICY.attempts + 1  # one failed event, one retry
    assert await pool.fetchval("SELECT qonto_attachment_id FROM documents") == pdf
    assert await pool.fetchval("SELECT outcome FROM events") == "applied"


async def test_an_event_failing_on_every_retry_is_dead_lettered_with_the_last_reason(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Qonto down for good: one try per delay, then the DLQ with the reason; nothing recorded."""
    pdf = qonto.add_attachment(files.pdf(seed=7), file_name="G.pdf", content_type="application/pdf")
    invoice = qonto.add_client_invoice(attachment_id=pdf, status="paid", total="70.00")
    path = f"/v2/client_invoices/{invoice['id']}"
    qonto.faults.fail_next(path, 429, count=1000, retry_after=0)
    event = qonto.client_invoice_event(invoice)
    await _publish(publisher, connection_id, event)
    stop = asyncio.Event()
    task = asyncio.create_task(consume.consume(upstream_settings, stop=stop, retry_delays=(1, 1)))
    try:
        [letter] = await _dead_letters(upstream_settings, amqp_connection, 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert letter.event_id == event["id"]
    assert letter.reason.startswith("still failing after 2 retries: Qonto")
    assert letter.first_failed_at is not None
    assert letter.failed_at is not None
    assert letter.first_failed_at < letter.failed_at  # the first try, two retries of 1 s before
    assert letter.body == orjson.dumps(event)
    fetches = [r for r in list(qonto.requests) if r[1] == path]
    assert (
        len(fetches) == 3 * qonto_client.POLICY.attempts
    )  # the first try and two retries, no more
    assert await _count(pool, "SELECT count(*) FROM events") == 0


def _transaction_event(n: int, attachment: str, **data: Any) -> dict[str, Any]:
    return {
        "id": f"evt-{n}",
        "type": "v1/transactions",
        "created_at": "2026-11-23T10:00:00Z",
        "data": {
            "id": f"tx-{n}",
            "side": "debit",
            "amount": 1,
            "attachment_ids": [attachment],
            "updated_at": "2026-11-23T10:00:00Z",
            **data,
        },
    }


async def test_nul_characters_in_an_event_are_removed_and_the_consumer_goes_on(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
) -> None:
    """JSON \\u0000 in values and keys (PostgreSQL stores neither): stripped, event applied."""
    body = (
        orjson.dumps(_transaction_event(1, "att-1", label="LE PETIT ZINC", note={"tag": "x"}))
        .replace(b"LE PETIT", b"LE\\u0000 PETIT")
        .replace(b'"tag"', b'"t\\u0000ag"')
    )
    body = body.replace(b'"evt-1"', b'"evt\\u0000-1"').replace(b'"att-1"', b'"att-\\u00001"')
    assert b"\\u0000" in body
    await _publish(publisher, connection_id, body)
    await _publish(publisher, connection_id, _transaction_event(2, "att-2"))
    await _wait_count(pool, "SELECT count(*) FROM documents", 2)
    rows = await pool.fetch("SELECT qonto_attachment_id, counterparty FROM documents ORDER BY id")
    assert [(r["qonto_attachment_id"], r["counterparty"]) for r in rows] == [
        ("att-1", "LE PETIT ZINC"),
        ("att-2", None),
    ]
    payload = await pool.fetchval("SELECT payload FROM events WHERE event_id = 'evt-1'")
    assert payload["data"]["note"] == {"tag": "x"}


async def test_a_record_postgresql_refuses_is_dead_lettered_alone_and_the_rest_applied(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """One message of a batch PostgreSQL cannot store: the others are applied, it alone goes to the
    dead-letter queue with PostgreSQL's reason, and every message is settled."""
    poison = orjson.dumps(_transaction_event(2, "att-2", extra="NUMBER")).replace(
        b'"NUMBER"',
        b"1e-20000",  # valid JSON, a number jsonb cannot hold
    )
    await _publish(publisher, connection_id, _transaction_event(1, "att-1"))
    await _publish(publisher, connection_id, poison)
    await _publish(publisher, connection_id, _transaction_event(3, "att-3"))
    counts = await factories.process_from_queue(
        upstream_settings, amqp_connection, pool, publisher, 3
    )
    assert counts == {"applied": 2, "dead_lettered": 1}
    assert await factories.states(pool) == {"att-1": "pending", "att-3": "pending"}
    events_ids = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM events")}
    assert events_ids == {"evt-1", "evt-3"}
    [letter] = await _dead_letters(upstream_settings, amqp_connection, 1)
    assert letter.body == poison
    assert letter.reason.startswith(
        "apply event: PostgreSQL refused the data (NumericValueOutOfRangeError"
    )
    channel = await amqp_connection.channel()
    try:  # nothing left unacknowledged: the closed channel handed nothing back
        declared = await channel.declare_queue(upstream_settings.events_queue, passive=True)
        assert declared.declaration_result.message_count == 0
    finally:
        await channel.close()


async def test_a_graceful_stop_hands_no_delivered_message_back(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """Stopped during a backlog, the consumer processes what it had prefetched instead of handing it
    back (each hand-back counts toward the delivery limit); the rest was never delivered."""
    total = 1000
    for i in range(total):
        await _publish(publisher, connection_id, _transaction_event(i, f"att-{i}"))
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume.consume(upstream_settings, stop=stop, prefetch=64, batch_size=16)
    )
    try:
        await _wait_count(pool, "SELECT count(*) FROM events", 1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    landed = await _count(pool, "SELECT count(*) FROM events")
    channel = await amqp_connection.channel()
    try:
        queue = await channel.get_queue(upstream_settings.events_queue, ensure=False)
        left = []
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            left.append(message)
    finally:
        await channel.close()
    assert left, "the consumer drained the whole backlog before the stop: the test proves nothing"
    assert landed + len(left) == total
    handed_back = [m.message_id for m in left if m.redelivered]
    assert handed_back == []


async def test_the_consumer_keeps_its_progress_for_the_heartbeat(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    upstream_settings: config.Settings,
) -> None:
    """Progress: subscribed while it consumes; while a batch waits, the messages in hand and the
    oldest one's x-received-at-ms; once settled, their count and the time of the last work."""
    progress = consume.Progress()
    stop = asyncio.Event()
    task = asyncio.create_task(consume.consume(upstream_settings, stop=stop, progress=progress))
    try:
        await factories.until(lambda: progress.subscribed, what="subscribed")
        async with outages.events_table_locked(upstream_settings.database_url.reveal()) as blocked:
            for i in range(3):
                await _publish(
                    publisher,
                    connection_id,
                    _transaction_event(i, f"att-{i}"),
                    **{amqp.HEADER_RECEIVED_AT: 1_000 + i},
                )
            await blocked()
            await factories.until(lambda: progress.in_hand == 3, what="3 messages in hand")
            assert progress.oldest_held_ms == 1_000
            assert (progress.events, progress.last_work_at) == (0, None)
        await factories.until(lambda: progress.events == 3, what="3 messages settled")
        assert (progress.in_hand, progress.oldest_held_ms) == (0, None)
        assert progress.last_work_at is not None
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert not progress.subscribed


def test_retry_delays_must_be_declared_delay_queues(unit_settings: config.Settings) -> None:
    """A retry delay without its delay queue is refused at start (the message would be lost)."""
    with pytest.raises(errors.ConfigurationError):
        buffer.Buffer(unit_settings, None, None, None, retry_delays=(2,))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- events batched by the intake


async def _together(
    publisher: amqp.Publisher,
    events: list[tuple[uuid.UUID, bytes, str]],
    *,
    max_events: int = 32,
) -> tuple[list[object], list[int]]:
    """Publish the events at once through a Batcher with one publish in flight, as the intake does
    under load; each one's outcome (None, or the error), and the events of each confirmed message."""
    sent: list[int] = []
    batcher = amqp.Batcher(publisher, in_flight=1, max_events=max_events, on_sent=sent.append)
    outcomes = await asyncio.gather(
        *(
            batcher.publish_event(body, connection_id=str(connection), event_id=event_id)
            for connection, body, event_id in events
        ),
        return_exceptions=True,
    )
    return outcomes, sent


def _anonymous(count: int) -> list[tuple[uuid.UUID, bytes, str]]:
    return [(uuid.uuid4(), b"{}", f"evt-{n}") for n in range(count)]


async def _batched(publisher: amqp.Publisher, events: list[tuple[uuid.UUID, bytes, str]]) -> None:
    """Publish the events as the intake does under load: the first alone, the rest in one batch."""
    outcomes, sent = await _together(publisher, events)
    assert outcomes == [None] * len(events)
    assert sent == [1, len(events) - 1]


async def test_a_batch_holds_at_most_max_events(publisher: amqp.Publisher) -> None:
    """Events waiting for a free publish go out in messages of at most ``max_events``, in order."""
    outcomes, sent = await _together(publisher, _anonymous(8), max_events=3)
    assert outcomes == [None] * 8
    assert sent == [1, 3, 3, 1]


async def test_a_batch_of_events_is_split_and_each_event_applied_or_dead_lettered_alone(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    consumer: asyncio.Event,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """Each event of a batch message gets its own fate: applied, duplicate, or dead-lettered in
    the one-event format with its own id and connection; the batch is acknowledged once."""
    receipts = [factories.receipt(qonto, seed=seed)[0] for seed in (11, 12, 13)]
    bodies = [orjson.dumps(qonto.transaction_event(tx)) for tx in receipts]
    ids = [str(orjson.loads(body)["id"]) for body in bodies]
    stranger = uuid.uuid4()
    lost = orjson.dumps({"id": "evt-lost", "type": "v1/transactions", "data": {"id": "t"}})
    await _batched(
        publisher,
        [
            (connection_id, bodies[0], ids[0]),
            (connection_id, bodies[1], ids[1]),
            (stranger, lost, "evt-lost"),
            (connection_id, bodies[2], ids[2]),
            (connection_id, bodies[1], ids[1]),  # sent twice by Qonto
        ],
    )
    await _wait_count(pool, "SELECT count(*) FROM documents", 3)
    [letter] = await _dead_letters(upstream_settings, amqp_connection, 1)
    assert (letter.event_id, letter.connection_id, letter.reason, letter.body) == (
        "evt-lost",
        str(stranger),
        "unknown connection",
        lost,
    )
    rows = await pool.fetch("SELECT event_id, outcome FROM events")
    assert sorted((r["event_id"], r["outcome"]) for r in rows) == sorted(
        (event_id, "applied") for event_id in ids
    )
    rows = await pool.fetch("SELECT qonto_resource_id FROM documents ORDER BY id")
    assert [r["qonto_resource_id"] for r in rows] == [tx["id"] for tx in receipts]


async def test_a_batch_that_cannot_be_queued_fails_every_webhook_in_it(
    publisher: amqp.Publisher,
) -> None:
    """No event of an unconfirmed batch is reported queued (each webhook gets its 503)."""
    await publisher.channel.close()
    outcomes, sent = await _together(publisher, _anonymous(5))
    assert all(isinstance(outcome, errors.BrokerUnavailable) for outcome in outcomes)
    assert sent == []  # no message confirmed


async def test_a_batch_the_broker_dead_letters_is_listed_and_replayed_whole(
    connection_id: uuid.UUID,
    publisher: amqp.Publisher,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """A batch past its delivery limit lands in the dead-letter queue as one message: listed as
    such, replayed whole, and its events are then applied."""
    receipts = [factories.receipt(qonto, seed=seed)[0] for seed in (21, 22)]
    bodies = [orjson.dumps(qonto.transaction_event(tx)) for tx in receipts]
    listed = [
        {
            "id": str(orjson.loads(body)["id"]),
            "connection": str(connection_id),
            "received_at_ms": 1,
            "size": len(body),
        }
        for body in bodies
    ]
    await publisher.publish(
        upstream_settings.dead_letter_queue,
        b"".join(bodies),
        message_id="batch-1",
        headers={amqp.HEADER_BATCH: listed, "x-death": [{"reason": "delivery_limit"}]},
    )
    [letter] = await _dead_letters(upstream_settings, amqp_connection, 1)
    assert (letter.id, letter.event_id, letter.topic) == (
        "batch-1",
        None,
        "2 events in one message",
    )
    assert letter.to_json()["events"] == [
        {"event_id": e["id"], "connection_id": str(connection_id)} for e in listed
    ]
    assert await dlq.replay(upstream_settings, amqp_connection, ["batch-1"]) == 1
    counts = await factories.process_from_queue(
        upstream_settings, amqp_connection, pool, publisher, 1
    )
    assert counts == {"applied": 2}
    assert await _count(pool, "SELECT count(*) FROM documents") == 2


async def test_the_consumer_bounds_its_batches_in_events_not_messages(
    publisher: amqp.Publisher,
    upstream_settings: config.Settings,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    """A batch message counts as many events as it holds toward the consumer's batch size."""
    _, sent = await _together(publisher, _anonymous(4))
    assert sent == [1, 3]
    await _publish(publisher, uuid.uuid4(), {"id": "evt-last", "type": "v1/cards"})
    channel = await amqp_connection.channel()
    try:
        queue = await channel.get_queue(upstream_settings.events_queue, ensure=False)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        for _ in range(3):
            message = await queue.get(no_ack=True, timeout=5)
            assert message is not None
            inbox.put_nowait(message)
        batch = await consume._gather(inbox, [], 3, 0.1)
        assert [amqp.events_in(m.headers) for m in batch] == [1, 3]
        assert inbox.qsize() == 1
    finally:
        await channel.close()
