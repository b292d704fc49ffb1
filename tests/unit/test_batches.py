"""Messages of the events queue read back as events: one-event messages, batches, bad batches."""

from __future__ import annotations

from typing import Any

import pytest

from relay.broker import amqp


def _listed(*entries: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [
        {"id": event_id, "connection": connection, "received_at_ms": 7, "size": size}
        for event_id, connection, size in entries
    ]


def test_a_message_without_the_batch_header_is_one_event() -> None:
    headers = {amqp.HEADER_CONNECTION: "c", amqp.HEADER_ATTEMPTS: 2}
    [piece] = amqp.split(b'{"id": "e"}', headers, "e")
    assert piece == amqp.Piece(b'{"id": "e"}', headers, "e")


def test_a_batch_gives_its_events_in_order_with_their_own_headers() -> None:
    headers = {
        amqp.HEADER_BATCH: _listed(("e1", "c1", 3), ("e2", "c2", 4)),
        amqp.HEADER_RECEIVED_AT: 5,
        "x-death": [{"reason": "delivery_limit"}],
    }
    pieces = amqp.split(b"abcdefg", headers, "batch-1")
    assert [(p.body, p.message_id) for p in pieces] == [(b"abc", "e1"), (b"defg", "e2")]
    assert pieces[1].headers == {
        amqp.HEADER_CONNECTION: "c2",
        amqp.HEADER_RECEIVED_AT: 7,
        "x-death": [{"reason": "delivery_limit"}],
    }


def test_header_values_read_as_bytes_are_text() -> None:
    listed = [{"id": b"e1", "connection": b"c1", "received_at_ms": 1, "size": 2}]
    [piece] = amqp.split(b"ab", {amqp.HEADER_BATCH: listed}, None)
    assert (piece.message_id, piece.headers[amqp.HEADER_CONNECTION]) == ("e1", "c1")


@pytest.mark.parametrize(
    "listed",
    [
        _listed(("e1", "c1", 3)),  # sizes short of the body
        _listed(("e1", "c1", 3), ("e2", "c2", 9)),  # past it
        [{"id": "e1", "size": 7}],  # an entry without its connection
        [{"id": "e1", "connection": "c", "received_at_ms": 1, "size": "seven"}],
        "not a list of entries",
        [],
    ],
)
def test_a_batch_its_header_does_not_describe_is_one_piece_which_fails_as_an_event(
    listed: Any,
) -> None:
    [piece] = amqp.split(b"abcdefg", {amqp.HEADER_BATCH: listed, "x-other": 1}, "batch-1")
    assert piece == amqp.Piece(b"abcdefg", {"x-other": 1}, "batch-1")


@pytest.mark.parametrize(
    ("headers", "count"),
    [
        (None, 1),
        ({amqp.HEADER_CONNECTION: "c"}, 1),
        ({amqp.HEADER_BATCH: _listed(("e1", "c", 1), ("e2", "c", 1))}, 2),
        ({amqp.HEADER_BATCH: []}, 1),
    ],
)
def test_a_message_counts_its_events_from_its_headers(headers: Any, count: int) -> None:
    """The consumer bounds its batches in events, a batch message counting each of its events."""
    assert amqp.events_in(headers) == count
