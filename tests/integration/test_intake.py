"""The webhook intake over a real socket: 202 only once the event is durably queued, clear refusals."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aio_pika.abc
import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette

from relay import config, crypto
from relay.broker import amqp
from relay.edge import app, guard
from relay.sandbox import signing
from tests.integration import factories


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def connection_id(settings: config.Settings, pool: asyncpg.Pool) -> uuid.UUID:
    return await factories.make_connection(pool, settings)


@pytest.fixture(params=["guard", "asgi"])
async def intake(
    request: pytest.FixtureRequest, settings: config.Settings, connection_id: uuid.UUID
) -> AsyncIterator[tuple[str, Starlette]]:
    """`relay serve`'s application on a real socket, started after the test's connection exists.

    Each test runs twice: through the relay's own protocol (``guard``: a connection that opens
    with a webhook is answered without ASGI, as `relay serve` does) and through uvicorn's protocol
    and the application alone (``asgi``: a webhook on a connection that began otherwise).
    (Created later, its NOTIFY would trigger a reload that a test could mistake for its own.)
    """
    async with serving(settings, guarded=request.param == "guard") as served:
        yield served


@contextlib.asynccontextmanager
async def serving(
    settings: config.Settings, *, guarded: bool
) -> AsyncIterator[tuple[str, Starlette]]:
    port = _free_port()
    application = app.create_app(settings)
    protocol: dict[str, Any] = {"http": guard.Guard} if guarded else {}
    server = uvicorn.Server(
        uvicorn.Config(
            application, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **protocol
        )
    )
    task = asyncio.create_task(server.serve())

    def started() -> bool:
        assert not task.done(), "the intake did not start"
        return bool(server.started)

    await factories.until(started, within_s=10, what="the intake starting")
    try:
        yield f"http://127.0.0.1:{port}", application
    finally:
        server.should_exit = True
        await task


async def _queued(
    settings: config.Settings, queue: str, expect: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Messages in a queue (read and left unacknowledged until the channel closes)."""
    found = []
    conn = await aio_pika.connect(settings.amqp_url.reveal())
    async with conn:
        channel = await conn.channel()
        q = await channel.get_queue(queue, ensure=False)
        deadline = time.monotonic() + 5
        while len(found) < expect and time.monotonic() < deadline:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            found.append(message)
        extra = await q.get(no_ack=True, fail=False)
        if extra is not None:
            found.append(extra)
    return found


def _event(event_id: str | None = None) -> dict[str, object]:
    return {
        "id": event_id or str(uuid.uuid4()),
        "type": "v1/transactions",
        "organization_id": "org",
        "data": {"id": str(uuid.uuid4()), "side": "debit", "attachment_ids": []},
    }


async def test_signed_event_is_queued_then_accepted(
    intake: tuple[str, Starlette], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    """202 comes after the confirm; the queue holds the raw body with the connection and event id."""
    url, _ = intake
    body = b'{"id": "evt-1",  "type": "v1/transactions", "data": {"id": "t1"}}'  # odd spacing kept
    headers = {"x-qonto-signature": signing.sign(body, factories.WEBHOOK_SECRET)}
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == 202
    assert response.json() == {"status": "queued", "event_id": "evt-1"}
    [message] = await _queued(settings, settings.events_queue, 1)
    assert message.body == body
    assert message.message_id == "evt-1"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    headers_seen = message.headers or {}
    assert headers_seen[amqp.HEADER_CONNECTION] == str(connection_id)
    assert isinstance(headers_seen[amqp.HEADER_RECEIVED_AT], int)


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("missing", 401, "missing signature"),
        ("wrong secret", 401, "bad signature"),
        ("stale", 401, "stale timestamp"),
        ("malformed", 401, "malformed signature"),
    ],
)
async def test_bad_signatures_are_refused(
    intake: tuple[str, Starlette],
    connection_id: uuid.UUID,
    settings: config.Settings,
    case: str,
    status: int,
    reason: str,
) -> None:
    """Unsigned, wrongly signed, replayed or garbled: 401 with the reason, nothing queued."""
    url, _ = intake
    body = orjson.dumps(_event())
    signature = {
        "missing": None,
        "wrong secret": signing.sign(body, "another-secret-0123456789abcdef"),
        "stale": signing.sign(body, factories.WEBHOOK_SECRET, t=int(time.time()) - 301),
        "malformed": "v1=abc",
    }[case]
    headers = {"x-qonto-signature": signature} if signature else {}
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == status
    assert response.json()["error"] == reason
    assert await _queued(settings, settings.events_queue, 0) == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (b'{"id": 5, "type": "v1/transactions"}', 400),
        (b"x" * (1024 * 1024 + 1), 413),
    ],
    ids=["not json", "not an object", "not an event", "too large"],
)
async def test_bad_bodies_get_clear_answers(
    intake: tuple[str, Starlette], connection_id: uuid.UUID, body: bytes, status: int
) -> None:
    """Validly signed garbage is 400, an oversized body 413: never a 500."""
    url, _ = intake
    headers = {"x-qonto-signature": signing.sign(body, factories.WEBHOOK_SECRET)}
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == status
    assert "error" in response.json()


