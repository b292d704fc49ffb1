"""The console's routes, under ``/console``."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from relay.edge.console import actions, auth, pages
from relay.edge.pages import views


def routes() -> list[BaseRoute]:
    page, action, guarded = auth.page, auth.action, views.guarded
    return [
        Route("/login", guarded(pages.login), methods=["GET"]),
        Route("/login", guarded(actions.sign_in), methods=["POST"]),
        Route("/logout", guarded(actions.sign_out), methods=["POST"]),
        Route("/", page(pages.today), methods=["GET"]),
        Route("/connections/{connection_id}", page(pages.connection), methods=["GET"]),
        Route(
            "/connections/{connection_id}/{what}",
            action(actions.connection_action),
            methods=["POST"],
        ),
        Route("/documents/{document_id}/{what}", action(actions.document_action), methods=["POST"]),
        Route("/runs", page(pages.runs_page), methods=["GET"]),
        Route("/runs", action(actions.flush_now), methods=["POST"]),
        Route("/runs/{run_id}", page(pages.run_page), methods=["GET"]),
        Route("/dead-letters", page(pages.dead_letters), methods=["GET"]),
        Route("/dead-letters/{what}", action(actions.letter_action), methods=["POST"]),
        Route("/dead-letters/{letter_id}", page(pages.dead_letter), methods=["GET"]),
        Route("/invitations", page(pages.invitations_get), methods=["GET"]),
        Route("/invitations", guarded(actions.create_invitation), methods=["POST"]),
        Route("/invitations/revoke", action(actions.revoke_invitation), methods=["POST"]),
        Route("/health", page(pages.health), methods=["GET"]),
    ]
