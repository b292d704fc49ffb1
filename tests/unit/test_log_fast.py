"""The hot path's log line (one per webhook): the same JSON shape as any other line, rendered once."""

from __future__ import annotations

import io
import json

from relay import log


def test_a_fast_line_has_the_shape_of_a_structlog_line() -> None:
    """Same keys and timestamp format as structlog's JSON lines, values kept as given."""
    out = io.StringIO()
    log.configure("info", stream=out, json=True)
    try:
        log.get("relay.test").info("webhook_rejected", connection="c0", status=404)
        log.fast("webhook_accepted", connection="c1", status=202, duration_ms=1.25)
    finally:
        log.configure("warning")
    slow, fast = (json.loads(line) for line in out.getvalue().splitlines())
    assert set(slow) == {"connection", "status", "event", "level", "timestamp"}
    assert fast == {
        "connection": "c1",
        "status": 202,
        "duration_ms": 1.25,
        "event": "webhook_accepted",
        "level": "info",
        "timestamp": fast["timestamp"],
    }
    assert len(fast["timestamp"]) == len(slow["timestamp"])
    assert fast["timestamp"].endswith("Z")


def test_no_fast_line_below_the_configured_level() -> None:
    """At RELAY_LOG_LEVEL=warning the per-webhook line is not written."""
    out = io.StringIO()
    log.configure("warning", stream=out, json=True)
    log.fast("webhook_accepted", connection="c1")
    assert out.getvalue() == ""


def test_a_terminal_gets_the_readable_console_line() -> None:
    """Not JSON: the line goes through structlog's console renderer like the others."""
    out = io.StringIO()
    log.configure("info", stream=out, json=False)
    try:
        log.fast("webhook_accepted", connection="c1")
    finally:
        log.configure("warning")
    text = out.getvalue()
    assert "webhook_accepted" in text
    assert "connection" in text
    assert not text.startswith("{")
