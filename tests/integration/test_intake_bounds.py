"""`relay serve` attacked over real sockets: oversized heads, slow or silent clients, too many
connections, bodies held open. Each is cut off at its bound and the worker's memory comes back."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from relay import config
from tests.integration import factories, processes

WAIT_S = 30.0  # generous: the bounds below are 2 s; nothing here measures time


@pytest.fixture
async def serve(
    settings: config.Settings, pool: asyncpg.Pool, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[processes.Role, uuid.UUID]]:
    """`relay serve` with one worker (the process itself) and small bounds, and one connection."""
    connection_id = await factories.make_connection(pool, settings)
    role = processes.Role(
        settings,
        "serve",
        log_path=tmp_path / "serve.log",
        env={
            "RELAY_WORKERS": "1",
            "RELAY_HEADER_TIMEOUT": "2",
            "RELAY_BODY_TIMEOUT": "2",
            "RELAY_KEEPALIVE_TIMEOUT": "2",
            "RELAY_MAX_CONNECTIONS": "50",
            "RELAY_BODY_BUFFER_BYTES": str(4 * 1024 * 1024),
        },
    )
    try:
        await role.ready()
        yield role, connection_id
    finally:
        role.close()


def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _open(role: processes.Role) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", role.port)


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (b"" when it just closes, or
    resets it: data it did not read was still on its way)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=WAIT_S)
    except ConnectionResetError:
        return b""


async def _valid_webhook(role: processes.Role, connection_id: uuid.UUID) -> int:
    body, headers = factories.signed({"id": str(uuid.uuid4()), "type": "v1/cards", "data": {}})
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{role.url}/webhooks/qonto/{connection_id}", content=body, headers=headers, timeout=10
        )
    return response.status_code


async def test_a_head_past_the_size_bound_is_431_and_its_memory_returns(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """A 16 KiB header line then silence: 431. A 64 MiB one: the connection closed after the first
    few KiB, the worker's resident memory not grown by it, and a valid webhook still accepted."""
    role, connection_id = serve
    reader, writer = await _open(role)
    writer.write(f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nX-Big: ".encode())
    writer.write(b"a" * 16384)
    answer = await _answer(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    baseline = _rss_mb(role.process.pid)
    reader, writer = await _open(role)
    writer.write(f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nX-Big: ".encode())
    chunk = b"a" * (1024 * 1024)
    with contextlib.suppress(ConnectionError):
        for _ in range(64):
            writer.write(chunk)
            await writer.drain()
    answer = await _answer(reader)
    writer.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert _rss_mb(role.process.pid) < baseline + 30
    assert await _valid_webhook(role, connection_id) == 202


async def test_a_complete_head_past_the_size_bound_is_431(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """64 KiB of complete headers on a webhook: 431, never 202."""
    role, connection_id = serve
    body, headers = factories.signed({"id": str(uuid.uuid4()), "type": "v1/cards", "data": {}})
    async with httpx.AsyncClient() as client:
        with contextlib.suppress(httpx.TransportError):
            response = await client.post(
                f"{role.url}/webhooks/qonto/{connection_id}",
                content=body,
                headers={**headers, **{f"x-pad-{i}": "p" * 1000 for i in range(64)}},
            )
            assert response.status_code == 431


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (b"", b""),  # connects and says nothing: closed
        (b"POST /webhooks/qonto/x HTTP/1.1\r\nHost: relay\r\n", b"HTTP/1.1 408 "),  # half a head
    ],
    ids=["silent", "half-head"],
)
async def test_a_client_that_does_not_finish_its_head_is_cut_off(
    serve: tuple[processes.Role, uuid.UUID], sent: bytes, expected: bytes
) -> None:
    """RELAY_HEADER_TIMEOUT after the connection opened, the server closes it (408 when a request
    had begun)."""
    role, _ = serve
    reader, writer = await _open(role)
    writer.write(sent)
    answer = await _answer(reader)
    writer.close()
    assert answer.startswith(expected), answer[:200]


async def test_a_body_that_does_not_arrive_is_cut_off(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """Content-Length 1000 and 10 bytes sent: closed RELAY_BODY_TIMEOUT after the head."""
    role, connection_id = serve
    reader, writer = await _open(role)
    writer.write(
        f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nHost: relay\r\n"
        "Content-Length: 1000\r\nX-Qonto-Signature: t=1,v1=00\r\n\r\n0123456789".encode()
    )
    answer = await _answer(reader)
    writer.close()
    assert b" 202 " not in answer
    assert reader.at_eof()


async def test_an_idle_keep_alive_connection_is_closed(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """After a response, a connection that sends nothing more is closed (RELAY_KEEPALIVE_TIMEOUT)."""
    role, _ = serve
    reader, writer = await _open(role)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
    answer = await _answer(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_connections_past_the_bound_are_refused_and_service_resumes(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """With 50 connections held open, the next ones get 503 and are closed; once the 50 are gone, a
    valid webhook is accepted again."""
    role, connection_id = serve
    held = [await _open(role) for _ in range(50)]
    extra = [await _open(role) for _ in range(5)]
    answers = [await _answer(reader) for reader, _ in extra]
    for _, writer in held + extra:
        writer.close()
    assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
    deadline = time.monotonic() + WAIT_S
    while (status := await _valid_webhook(role, connection_id)) != 202:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)


async def test_bodies_held_open_cannot_take_more_than_the_body_budget(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """40 sockets each declaring 1 MiB and sending 1 MiB - 1: the worker holds at most
    RELAY_BODY_BUFFER_BYTES (4 MiB) of them, the others get 503 at once; its memory stays far below
    the 40 MiB sent and comes back after; a valid webhook is then accepted."""
    role, connection_id = serve
    baseline = _rss_mb(role.process.pid)
    size = 1024 * 1024
    streams = []
    for _ in range(40):
        reader, writer = await _open(role)
        writer.write(
            f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nHost: relay\r\n"
            f"Content-Length: {size}\r\nX-Qonto-Signature: t=1,v1=00\r\n\r\n".encode()
            + b"x" * (size - 1)
        )
        streams.append((reader, writer))
    for _, writer in streams:
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    peak = _rss_mb(role.process.pid)
    answers = [await _answer(reader) for reader, _ in streams]
    for _, writer in streams:
        writer.close()
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert len(busy) >= 30, [a[:40] for a in answers]
    assert peak < baseline + 25, (baseline, peak)
    assert _rss_mb(role.process.pid) < baseline + 25
    assert await _valid_webhook(role, connection_id) == 202


async def test_a_stop_answers_the_webhook_being_received_and_closes_idle_connections(
    serve: tuple[processes.Role, uuid.UUID],
) -> None:
    """On SIGTERM, a kept-alive webhook connection that is idle is closed at once, and a webhook
    whose body is still arriving is answered (202, queued) before `relay serve` exits."""
    role, connection_id = serve
    idle_reader, idle_writer = await _open(role)
    body, headers = factories.signed({"id": str(uuid.uuid4()), "type": "v1/cards", "data": {}})
    first = (
        f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nHost: relay\r\n"
        f"X-Qonto-Signature: {headers['x-qonto-signature']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    idle_writer.write(first)
    assert (await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), WAIT_S)).startswith(
        b"HTTP/1.1 202"
    )
    await asyncio.wait_for(idle_reader.readuntil(b"}"), WAIT_S)
    body, headers = factories.signed({"id": str(uuid.uuid4()), "type": "v1/cards", "data": {}})
    head = (
        f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nHost: relay\r\n"
        f"X-Qonto-Signature: {headers['x-qonto-signature']}\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await _open(role)
    writer.write(head)
    continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    assert continued == b"HTTP/1.1 100 Continue\r\n\r\n"  # the head is in: the request began
    writer.write(body[:10])
    role.process.send_signal(signal.SIGTERM)
    assert await _answer(idle_reader) == b""  # closed, not answered: the stop has begun
    writer.write(body[10:])
    answer = await _answer(reader)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    assert b"connection: close" in answer
    await role.exited(WAIT_S)
    idle_writer.close()
    writer.close()


def _signed_request(connection_id: uuid.UUID) -> bytes:
    body, headers = factories.signed({"id": str(uuid.uuid4()), "type": "v1/cards", "data": {}})
    return (
        f"POST /webhooks/qonto/{connection_id} HTTP/1.1\r\nHost: relay\r\n"
        f"X-Qonto-Signature: {headers['x-qonto-signature']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        (b"", b""),  # idle after the answer: closed (RELAY_KEEPALIVE_TIMEOUT)
        (b"POST /webhooks/qonto/x HTTP/1.1\r\nHost: relay\r\n", b"HTTP/1.1 408 "),  # half a head
        (b"POST /webhooks/qonto/x HTTP/1.1\r\nX-Big: " + b"a" * 16384, b"HTTP/1.1 431 "),
        (b"POST /webhooks/qonto/{id} HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123", b""),  # cut
    ],
    ids=["idle", "half-head", "head-too-large", "body-cut"],
)
async def test_the_bounds_hold_on_a_connection_the_guard_answers(
    serve: tuple[processes.Role, uuid.UUID], then: bytes, expected: bytes
) -> None:
    """After a webhook answered 202 on the same connection (answered by the relay's own protocol,
    not uvicorn's), the next request is bound as the first was."""
    role, connection_id = serve
    reader, writer = await _open(role)
    writer.write(_signed_request(connection_id))
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)).startswith(
        b"HTTP/1.1 202 "
    )
    await asyncio.wait_for(reader.readuntil(b"}"), WAIT_S)
    writer.write(then.replace(b"{id}", str(connection_id).encode()))
    answer = await _answer(reader)  # the connection is closed within WAIT_S
    writer.close()
    assert answer.startswith(expected) if expected else answer == b"", answer[:200]
