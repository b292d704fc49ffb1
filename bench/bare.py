"""The intake's ceiling: a bare Starlette endpoint that only reads the body and answers 202.

Served exactly like `relay serve` (same server, worker count, event loop and HTTP parser), so the
ratio relay/bare shows what verifying, publishing and waiting for RabbitMQ's confirm cost.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    await request.body()
    return Response(b'{"status":"queued"}', status_code=202, media_type="application/json")


app = Starlette(routes=[Route("/webhooks/qonto/{connection_id}", webhook, methods=["POST"])])
