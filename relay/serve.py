"""`relay serve`: uvicorn with ``RELAY_WORKERS`` processes, uvloop and httptools when installed.

Each worker process builds its own application (own pool, AMQP connection, confirm channel, secret
cache and metrics registry): with several workers, Prometheus sees whichever worker answered a scrape.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import uvicorn
from starlette.applications import Starlette

from relay import app, config, log

GRACEFUL_SHUTDOWN_S = 10


def _factory() -> Starlette:
    """Each worker process rebuilds the settings from the environment (already validated)."""
    settings = config.from_env()
    log.configure(settings.log_level)
    return app.create_app(settings)


def options(settings: config.Settings) -> dict[str, Any]:
    """uvicorn's keyword arguments for these settings (the application aside)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "access_log": False,  # the intake logs one line per webhook itself
        "log_level": "warning",
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }


def run(settings: config.Settings) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests get ``GRACEFUL_SHUTDOWN_S`` to finish."""
    if settings.workers == 1:
        uvicorn.run(app.create_app(settings), **options(settings))
        return
    uvicorn.run("relay.serve:_factory", factory=True, workers=settings.workers, **options(settings))
