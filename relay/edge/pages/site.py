"""The web pages mounted on the application, each behind the security headers.

The setup is under ``/setup``, the operators' console under ``/console``, the stylesheet under
``/static``.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles

from relay import config
from relay.edge.console import routes as console
from relay.edge.pages import consent, create, security, setup, templates, views


def setup_routes() -> list[BaseRoute]:
    """List the setup pages' routes (under ``/setup``, fixed paths before the link's token)."""
    guarded = views.guarded
    return [
        Route("/oauth/callback", guarded(consent.callback), methods=["GET"]),
        Route("/qonto", guarded(setup.qonto_step), methods=["GET"]),
        Route("/qonto", guarded(setup.connect), methods=["POST"]),
        Route("/key", guarded(setup.key_step), methods=["GET"]),
        Route("/key", guarded(setup.save_key), methods=["POST"]),
        Route("/dossier", guarded(setup.dossier_step), methods=["GET"]),
        Route("/dossier", guarded(setup.save_dossier), methods=["POST"]),
        Route("/hub", guarded(setup.hub_step), methods=["GET"]),
        Route("/create", guarded(create.create), methods=["POST"]),
        Route("/ready", guarded(create.ready), methods=["GET"]),
        Route("/{token}", guarded(setup.entry), methods=["GET"]),
    ]


def routes(settings: config.Settings) -> list[BaseRoute]:
    return [
        Mount(
            "/setup",
            app=security.Headers(Router(routes=setup_routes(), redirect_slashes=False), settings),
        ),
        Mount(
            "/console",
            app=security.Headers(Router(routes=console.routes(), redirect_slashes=False), settings),
        ),
        Mount(
            "/static",
            app=security.Headers(StaticFiles(directory=templates.STATIC), settings),
        ),
    ]
