"""Logging: one JSON object per line when not a TTY, third-party loggers included, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from relay import log


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    log.configure("info", stream=out, json=True)
    yield out
    log.configure("warning")  # back to the session's setting (tests/conftest.py)


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_third_party_records_are_json_lines_like_the_relays_own(stream: io.StringIO) -> None:
    """uvicorn's, aio-pika's and aiormq's standard-library records come out as one JSON object each."""
    log.get("relay.test").info("webhook_accepted", connection="c1")
    logging.getLogger("uvicorn.error").error("Application startup failed. Exiting.")
    logging.getLogger("aiormq.connection").warning("connection lost %s", "(reset)")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("aio_pika.robust_connection").exception("reconnect failed")
    lines = _lines(stream)
    assert [line["event"] for line in lines] == [
        "webhook_accepted",
        "Application startup failed. Exiting.",
        "connection lost (reset)",
        "reconnect failed",
    ]
    assert lines[1]["logger"] == "uvicorn.error"
    assert lines[1]["level"] == "error"
    assert "timestamp" in lines[2]
    assert "RuntimeError: boom" in str(lines[3]["exception"])


def test_third_party_lines_never_carry_url_credentials_or_presigned_queries(
    stream: io.StringIO,
) -> None:
    """Free text from libraries is masked: a URL's user:password and its query string."""
    logging.getLogger("aiormq.connection").warning(
        "connecting to amqp://guest:hunter2@mq:5672/vhost"
    )
    logging.getLogger("somelib").warning(
        "GET https://storage.example/att?X-Amz-Signature=sig-value&expires=1 failed"
    )
    logging.getLogger("httpx").info("HTTP Request: GET https://storage.example/att?sig=sig-value")
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "sig-value" not in text
    assert "amqp://***@mq:5672/vhost" in text
    assert len(_lines(stream)) == 2  # httpx's per-request info lines are not logged at all
