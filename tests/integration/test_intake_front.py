"""The relay's own HTTP path for webhooks (relay.edge.guard) over raw sockets: keep-alive,
pipelining, chunked bodies, 100-continue, ``Connection: close``, and a connection that turns to
something else halfway."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest
from starlette.applications import Starlette

from relay import config
from relay.broker import amqp
from relay.sandbox import signing
from tests.integration import factories
from tests.integration.test_intake import _event, serving


@pytest.fixture
async def front(
    settings: config.Settings, connection_id: uuid.UUID
) -> AsyncIterator[tuple[str, int]]:
    served: tuple[str, Starlette]
    async with serving(settings, guarded=True) as served:
        yield "127.0.0.1", int(served[0].rsplit(":", 1)[1])


def _webhook(
    connection_id: uuid.UUID | str,
    event: dict[str, object],
    *,
    secret: str = factories.WEBHOOK_SECRET,
    head: bytes = b"",
    chunked: bool = False,
) -> bytes:
    body = orjson.dumps(event)
    signature = signing.sign(body, secret).encode()
    framing = (
        b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(body)
    )
    if chunked:
        third = len(body) // 3
        parts = [body[:third], body[third : 2 * third], body[2 * third :]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return (
        b"POST /webhooks/qonto/%s HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        % str(connection_id).encode()
        + b"X-Qonto-Signature: "
        + signature
        + b"\r\n"
        + framing
        + head
        + b"\r\n"
        + body
    )


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, value = line.split(b":", 1)
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(status_line.split(b" ")[1]), headers, body


async def _events_queued(settings: config.Settings, expect: int) -> list[amqp.Piece]:
    """The events on the events queue, a batch counting each of its events."""
    found: list[amqp.Piece] = []
    async with await aio_pika.connect(settings.amqp_url.reveal()) as conn:
        channel = await conn.channel()
        queue = await channel.get_queue(settings.events_queue, ensure=False)

        async def arrived() -> bool:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                found.extend(amqp.split(message.body, message.headers or {}, message.message_id))
            return len(found) >= expect

        await factories.until(arrived, within_s=10, what=f"{expect} events queued")
        assert await queue.get(no_ack=True, fail=False) is None
    return found


async def test_kept_alive_and_pipelined_webhooks_are_answered_in_order(
    front: tuple[str, int], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    reader, writer = await asyncio.open_connection(*front)
    first = _event()
    writer.write(_webhook(connection_id, first))
    status, headers, body = await _answer(reader)
    assert (status, orjson.loads(body)) == (202, {"status": "queued", "event_id": first["id"]})
    assert b"date" in headers
    assert b"connection" not in headers
    pipelined = [_event() for _ in range(3)]
    writer.write(b"".join(_webhook(connection_id, event) for event in pipelined))
    answers = [await _answer(reader) for _ in pipelined]
    assert [(s, orjson.loads(b)["event_id"]) for s, _, b in answers] == [
        (202, event["id"]) for event in pipelined
    ]
    writer.close()
    queued = await _events_queued(settings, 4)
    assert [p.message_id for p in queued] == [first["id"]] + [e["id"] for e in pipelined]
    assert {p.headers[amqp.HEADER_CONNECTION] for p in queued} == {str(connection_id)}


async def test_refusals_keep_the_connection_and_the_next_webhook_is_queued(
    front: tuple[str, int], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    """An unknown connection (decided by the head: the body is read and dropped), a bad signature
    and a body that is not an event each get their answer; the connection goes on."""
    reader, writer = await asyncio.open_connection(*front)
    writer.write(_webhook(uuid.uuid4(), _event()))
    assert (await _answer(reader))[0] == 404
    writer.write(_webhook(connection_id, _event(), secret="not-the-secret"))
    status, _, body = await _answer(reader)
    assert (status, orjson.loads(body)) == (401, {"error": "bad signature"})
    writer.write(_webhook(connection_id, {"no": "id"}))
    assert (await _answer(reader))[0] == 400
    good = _event()
    writer.write(_webhook(connection_id, good))
    assert (await _answer(reader))[0] == 202
    writer.close()
    [queued] = await _events_queued(settings, 1)
    assert queued.message_id == good["id"]


async def test_chunked_bodies_and_100_continue(
    front: tuple[str, int], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    reader, writer = await asyncio.open_connection(*front)
    writer.write(_webhook(connection_id, _event(), chunked=True))
    assert (await _answer(reader))[0] == 202
    request = _webhook(connection_id, _event(), head=b"Expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    writer.write(head + b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(body)
    assert (await _answer(reader))[0] == 202
    writer.close()
    assert len(await _events_queued(settings, 2)) == 2


async def test_connection_close_is_honoured(
    front: tuple[str, int], connection_id: uuid.UUID
) -> None:
    reader, writer = await asyncio.open_connection(*front)
    writer.write(_webhook(connection_id, _event(), head=b"Connection: close\r\n"))
    status, headers, _ = await _answer(reader)
    assert (status, headers[b"connection"]) == (202, b"close")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the relay
    writer.close()


async def test_a_webhook_connection_that_asks_for_something_else_is_handed_to_the_application(
    front: tuple[str, int], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    """After webhooks, a request for another route (pipelined behind a webhook, too) is answered
    by the application, in order; webhooks after it are still queued."""
    reader, writer = await asyncio.open_connection(*front)
    writer.write(_webhook(connection_id, _event()))
    assert (await _answer(reader))[0] == 202
    writer.write(
        _webhook(connection_id, _event())
        + b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
        + _webhook(connection_id, _event(), chunked=True)
    )
    first, health, last = [await _answer(reader) for _ in range(3)]
    assert (first[0], last[0]) == (202, 202)
    assert (health[0], orjson.loads(health[2])) == (200, {"status": "ok"})
    writer.write(b"GET /webhooks/qonto/x HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert (await _answer(reader))[0] == 405
    writer.close()
    assert len(await _events_queued(settings, 3)) == 3


async def test_concurrent_webhooks_are_each_queued_once(
    front: tuple[str, int], connection_id: uuid.UUID, settings: config.Settings
) -> None:
    """Forty webhooks at once, on forty connections: all 202, each event on the queue once,
    whether it went alone or in a batch with others."""
    sent = [_event() for _ in range(40)]

    async def send(event: dict[str, object]) -> int:
        reader, writer = await asyncio.open_connection(*front)
        writer.write(_webhook(connection_id, event))
        status = (await _answer(reader))[0]
        writer.close()
        return status

    assert await asyncio.gather(*(send(event) for event in sent)) == [202] * 40
    queued = await _events_queued(settings, 40)
    assert sorted(str(p.message_id) for p in queued) == sorted(str(e["id"]) for e in sent)
    assert all(orjson.loads(p.body)["id"] == p.message_id for p in queued)


@pytest.mark.parametrize(
    ("head", "refused_head_only"),
    [(b"Connection: close\r\n", False), (b"Expect: 100-continue\r\n", True)],
)
async def test_a_refusal_closes_when_the_client_asked_or_waits_for_100_continue(
    front: tuple[str, int], head: bytes, refused_head_only: bool
) -> None:
    """The answer to an unknown connection says ``Connection: close`` and the relay closes; a
    client waiting for 100 Continue gets the refusal instead, its body never sent."""
    reader, writer = await asyncio.open_connection(*front)
    request = _webhook(uuid.uuid4(), _event(), head=head)
    writer.write(request.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if refused_head_only else request)
    status, headers, _ = await _answer(reader)
    assert (status, headers[b"connection"]) == (404, b"close")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