async def test_unknown_and_disconnected_connections_are_404(
    intake: tuple[str, Starlette], connection_id: uuid.UUID, pool: asyncpg.Pool
) -> None:
    """A made-up id, a non-UUID and a disconnected connection are all 404 (Qonto keeps retrying)."""
    url, application = intake
    body, headers = factories.signed(_event())
    async with httpx.AsyncClient() as client:
        for target in (str(uuid.uuid4()), "not-a-uuid"):
            response = await client.post(
                f"{url}/webhooks/qonto/{target}", content=body, headers=headers
            )
            assert response.status_code == 404
        reloads = application.state.secrets.reloads
        await pool.execute(
            "UPDATE connections SET state = 'disconnected' WHERE id = $1", connection_id
        )
        await factories.until(
            lambda: application.state.secrets.reloads > reloads, what="cache reload"
        )
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == 404


async def test_unknown_ids_cost_no_database_query_while_the_cache_listens(
    intake: tuple[str, Starlette], connection_id: uuid.UUID, pool: asyncpg.Pool
) -> None:
    """2,000 distinct unknown ids, concurrent then repeated: 404 each, no lookup in PostgreSQL
    (the cache holds every connection that accepts webhooks and hears of every change)."""
    url, application = intake
    body, headers = factories.signed(_event())
    unknown = [uuid.uuid4() for _ in range(2000)]
    before = application.state.secrets.lookups
    scans = (
        "SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_tables WHERE relname = 'connections'"
    )
    scans_before = await pool.fetchval(scans)
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:

        async def post(connection: uuid.UUID) -> None:
            response = await client.post(
                f"{url}/webhooks/qonto/{connection}", content=body, headers=headers
            )
            statuses.append(response.status_code)

        for start in range(0, len(unknown), 100):
            await asyncio.gather(*(post(c) for c in unknown[start : start + 100]))
        for connection in unknown[:200]:
            await post(connection)
    assert set(statuses) == {404}
    assert len(statuses) == 2200
    assert application.state.secrets.lookups - before == 0
    await asyncio.sleep(0.6)  # pg_stat counters are flushed by each backend at most every 0.5 s
    assert await pool.fetchval(scans) - scans_before < 20  # the test's own queries only


async def test_a_known_connection_never_queries_the_database(
    intake: tuple[str, Starlette], connection_id: uuid.UUID
) -> None:
    """With the pool closed, a known connection's webhook is still verified and queued."""
    url, application = intake
    await application.state.pool.close()
    body, headers = factories.signed(_event())
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == 202


async def test_a_secret_added_later_is_picked_up_without_restart(
    intake: tuple[str, Starlette],
    connection_id: uuid.UUID,
    pool: asyncpg.Pool,
    settings: config.Settings,
) -> None:
    """Rotation: a new secret stored in PostgreSQL is accepted at once (LISTEN/NOTIFY)."""
    url, application = intake
    new_secret = "rotated-secret-0123456789abcdefgh"
    reloads = application.state.secrets.reloads
    box = crypto.Box(settings.secret_key.reveal())
    await pool.execute(
        "INSERT INTO webhook_secrets (connection_id, secret) VALUES ($1, $2)",
        connection_id,
        box.seal(new_secret),
    )
    await factories.until(lambda: application.state.secrets.reloads > reloads, what="cache reload")
    body, headers = factories.signed(_event(), new_secret)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == 202


