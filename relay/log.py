"""Structured logging, configured once: JSON when not a TTY, readable console when it is.

Events have stable snake_case names (``webhook_accepted``, ``document_uploaded``...). Nothing here
ever receives a secret or a presigned URL: call sites pass ids, counts, states and reasons only, and
:func:`_scrub` masks any key that looks like a credential as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SENSITIVE = ("secret", "password", "token", "apikey", "api_key", "authorization", "url_signed")


def _scrub(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        lowered = key.lower()
        if any(word in lowered for word in _SENSITIVE):
            event_dict[key] = "***"
    return event_dict


class _Stderr:
    """Standard error looked up at each write, not once: whoever replaced ``sys.stderr`` since
    (a test runner capturing output) gets the lines, and a closed capture is never written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str = "info", *, stream: Any = None, json: bool | None = None) -> None:
    out = stream or _Stderr()
    as_json = (not out.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]  # a TextIO duck
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)
