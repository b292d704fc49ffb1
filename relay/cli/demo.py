"""The ``relay demo`` command, a day of Qonto activity becoming documents in a Loop client file.

:func:`run` plays the day and checks what Loop received; :func:`run_web` (``relay demo --web``)
lets a newcomer walk a client's setup in the browser instead. Qonto and Cegid Loop are the
project's own sandbox servers on loopback; everything else is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import httpx
import orjson
import uvicorn

from consumers import consume, flusher
from relay import config, crypto, log, models, store
from relay.broker import amqp
from relay.cli import console
from relay.domain import connections, credentials, documents, inputs, invitations, report
from relay.edge import app
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files, signing
from relay.sandbox import qonto as qonto_sandbox
from relay.store import db

WEBHOOK_SECRET = "demo-webhook-secret-" + "0123456789abcdef"
DOSSIER = "DEMO001"
CEGID_KEY, CEGID_SECRET = "demo-firm-key", "demo-firm-secret"


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.perf_counter()

    def step(self, text: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{elapsed:5.1f}s] {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_database_url() -> str:
    return os.environ.get("RELAY_DATABASE_URL", config.DEFAULTS["RELAY_DATABASE_URL"])


@contextlib.asynccontextmanager
async def _intake(settings: config.Settings, port: int) -> AsyncIterator[None]:
    server = uvicorn.Server(
        uvicorn.Config(
            app.create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("the webhook intake did not start")
            await asyncio.sleep(0.02)
        yield
    finally:
        server.should_exit = True
        await task


def _seed_day(
    q: qonto_sandbox.QontoSandbox,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seed a realistic day in the Qonto sandbox and return its events.

    Card receipts, a credit, a HEIC photo, a paid client invoice (morning), and in the afternoon a
    wrong photo removed from its transaction before the flush.
    """
    events: list[dict[str, Any]] = []

    def receipt(content: bytes, name: str, content_type: str) -> str:
        return q.add_attachment(content, file_name=name, content_type=content_type)

    lunch = q.add_transaction(
        side="debit",
        amount="84.00",
        label="RESTAURANT LE PETIT ZINC",
        counterparty="Le Petit Zinc",
        attachment_ids=[receipt(files.jpeg(seed=1), "ticket-petit-zinc.jpg", "image/jpeg")],
    )
    events.append(q.transaction_event(lunch))
    events.append(events[-1])  # Qonto delivers the same event twice: a no-op
    taxi = q.add_transaction(
        side="debit",
        amount="23.40",
        label="G7 TAXI",
        counterparty="G7",
        attachment_ids=[receipt(files.png(seed=2), "recu-g7.png", "image/png")],
    )
    events.append(q.transaction_event(taxi))
    hosting = q.add_transaction(
        side="debit",
        amount="71.88",
        label="OVH SAS",
        counterparty="OVH",
        attachment_ids=[receipt(files.pdf(seed=3), "facture-ovh.pdf", "application/pdf")],
    )
    events.append(q.transaction_event(hosting))
    photo = q.add_transaction(
        side="debit",
        amount="12.50",
        label="BOULANGERIE PAUL",
        counterparty="Paul",
        attachment_ids=[receipt(files.heic(seed=4), "IMG_2041.HEIC", "image/heic")],
    )
    events.append(q.transaction_event(photo))
    wrong = receipt(files.jpeg(seed=5), "mauvais-ticket.jpg", "image/jpeg")
    right = receipt(files.pdf(seed=6), "facture-materiel.pdf", "application/pdf")
    supplies = q.add_transaction(
        side="debit",
        amount="249.90",
        label="BUREAU VALLEE",
        counterparty="Bureau Vallee",
        attachment_ids=[wrong, right],
    )
    events.append(q.transaction_event(supplies))
    q.delete_attachment(wrong)  # the wrong photo is removed in the afternoon, before the flush
    afternoon = [q.transaction_event(q.update_transaction(supplies["id"], attachment_ids=[right]))]
    income = q.add_transaction(
        side="credit",
        amount="1440.00",
        label="VIREMENT CLIENT ATELIER NOVA",
        counterparty="Atelier Nova",
        attachment_ids=[receipt(files.pdf(seed=7), "avis-virement.pdf", "application/pdf")],
    )
    events.append(q.transaction_event(income))
    invoice = q.add_client_invoice(
        attachment_id=receipt(files.pdf(seed=8), "F-2026-0117.pdf", "application/pdf"),
        status="paid",
        total="1440.00",
    )
    events.append(q.client_invoice_event(invoice, with_attachment_id=False))
    return events, afternoon