async def test_broker_down_is_503_never_2xx(
    intake: tuple[str, Starlette], connection_id: uuid.UUID
) -> None:
    """When RabbitMQ cannot confirm, Qonto gets 503 (and retries); readiness says which one failed."""
    url, application = intake
    await application.state.publisher.channel.close()
    await application.state.amqp.close()
    body, headers = factories.signed(_event())
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
        assert response.status_code == 503
        assert response.headers["retry-after"]
        ready = await client.get(f"{url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["rabbitmq"].startswith("unavailable")
    assert ready.json()["postgresql"] == "ok"


async def test_health_readiness_and_metrics(
    intake: tuple[str, Starlette], connection_id: uuid.UUID
) -> None:
    """/healthz, /readyz and /metrics answer; metrics count webhooks by outcome."""
    url, _ = intake
    body, headers = factories.signed(_event())
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/healthz")).status_code == 200
        ready = await client.get(f"{url}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"postgresql": "ok", "rabbitmq": "ok"}
        await client.post(f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers)
        text = (await client.get(f"{url}/metrics")).text
    assert 'relay_webhooks_total{outcome="queued"} 1.0' in text
    assert 'relay_documents{state="in_doubt"}' in text
    assert "relay_events_per_message_count 1.0" in text  # one message, of one event
    assert "relay_events_per_message_sum 1.0" in text


async def test_admin_api_requires_the_bearer_token(
    intake: tuple[str, Starlette], connection_id: uuid.UUID
) -> None:
    """The admin API mirrors the CLI behind the admin token."""
    url, _ = intake
    async with httpx.AsyncClient() as client:
        refused = await client.get(f"{url}/admin/connections")
        wrong = await client.get(
            f"{url}/admin/connections", headers={"Authorization": "Bearer nope"}
        )
        listed = await client.get(
            f"{url}/admin/connections",
            headers={"Authorization": "Bearer test-admin-token-0123456789"},
        )
        documents = await client.get(
            f"{url}/admin/documents",
            params={"state": "lost"},
            headers={"Authorization": "Bearer test-admin-token-0123456789"},
        )
    assert refused.status_code == 401
    assert wrong.status_code == 401
    assert listed.status_code == 200
    assert [c["id"] for c in listed.json()] == [str(connection_id)]
    assert documents.status_code == 400
    assert "unknown state" in documents.json()["error"]


async def test_everything_under_admin_is_authenticated_before_routing(
    intake: tuple[str, Starlette],
) -> None:
    """Unknown admin paths and wrong methods answer 401 without the token: nothing about the routes
    leaks; with the token they answer 404 and 405 as usual."""
    url, _ = intake
    token = {"Authorization": "Bearer test-admin-token-0123456789"}
    async with httpx.AsyncClient() as client:
        anonymous = [
            await client.get(f"{url}/admin/no-such-thing"),
            await client.delete(f"{url}/admin/connections"),
            await client.get(f"{url}/admin"),
            await client.post(f"{url}/admin/flush", headers={"Authorization": "Bearer nope"}),
        ]
        unknown = await client.get(f"{url}/admin/no-such-thing", headers=token)
        wrong_method = await client.delete(f"{url}/admin/connections", headers=token)
        health = await client.get(f"{url}/healthz")
    assert [r.status_code for r in anonymous] == [401, 401, 401, 401]
    assert all(r.headers["www-authenticate"] == "Bearer" for r in anonymous)
    assert (unknown.status_code, wrong_method.status_code) == (404, 405)
    assert health.status_code == 200


@pytest.mark.parametrize("state", ["disconnected", "revoked"])
async def test_stopped_connections_are_404_from_the_start(
    settings: config.Settings, pool: asyncpg.Pool, state: str
) -> None:
    """A connection disconnected or revoked before the intake started is not in the cache: 404."""
    stopped = await factories.make_connection(pool, settings, state=state)
    live = await factories.make_connection(pool, settings)
    application = app.create_app(settings)
    body, headers = factories.signed(_event())
    transport = httpx.ASGITransport(app=application)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=transport, base_url="http://intake") as client,
    ):
        refused = await client.post(f"/webhooks/qonto/{stopped}", content=body, headers=headers)
        accepted = await client.post(f"/webhooks/qonto/{live}", content=body, headers=headers)
    assert refused.status_code == 404
    assert accepted.status_code == 202


async def test_a_streamed_body_over_one_mebibyte_is_413(
    intake: tuple[str, Starlette], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    """Without Content-Length (chunked upload), the size is counted while reading: 413, not queued."""
    url, _ = intake
    chunk = b"x" * 65536

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(17):  # 17 x 64 KiB = 1 MiB + 64 KiB
            yield chunk

    headers = {"x-qonto-signature": signing.sign(chunk * 17, factories.WEBHOOK_SECRET)}
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=stream(), headers=headers
        )
    assert response.status_code == 413
    assert await _queued(settings, settings.events_queue, 0) == []


async def test_the_cache_listens_again_after_losing_its_database_connection(
    intake: tuple[str, Starlette],
    connection_id: uuid.UUID,
    pool: asyncpg.Pool,
    settings: config.Settings,
) -> None:
    """When PostgreSQL drops the LISTEN connection, the cache reconnects and still sees new secrets."""
    url, application = intake
    cache = application.state.secrets
    listens, reloads = cache.listens, cache.reloads
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )
    assert killed == 1
    # Re-listening is followed by a full reload; only after it can a reload come from a NOTIFY alone.
    await factories.until(
        lambda: cache.listens > listens and cache.reloads > reloads, what="LISTEN again"
    )
    reloads = cache.reloads
    new_secret = "secret-after-reconnect-0123456789"
    await pool.execute(
        "INSERT INTO webhook_secrets (connection_id, secret) VALUES ($1, $2)",
        connection_id,
        crypto.Box(settings.secret_key.reveal()).seal(new_secret),
    )
    await factories.until(lambda: cache.reloads > reloads, what="cache reload after NOTIFY")
    body, headers = factories.signed(_event(), new_secret)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/webhooks/qonto/{connection_id}", content=body, headers=headers
        )
    assert response.status_code == 202
