"""Consumer: drain 50,000 queued events into PostgreSQL with `relay consume`, beside the database's
own ceiling for that work (COPY of the same event and document rows)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import orjson

from bench import common
from relay.broker import amqp

EVENTS = 50_000


async def preload(
    settings: common.config.Settings, connection_id: uuid.UUID, count: int
) -> list[bytes]:
    bodies = [common.event_body(i) for i in range(count)]
    async with amqp.connection(settings, name="bench-preload") as conn:
        publisher = await amqp.Publisher.open(conn, settings)
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(
                    publisher.publish_event(
                        body,
                        connection_id=str(connection_id),
                        event_id=orjson.loads(body)["id"],
                        timeout=30,
                    )
                    for body in bodies[start : start + 1000]
                )
            )
        await publisher.close()
    return bodies


async def copy_ceiling(
    pool: common.asyncpg.Pool, connection_id: uuid.UUID, bodies: list[bytes]
) -> float:
    """Seconds for COPY of the same rows the consumer writes: one event and one document each."""
    events, documents = [], []
    now = dt.datetime.now(dt.UTC)
    for body in bodies:
        event = orjson.loads(body)
        data = event["data"]
        events.append(
            (
                connection_id,
                "copy-" + event["id"],
                event["type"],
                "applied",
                now,
                now,
                body.decode(),
            )
        )
        documents.append(
            (
                connection_id,
                "transaction",
                data["id"],
                "copy-" + data["attachment_ids"][0],
                "PURCHASE",
                "pending",
                dt.date(2026, 11, 22),
                data["label"],
                str(data["amount"]),
                "EUR",
            )
        )
    async with pool.acquire() as conn:
        started = time.perf_counter()
        async with conn.transaction():
            # jsonb has no binary COPY encoder here: COPY the text, cast in one INSERT ... SELECT
            await conn.execute(
                "CREATE TEMP TABLE events_in (connection_id uuid, event_id text, topic text,"
                " outcome text, qonto_created_at timestamptz, received_at timestamptz, payload text)"
                " ON COMMIT DROP"
            )
            await conn.copy_records_to_table("events_in", records=events)
            await conn.execute(
                "INSERT INTO events (connection_id, event_id, topic, outcome, qonto_created_at,"
                " received_at, payload) SELECT connection_id, event_id, topic, outcome,"
                " qonto_created_at, received_at, payload::jsonb FROM events_in"
            )
            await conn.copy_records_to_table(
                "documents",
                records=documents,
                columns=[
                    "connection_id",
                    "source",
                    "qonto_resource_id",
                    "qonto_attachment_id",
                    "direction",
                    "state",
                    "document_date",
                    "counterparty",
                    "amount",
                    "currency",
                ],
            )
        return time.perf_counter() - started


async def run() -> list[common.Figure]:
    tag = uuid.uuid4().hex[:8]
    settings = common.settings_for(tag)
    async with common.environment_ready(settings) as pool:
        connection_id = await common.insert_connection(pool, settings)
        bodies = await preload(settings, connection_id, EVENTS)
        consumer = common.start(common.relay_command("consume"), common.environment(settings))
        launched = time.perf_counter()
        first = None
        try:
            deadline = launched + 300
            while time.perf_counter() < deadline:
                count = int(await pool.fetchval("SELECT count(*) FROM events"))
                if count and first is None:
                    first = time.perf_counter()
                if count >= EVENTS:
                    break
                if consumer.poll() is not None:
                    raise RuntimeError("relay consume exited early")
                await asyncio.sleep(0.05)
            drained = time.perf_counter()
        finally:
            common.stop(consumer)
        documents = int(await pool.fetchval("SELECT count(*) FROM documents"))
        copy_s = await copy_ceiling(pool, connection_id, bodies)
    busy = drained - (first or launched)
    rate = EVENTS / busy
    ceiling = EVENTS / copy_s
    return [
        common.Figure(
            "consumer: events/s drained into PostgreSQL",
            rate,
            "ev/s",
            ceiling=ceiling,
            ceiling_name="COPY of the same rows",
            target=">= 3000/s",
            met=rate >= 3000,
            detail={
                "events": EVENTS,
                "documents_created": documents,
                "seconds_first_row_to_drained": round(busy, 3),
                "seconds_launch_to_drained": round(drained - launched, 3),
                "copy_seconds": round(copy_s, 3),
            },
        )
    ]