async def _deliver(client: httpx.AsyncClient, url: str, events: list[dict[str, Any]]) -> list[int]:
    statuses = []
    for event in events:
        body = orjson.dumps(event)
        response = await client.post(
            url,
            content=body,
            headers={
                "content-type": "application/json",
                "x-qonto-signature": signing.sign(body, WEBHOOK_SECRET),
            },
        )
        statuses.append(response.status_code)
    return statuses


async def _wait_for_events(pool: Any, expected: int, within_s: float = 30) -> int:
    deadline = time.monotonic() + within_s
    while True:
        count = await store.events.count(pool)
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


async def run(*, json_output: bool = False, keep: bool = False) -> int:
    """Play a day of Qonto activity through the whole relay and check what Loop received.

    Everything is real except Qonto and Cegid Loop: a throwaway database on the local PostgreSQL,
    queues of their own on the local RabbitMQ, the webhook intake on a real socket, the consumer,
    the daily scan and the flush. The demo exits 0 only if Loop received every eligible file
    exactly once and every other document says why it was not sent.
    """
    log.configure("warning")
    progress = Progress(quiet=False)
    tag = uuid.uuid4().hex[:8]
    base = _base_database_url().rsplit("/", 1)[0]
    port = _free_port()
    staging = "demo-staging-token"
    progress.step("starting the Qonto and Cegid Loop sandboxes")
    with (
        qonto_sandbox.QontoSandbox(staging_token=staging) as q,
        cegid_sandbox.CegidSandbox() as loop,
    ):
        loop.add_firm(CEGID_KEY, CEGID_SECRET, dossiers=[DOSSIER], domain="CABINET-DEMO")
        settings = config.Settings(
            secret_key=config.Secret(crypto.generate_key()),
            database_url=config.Secret(f"{base}/relay_demo_{tag}"),
            amqp_url=config.Secret(
                os.environ.get("RELAY_AMQP_URL", config.DEFAULTS["RELAY_AMQP_URL"])
            ),
            qonto_api_url=q.url,
            qonto_oauth_url=q.oauth_url,
            qonto_staging_token=config.Secret(staging),
            cegid_api_url=loop.url,
            cegid_subscription_key=config.Secret(loop.subscription_key),
            public_url=f"http://127.0.0.1:{port}",
            port=port,
            amqp_prefix=f"demo.{tag}",
            log_level="warning",
        )
        progress.step(f"creating the throwaway database relay_demo_{tag} and migrating it")
        await db.create_database_if_missing(settings)
        await db.migrate(settings)
        try:
            return await _run(settings, q, loop, port, progress, json_output)
        finally:
            if not keep:
                await _cleanup(settings)
                progress.step("dropped the demo database and queues")


async def _run(
    settings: config.Settings,
    q: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    port: int,
    progress: Progress,
    json_output: bool,
) -> int:
    async with db.pool_for(settings) as pool, _intake(settings, port):
        stop = asyncio.Event()
        consumer = asyncio.create_task(consume.consume(settings, stop=stop))
        try:
            progress.step(f"webhook intake listening on http://127.0.0.1:{port}; consumer running")
            created = await _connect(settings, pool, q, progress)
            statuses = await _send_the_day(pool, q, created.webhook_url, progress)
        finally:
            stop.set()
            await consumer
        progress.step("20:00 UTC: scan of Qonto's list endpoints, then the flush to Cegid Loop")
        run = await flusher.flush(settings, pool)
        docs = await documents.list_documents(pool)
    stored = loop.stored_by_dossier(DOSSIER)
    duplicates = loop.duplicates()
    eligible = [d for d in docs if d.state == models.DocumentState.UPLOADED]
    ok = (
        all(s == 202 for s in statuses)
        and not duplicates
        and len(stored) == len(eligible)
        and all(d.state in ("uploaded", "skipped") for d in docs)
        and any(d.reason_code == models.Reason.DELETED for d in docs)
        and any(d.reason_code == models.Reason.UNSUPPORTED_TYPE for d in docs)
        and any(d.source == "supplier_invoice" and d.state == "uploaded" for d in docs)
    )
    if json_output:
        _print_json(ok, run, docs, stored)
    else:
        _print_text(ok, run, docs, stored, duplicates)
    return 0 if ok else 1


