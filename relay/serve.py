"""`relay serve`: uvicorn with ``RELAY_WORKERS`` processes, uvloop and httptools when installed."""

from __future__ import annotations

import importlib.util

import uvicorn
from starlette.applications import Starlette

from relay import app, config, log


def _factory() -> Starlette:
    """Each worker process rebuilds the settings from the environment (already validated)."""
    settings = config.from_env()
    log.configure(settings.log_level)
    return app.create_app(settings)


def run(settings: config.Settings) -> None:
    uvicorn.run(
        "relay.serve:_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=False,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
