"""The web pages mounted on the application: ``/setup`` and the stylesheet under ``/static``, each
behind the security headers."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Router
from starlette.staticfiles import StaticFiles

from relay import config
from relay.edge.pages import security, setup, templates


def routes(settings: config.Settings) -> list[BaseRoute]:
    return [
        Mount(
            "/setup",
            app=security.Headers(Router(routes=setup.routes()), settings),
        ),
        Mount(
            "/static",
            app=security.Headers(StaticFiles(directory=templates.STATIC), settings),
        ),
    ]