async def _connect(
    settings: config.Settings,
    pool: asyncpg.Pool,
    q: qonto_sandbox.QontoSandbox,
    progress: Progress,
) -> connections.Created:
    """Add the demo's connection, checked against both sandboxes."""
    login, _, secret = q.api_key_header.partition(":")
    created = await connections.add(
        settings,
        pool,
        inputs.NewConnection(
            client_name="Atelier Demo",
            qonto_organization_id=q.organization_id,
            qonto=credentials.QontoApiKey(login=login, secret=config.Secret(secret)),
            cegid=credentials.CegidCredentials(
                api_key=config.Secret(CEGID_KEY), api_secret=config.Secret(CEGID_SECRET)
            ),
            cegid_dossier=DOSSIER,
            cegid_domain="CABINET-DEMO",
            webhook_secrets=(WEBHOOK_SECRET,),
            since=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        ),
    )
    progress.step(
        f"connection {created.connection.id} checked against Qonto and Loop "
        f"(dossier {DOSSIER}); webhook URL {created.webhook_url}"
    )
    return created


async def _send_the_day(
    pool: asyncpg.Pool, q: qonto_sandbox.QontoSandbox, webhook_url: str, progress: Progress
) -> list[int]:
    """Deliver Qonto's day as webhooks for the consumer to buffer.

    A supplier invoice is listed rather than delivered.
    """
    events, afternoon = _seed_day(q)
    q.add_supplier_invoice(
        attachment_id=q.add_attachment(
            files.pdf(seed=9),
            file_name="OVH-FR51234567.pdf",
            content_type="application/pdf",
        ),
        supplier_name="OVH SAS",
        total="71.88",
    )
    progress.step(
        f"Qonto sends {len(events)} signed webhooks (one delivered twice); a supplier "
        "invoice exists only in Qonto's list endpoint"
    )
    async with httpx.AsyncClient(timeout=5) as client:
        statuses = await _deliver(client, webhook_url, events)
        progress.step(f"intake answered {statuses}")
        distinct = len({e["id"] for e in events})
        seen = await _wait_for_events(pool, distinct)
        progress.step(f"consumer buffered {seen}/{distinct} distinct events in PostgreSQL")
        progress.step("afternoon: a wrong photo is removed from its transaction in Qonto")
        statuses += await _deliver(client, webhook_url, afternoon)
        distinct += len(afternoon)
        seen = await _wait_for_events(pool, distinct)
        progress.step(f"consumer buffered {seen}/{distinct} distinct events in PostgreSQL")
    return statuses


