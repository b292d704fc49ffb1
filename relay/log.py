"""Structured logging, configured once, as JSON when not a TTY and readable console when it is.

Events have stable snake_case names (``webhook_accepted``, ``document_uploaded``...); roles get
their logger with :func:`get` and call :func:`configure` once at start.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_SENSITIVE = ("secret", "password", "token", "apikey", "api_key", "authorization", "url_signed")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@'\"]*@")
_URL_QUERY = re.compile(r"(?P<url>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]+)\?[^\s'\"]*")
# Libraries that log every request's URL at info level (a presigned URL is a credential).
_CHATTY = ("httpx", "httpcore")
# Loggers uvicorn gives handlers of its own (plain text) unless told ``log_config=None``.
_OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def _scrub(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask every value whose key looks like a credential.

    Nothing here ever receives a secret or a presigned URL: call sites pass ids, counts, states
    and reasons only, and this is a last line of defence.
    """
    for key in list(event_dict):
        lowered = key.lower()
        if any(word in lowered for word in _SENSITIVE):
            event_dict[key] = "***"
    return event_dict


def redact_text(text: str) -> str:
    """Mask every URL's user:password and query string in free text."""
    return _URL_QUERY.sub(r"\g<url>?***", _URL_USERINFO.sub(r"\g<scheme>***@", text))


def _scrub_text(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask URL credentials and query strings in every text value (libraries log free text)."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact_text(value)
    return event_dict


class _Stderr:
    """Standard error looked up at each write, not once.

    Whoever replaced ``sys.stderr`` since (a test runner capturing output) gets the lines, and a
    closed capture is never written to.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # a TextIO duck, see _Stderr
    """The handler this module puts on the root logger (replaced, not added, on reconfiguration)."""


class _FastPath:
    """How :func:`fast` writes, as set by :func:`configure`.

    JSON lines gathered during one turn of the event loop are written together at its end (one
    write for all the webhooks answered in that turn); a terminal gets them through structlog.
    """

    def __init__(self) -> None:
        self.out: Any = None
        self.json = False
        self.enabled = True
        self.pending: list[bytes] = []

    def add(self, line: bytes) -> None:
        if not self.pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write it now
                self.out.write(line.decode())
                return
        self.pending.append(line)

    def flush(self) -> None:
        lines, self.pending = self.pending, []
        if lines and self.out is not None:
            self.out.write(b"".join(lines).decode())


_fast = _FastPath()


def fast(event: str, **fields: str | int | float | None) -> None:
    """Write one info line for a hot path (a line per webhook), rendered once with orjson.

    Its keys are fixed and its values known safe (ids, outcomes, statuses, durations), so it skips
    the scrubbing processors; the line has the same JSON shape as every other line and is written
    at the end of the event loop's turn with the other lines of that turn.
    """
    if not _fast.enabled:
        return
    if not _fast.json or _fast.out is None:
        get("relay.fast").info(event, **fields)
        return
    fields["event"] = event
    fields["level"] = "info"
    fields["timestamp"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    _fast.add(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))


def configure(level: str = "info", *, stream: Any = None, json: bool | None = None) -> None:
    """Configure structlog and the standard library's root logger to render alike.

    Third-party libraries (uvicorn, aio-pika, aiormq, asyncpg) log through the standard library:
    their records go through the same renderer (one JSON object per line when not a TTY), with any
    URL's credentials and query string masked (:func:`_scrub_text`), since their messages are free
    text.
    """
    out = stream or _Stderr()
    as_json = (not out.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    _fast.flush()
    _fast.out, _fast.json, _fast.enabled = out, as_json, threshold <= logging.INFO
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            _scrub,
            structlog.processors.format_exc_info,
            _scrub_text,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]  # a TextIO duck
        cache_logger_on_first_use=True,
    )
    # The standard library's records (third-party loggers) through the same renderer.
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _scrub,
                structlog.processors.format_exc_info,
                _scrub_text,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(threshold, logging.WARNING))
    for name in _OWN_HANDLERS:  # a uvicorn.Config built with its default log_config set these
        own = logging.getLogger(name)
        own.handlers.clear()
        own.propagate = True


def get(name: str) -> Any:
    return structlog.get_logger(name)
