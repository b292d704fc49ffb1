"""The ``relay serve`` command, uvicorn in ``RELAY_WORKERS`` processes (uvloop, httptools if there).

Each worker process builds its own application (own pool, AMQP connection, confirm channel, secret
cache and metrics registry): with several workers, Prometheus sees whichever worker answered a scrape.
:func:`run` says how a start fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
from typing import Any

import uvicorn
import uvicorn.supervisors
from starlette.applications import Starlette

from relay import config, errors, log, store
from relay.broker import amqp
from relay.edge import app, guard
from relay.store import db, queries

GRACEFUL_SHUTDOWN_S = 10
STARTUP_FAILURE = 3  # uvicorn's exit status for a worker that could not start


class StartFailed(errors.RelayError):
    """A ``relay serve`` that could not start (port in use, a dependency down, a worker failed).

    The command exits 1.
    """


def _factory() -> Starlette:
    """Build a worker's application from the environment's settings (validated already)."""
    settings = config.from_env()
    log.configure(settings.log_level)
    return app.create_app(settings)


def options(settings: config.Settings) -> dict[str, Any]:
    """Build uvicorn's keyword arguments for these settings (the application aside).

    The HTTP protocol is :class:`relay.edge.guard.Guard` (uvicorn's httptools protocol behind the
    relay's bounds on connections, head size and the time to send a request).
    """
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": guard.Guard,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "access_log": False,  # the intake logs one line per webhook itself
        "log_level": "warning",
        "log_config": None,  # uvicorn's records go through relay.log's handler (JSON when no TTY)
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }


async def check_dependencies(settings: config.Settings) -> None:
    """Check that PostgreSQL answers with every migration applied and that RabbitMQ answers.

    Raises StartFailed when one does not answer, ConfigurationError when a migration is missing.
    """
    try:
        conn = await db.connect(settings)
    except errors.DatabaseUnavailable as exc:
        raise StartFailed(f"cannot start: {exc} (RELAY_DATABASE_URL)") from exc
    try:
        applied = await store.server.applied_migrations(conn)
    finally:
        await conn.close()
    missing = [version for version, _ in queries.migrations() if version not in applied]
    if missing:
        raise errors.ConfigurationError(
            f"the database schema is not up to date ({', '.join(missing)} not applied): "
            "run `relay migrate`"
        )
    try:
        async with amqp.connection(settings, name="relay-serve-check") as broker:
            await amqp.ping(broker)
    except errors.BrokerUnavailable as exc:
        raise StartFailed(f"cannot start: {exc} (RELAY_AMQP_URL)") from exc


def bind(settings: config.Settings) -> socket.socket:
    """Bind the listening socket in the parent, shared by every worker (StartFailed if taken)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise StartFailed(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}): "
            "set RELAY_HOST/RELAY_PORT or stop what uses it"
        ) from exc
    return sock


def run(settings: config.Settings) -> None:
    """Serve until SIGTERM/SIGINT, giving in-flight requests ``GRACEFUL_SHUTDOWN_S`` to finish.

    A start that cannot succeed fails the command, whatever the number of workers: before any
    worker is started, the parent binds the port and checks that PostgreSQL (with an up-to-date
    schema) and RabbitMQ answer, and raises :class:`StartFailed` (exit 1) or
    :class:`~relay.errors.ConfigurationError` (exit 2) with one clear line. A worker that still
    fails to start fails the command too. Returns after a clean stop.
    """
    asyncio.run(check_dependencies(settings))
    sock = bind(settings)
    try:
        if settings.workers == 1:
            server = uvicorn.Server(uvicorn.Config(app.create_app(settings), **options(settings)))
            server.run(sockets=[sock])
            started = server.started
        else:
            uv_config = uvicorn.Config(
                "relay.edge.serve:_factory",
                factory=True,
                workers=settings.workers,
                **options(settings),
            )
            supervisor = uvicorn.supervisors.Multiprocess(uv_config, sockets=[sock])
            supervisor.run()
            started = not any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    except SystemExit as exc:  # uvicorn's exit when the application cannot start
        raise StartFailed(
            "cannot start: the application failed to start (see the log above)"
        ) from exc
    finally:
        sock.close()
    if not started:
        raise StartFailed("cannot start: a worker failed to start (see the log above)")
