"""The HTTP edge as a Starlette application, and the lifespan that owns its resources.

It serves webhook intake, health, metrics, the admin API and the web pages (the client's setup,
:mod:`relay.edge.pages`); :func:`create_app` builds it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, Router

from relay import config, crypto, errors, log, store
from relay.broker import amqp
from relay.domain import heartbeat, status
from relay.edge import admin, guard, metrics, secret_cache, webhook
from relay.edge.pages import site
from relay.store import db

logger = log.get(__name__)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(db.ping(state.pool), timeout=2)
        checks["postgresql"] = "ok"
    except (errors.DatabaseUnavailable, TimeoutError) as exc:
        checks["postgresql"] = f"unavailable: {exc}"
    try:
        await asyncio.wait_for(amqp.ping(state.amqp), timeout=2)
        checks["rabbitmq"] = "ok"
    except (errors.BrokerUnavailable, TimeoutError) as exc:
        checks["rabbitmq"] = f"unavailable: {exc}"
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse(checks, status_code=200 if ok else 503)


async def metrics_endpoint(request: Request) -> Response:
    state = request.app.state
    stats: metrics.Metrics = state.metrics
    limits: guard.Limits = state.connection_limits
    stats.set_connections(limits.open, limits.refused)
    with contextlib.suppress(errors.DatabaseUnavailable, TimeoutError):
        counts = await asyncio.wait_for(store.documents.count_by_state(state.pool, None), timeout=2)
        totals: dict[str, int] = {}
        for count in counts:
            totals[count.state] = totals.get(count.state, 0) + count.n
        stats.set_documents(totals)
    with contextlib.suppress(errors.RelayError, TimeoutError):
        report = await asyncio.wait_for(
            status.check(state.settings, state.pool, state.amqp, confirm=False), timeout=3
        )
        stats.set_status(report)
    with contextlib.suppress(errors.DatabaseUnavailable, TimeoutError):
        stats.set_last_scheduled_run(
            await asyncio.wait_for(store.runs.last_scheduled(state.pool), 2)
        )
    return Response(stats.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


def create_app(settings: config.Settings, *, command: str = "serve") -> Starlette:
    """Build the application for ``command``, the relay command serving it (for its heartbeat)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        """Open every resource the application uses and put it on ``app.state``.

        The pool, the AMQP connection (``amqp``), its confirm channel (``publisher``), the secret
        cache (``secrets``) and the ``serve`` role's heartbeat (``work``: webhooks accepted) live as
        long as the application, beside ``settings``, ``box``, ``metrics``, ``connection_limits``,
        ``bodies`` and the intake's ``Desk`` (``intake``), which uses several of them.
        """
        app.state.settings = settings
        app.state.box = crypto.Box(settings.secret_key.reveal())
        app.state.metrics = metrics.create()
        app.state.work = heartbeat.Work()
        app.state.connection_limits = guard.Limits.from_settings(settings)
        app.state.bodies = webhook.BodyBudget(settings.body_buffer_bytes)
        async with (
            heartbeat.beating(settings, "serve", command=command, work=app.state.work),
            db.pool_for(settings, min_size=1, max_size=4) as pool,
        ):
            app.state.pool = pool
            async with amqp.connection(settings, name="relay-serve") as conn:
                app.state.amqp = conn
                channel = await conn.channel()
                await amqp.declare(channel, settings)
                await channel.close()
                publisher = await amqp.Publisher.open(conn, settings)
                app.state.publisher = publisher
                cache = secret_cache.SecretCache(settings, pool)
                await cache.start()
                app.state.secrets = cache
                app.state.intake = webhook.Desk(
                    cache,
                    app.state.bodies,
                    amqp.Batcher(publisher, on_sent=app.state.metrics.published),
                    app.state.metrics,
                    app.state.work,
                )
                logger.info("serve_started", host=settings.host, port=settings.port)
                try:
                    # the lifespan state: uvicorn hands it to each connection's protocol (guard)
                    yield {
                        guard.STATE_KEY: app.state.connection_limits,
                        webhook.STATE_KEY: app.state.intake,
                    }
                finally:
                    await cache.close()
                    await publisher.close()
                    logger.info("serve_stopped")

    application = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Mount("/admin", app=Router(routes=admin.routes(), redirect_slashes=False)),
            *site.routes(settings),
        ],
        middleware=[
            Middleware(webhook.Intake),  # POST /webhooks/qonto/{id}: answered before routing
            Middleware(admin.Authenticate),  # all of /admin, before routing
        ],
        lifespan=lifespan,
    )
    # A path with a trailing slash is 404, never a redirect: Starlette would build its Location from
    # the request's Host header, which anyone can set.
    application.router.redirect_slashes = False
    return application