def _print_json(
    ok: bool,
    run: report.RunReport,
    docs: Sequence[models.Document],
    stored: Sequence[cegid_sandbox.StoredDocument],
) -> None:
    print(
        orjson.dumps(
            {
                "ok": ok,
                "report": run.to_json(),
                "documents": [d.to_json() for d in docs],
                "loop_received": [
                    {"filename": s.filename, "transaction": s.transaction, "sha256": s.sha256}
                    for s in stored
                ],
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    )


def _print_text(
    ok: bool,
    run: report.RunReport,
    docs: Sequence[models.Document],
    stored: Sequence[cegid_sandbox.StoredDocument],
    duplicates: Sequence[str],
) -> None:
    print(run.render())
    print()
    print(
        f"Cegid Loop dossier {DOSSIER} received {len(stored)} file(s), duplicates: {len(duplicates)}"
    )
    for s in stored:
        print(f"  {s.transaction:8} {s.content_type:16} {s.filename}")
    print()
    print("Documents (relay documents list):")
    for d in docs:
        print(f"  #{d.id:<3} {d.source:16} {d.direction:8} {d.state:9} {d.reason or ''}")
    print()
    print("demo: OK" if ok else "demo: FAILED (see above)")


async def _cleanup(settings: config.Settings) -> None:
    with contextlib.suppress(Exception):
        async with amqp.connection(settings, name="demo-cleanup") as conn:
            channel = await conn.channel()
            await amqp.delete_topology(channel, settings)
    with contextlib.suppress(Exception):
        await db.drop_database(settings)


OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET = "relay-demo", "demo-oauth-client-secret"
WEB_CLIENT = "Atelier Demo"


def _web_settings(
    q: qonto_sandbox.QontoSandbox, loop: cegid_sandbox.CegidSandbox, port: int, tag: str
) -> config.Settings:
    base = _base_database_url().rsplit("/", 1)[0]
    return config.Settings(
        secret_key=config.Secret(crypto.generate_key()),
        database_url=config.Secret(f"{base}/relay_demo_{tag}"),
        amqp_url=config.Secret(os.environ.get("RELAY_AMQP_URL", config.DEFAULTS["RELAY_AMQP_URL"])),
        qonto_api_url=q.url,
        qonto_oauth_url=q.oauth_url,
        qonto_client_id=OAUTH_CLIENT_ID,
        qonto_client_secret=config.Secret(OAUTH_CLIENT_SECRET),
        qonto_staging_token=config.Secret("demo-staging-token"),
        cegid_api_url=loop.url,
        cegid_subscription_key=config.Secret(loop.subscription_key),
        public_url=f"http://127.0.0.1:{port}",
        port=port,
        amqp_prefix=f"demo.{tag}",
        log_level="warning",
        loop_provider_email_local_part="relay-demo",
    )


async def run_web(*, keep: bool = False) -> int:
    """Serve the setup in a browser against the sandboxes, until SIGINT/SIGTERM (exit 0).

    The sandboxes, the relay's HTTP edge and the consumer keep running and a setup link is printed:
    a newcomer walks the client's setup in a browser, both people's steps, on their own machine;
    once the connection exists, a signed webhook and a flush show its first file reaching Loop.
    """
    log.configure("warning")
    progress = Progress(quiet=False)
    tag = uuid.uuid4().hex[:8]
    port = int(os.environ.get("RELAY_DEMO_PORT", "0")) or _free_port()
    stop = asyncio.Event()
    console.stop_on_signals(stop)
    progress.step("starting the Qonto and Cegid Loop sandboxes")
    with (
        qonto_sandbox.QontoSandbox(staging_token="demo-staging-token") as q,
        cegid_sandbox.CegidSandbox() as loop,
    ):
        q.callback_schemes = ("https", "http")  # the demo's relay listens on plain HTTP, locally
        q.add_oauth_client(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET)
        loop.add_firm(CEGID_KEY, CEGID_SECRET, dossiers=[DOSSIER], domain="CABINET-DEMO")
        loop.add_dossier("LONELY01")  # exists in Loop, associated with no key
        settings = _web_settings(q, loop, port, tag)
        progress.step(f"creating the throwaway database relay_demo_{tag} and migrating it")
        await db.create_database_if_missing(settings)
        await db.migrate(settings)
        try:
            async with db.pool_for(settings) as pool, _intake(settings, port):
                consumer = asyncio.create_task(consume.consume(settings, stop=stop))
                try:
                    created = await invitations.create(settings, pool, WEB_CLIENT)
                    _print_walkthrough(created.setup_url)
                    await _follow_setup(settings, pool, q, loop, stop, progress)
                finally:
                    stop.set()
                    await consumer
        finally:
            if not keep:
                await _cleanup(settings)
                progress.step("dropped the demo database and queues")
    return 0


def _print_walkthrough(setup_url: str) -> None:
    print(
        f"""
Setup link for the client {WEB_CLIENT} (single use, valid 7 days):

  {setup_url}

1. As the Qonto member: open the link, press "Connect with Qonto", then "Authorize" on the
   sandbox's consent page ("Deny" shows the refusal).
2. As the accountant: API key {CEGID_KEY}, API secret {CEGID_SECRET}; Code dossier {DOSSIER},
   Domain CABINET-DEMO; read the Loop Hub values, then press "Create".
   To see Loop's refusals: a wrong secret, the dossier NOPE01 (Loop does not know it) or LONELY01
   (it exists but is not associated with the key).

Once the connection exists, a signed webhook and a flush send its first file to Loop.
Press Ctrl-C to stop (the demo database and queues are dropped).
""",
        flush=True,
    )


async def _follow_setup(
    settings: config.Settings,
    pool: Any,
    q: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    stop: asyncio.Event,
    progress: Progress,
) -> None:
    """Wait for the connection made in the browser, then show its first file reaching Loop."""
    while not stop.is_set():
        found = await connections.list_all(pool)
        if found:
            connection = found[0]
            progress.step(
                f"connection {connection.id} created in the browser: "
                f"{connection.client_name} x Qonto, dossier {connection.cegid_dossier}"
            )
            tx = q.add_transaction(
                side="debit",
                amount="84.00",
                label="RESTAURANT LE PETIT ZINC",
                counterparty="Le Petit Zinc",
                attachment_ids=[
                    q.add_attachment(
                        files.jpeg(seed=1),
                        file_name="ticket-petit-zinc.jpg",
                        content_type="image/jpeg",
                    )
                ],
            )
            statuses = await asyncio.to_thread(q.deliver, q.transaction_event(tx))
            progress.step(f"Qonto delivered a signed webhook for a card receipt: {statuses}")
            await _wait_for_events(pool, 1)
            run = await flusher.flush(settings, pool)
            stored = loop.stored_by_dossier(connection.cegid_dossier)
            uploaded = run.totals().get("uploaded", 0)
            progress.step(
                f"flush: {uploaded} document(s) uploaded; Loop dossier "
                f"{connection.cegid_dossier} holds {len(stored)} file(s)"
            )
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1)
    await stop.wait()
