"""The intake's reference: a minimal Starlette endpoint that checks Qonto's HMAC and publishes the
body with a publisher confirm to a quorum queue (aio-pika), served like `relay serve` (uvicorn,
uvloop, httptools, same worker count). The relay should accept more webhooks per second than this.

    REFERENCE_SECRET=... REFERENCE_AMQP_URL=... REFERENCE_QUEUE=... uvicorn bench.reference:app
"""

import contextlib
import hashlib
import hmac
import os
import time

import aio_pika
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SECRET, QUEUE = os.environ["REFERENCE_SECRET"].encode(), os.environ["REFERENCE_QUEUE"]


async def webhook(request: Request) -> JSONResponse:
    body = await request.body()
    fields = dict(p.split("=", 1) for p in request.headers.get("x-qonto-signature", "").split(","))
    expected = hmac.new(SECRET, fields.get("t", "").encode() + b"." + body, hashlib.sha256)
    if abs(time.time() - int(fields.get("t", 0))) > 300 or not hmac.compare_digest(
        expected.hexdigest(), fields.get("v1", "")
    ):
        return JSONResponse({"error": "bad signature"}, status_code=401)
    message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await request.app.state.channel.default_exchange.publish(message, routing_key=QUEUE)
    return JSONResponse({"status": "queued"}, status_code=202)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
    async with await aio_pika.connect_robust(os.environ["REFERENCE_AMQP_URL"]) as connection:
        app.state.channel = await connection.channel(publisher_confirms=True)
        yield


app = Starlette(
    routes=[Route("/webhooks/qonto/{connection_id}", webhook, methods=["POST"])], lifespan=lifespan
)
