"""The console with 200 connections and 100,000 documents: every page's latency through `relay serve`
(one worker, a real socket), and how many documents each page's statements return or read.

Each page is asked for WARMUP times, then REQUESTS times one after another; the median and the 95th
percentile are reported beside the 200 ms target. Then the statements behind the document pages are
run under ``EXPLAIN (ANALYZE, FORMAT JSON)`` with the same arguments, to show the rows they return and
the rows or index entries they read, against the 100,000 documents there are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import statistics
import time
import uuid
from typing import Any, Final

import httpx
import orjson

from bench import common
from relay import config
from relay.broker import amqp
from relay.domain import invitations
from relay.store import queries

CONNECTIONS: Final = 200
DOCUMENTS: Final = 100_000
BIGGEST: Final = 20_000  # the first client's documents; the others share the rest
RUNS: Final = 30
DEAD_LETTERS: Final = 50
WARMUP: Final = 3
REQUESTS: Final = 30
TARGET_MS: Final = 200.0
TOKEN: Final = "bench-admin-token-0123456789"
FORM: Final = {"content-type": "application/x-www-form-urlencoded"}
_CSRF: Final = re.compile(r'name="csrf_token" value="([^"]+)"')


async def _fill(pool: Any, settings: config.Settings) -> list[uuid.UUID]:
    """Fill the database: 200 connections (one client with 20,000 documents), 100,000 documents (mostly uploaded; some pending, skipped, failed, in doubt,
    with their attempts), 30 runs whose reports name every connection, 20 invitations."""
    ids = [await common.insert_connection(pool, settings) for _ in range(CONNECTIONS)]
    await pool.execute(
        "UPDATE connections c SET client_name = 'Client ' || lpad(n::text, 3, '0') "
        "FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM connections) o "
        "WHERE o.id = c.id"
    )
    await pool.execute(
        """
        INSERT INTO documents (connection_id, source, qonto_resource_id, qonto_attachment_id,
            direction, state, reason, file_name, uploaded_at, cegid_document_id, created_at)
        SELECT ($1::uuid[])[CASE WHEN i <= $4 THEN 1 ELSE 2 + (i - $4 - 1) % ($3 - 1) END], (ARRAY['transaction', 'supplier_invoice',
                'client_invoice'])[1 + i % 3],
               'res-' || i, 'att-' || i, 'PURCHASE',
               CASE WHEN i % 100 < 90 THEN 'uploaded' WHEN i % 100 < 95 THEN 'pending'
                    WHEN i % 100 < 97 THEN 'skipped' WHEN i % 100 < 99 THEN 'failed'
                    ELSE 'in_doubt' END,
               CASE WHEN i % 100 BETWEEN 95 AND 96 THEN 'deleted before sync'
                    WHEN i % 100 BETWEEN 97 AND 98 THEN 'Cegid refused the file (HTTP 415)' END,
               '2026-11-' || lpad((1 + i % 28)::text, 2, '0') || '_Shop-' || i || '_receipt.pdf',
               CASE WHEN i % 100 < 90 THEN now() - make_interval(mins => i % 5000) END,
               CASE WHEN i % 100 < 90 THEN 'loop-' || i END,
               now() - make_interval(secs => $2 - i)
        FROM generate_series(1, $2) AS i
        """,
        ids,
        DOCUMENTS,
        CONNECTIONS,
        BIGGEST,
    )
    await pool.execute(
        """
        INSERT INTO uploads (document_id, worker, finished_at, outcome, http_status, cegid_answer,
                             error)
        SELECT id, 1, now(), CASE state WHEN 'failed' THEN 'failed' ELSE 'in_doubt' END,
               CASE state WHEN 'failed' THEN 415 END,
               CASE state WHEN 'failed' THEN '{"statusCode": 415}'::jsonb END,
               'Cegid refused the file (HTTP 415)'
        FROM documents WHERE state IN ('failed', 'in_doubt')
        """
    )
    names = {
        r["id"]: r["client_name"]
        for r in await pool.fetch("SELECT id, client_name FROM connections")
    }
    for n in range(RUNS):
        started = dt.datetime.now(dt.UTC) - dt.timedelta(days=RUNS - n)
        report = {
            "kind": "scheduled",
            "started_at": started.isoformat(),
            "totals": {"uploaded": 450, "skipped": 10, "failed": 10, "in_doubt": 5, "pending": 25},
            "connections": [
                {
                    "connection_id": str(c),
                    "client_name": names[c],
                    "dossier": "BENCH001",
                    "state": "active",
                    "uploaded": 3,
                    "skipped": {"deleted before sync": 1},
                    "failed": {},
                    "in_doubt": 0,
                    "in_doubt_total": 0,
                    "recovered_in_doubt": 0,
                    "pending": {},
                    "needs_attention": None,
                    "warnings": [],
                    "scan": None,
                }
                for c in ids
            ],
            "exit_code": 0,
        }
        await pool.execute(
            "INSERT INTO runs (kind, scheduled_for, started_at, finished_at, report) "
            "VALUES ('scheduled', $1, $2::timestamptz, $2::timestamptz + interval '3 minutes', $3)",
            started.date(),
            started,
            report,
        )
    for n in range(20):
        await invitations.create(settings, pool, f"Prospect {n}")
    await pool.execute("VACUUM ANALYZE")
    return ids


async def _dead_letters(settings: config.Settings) -> None:
    async with amqp.connection(settings, name="bench-console") as conn:
        publisher = await amqp.Publisher.open(conn, settings)
        try:
            for n in range(DEAD_LETTERS):
                await publisher.publish(
                    settings.dead_letter_queue,
                    orjson.dumps({"id": f"evt-{n}", "type": "v2/transactions", "data": {}}),
                    message_id=f"evt-{n}",
                    headers={
                        amqp.HEADER_DLQ_ID: f"dl-{n}",
                        amqp.HEADER_REASON: "unknown version of a used topic: v2/transactions",
                    },
                )
        finally:
            await publisher.close()


async def _sign_in(client: httpx.AsyncClient) -> None:
    form = await client.get("/console/login")
    token = _CSRF.search(form.text)
    assert token is not None
    done = await client.post(
        "/console/login", data={"csrf_token": token.group(1), "admin_token": TOKEN}, headers=FORM
    )
    if done.status_code != 303:
        raise RuntimeError(f"sign-in refused: {done.status_code}")


async def _latency(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    timings = []
    size = 0
    for n in range(WARMUP + REQUESTS):
        started = time.perf_counter()
        answer = await client.get(path)
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code}")
        if n >= WARMUP:
            timings.append(elapsed)
            size = len(answer.content)
    timings.sort()
    return {
        "median_ms": statistics.median(timings),
        "p95_ms": timings[int(0.95 * (len(timings) - 1))],
        "bytes": size,
    }


def _documents_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Find the plan's nodes that read the documents table or its indexes."""
    found = []
    if plan.get("Relation Name") == "documents":
        found.append(plan)
    for child in plan.get("Plans", []):
        found.extend(_documents_nodes(child))
    return found


async def _read_by(pool: Any, name: str, *args: Any) -> dict[str, Any]:
    """Count the rows the statement returns, and the documents rows or index entries it reads."""
    async with pool.acquire() as conn:
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {queries.get(name)}", *args)
    plan = (orjson.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    nodes = _documents_nodes(plan)
    read = sum(
        int(n["Actual Rows"] * n["Actual Loops"]) + int(n.get("Rows Removed by Filter", 0))
        for n in nodes
    )
    return {
        "returned": int(plan["Actual Rows"]),
        "documents_read": read,
        "scans": sorted({n["Node Type"] for n in nodes}),
    }


async def run() -> list[common.Figure]:
    port = common.free_port()
    settings = common.settings_for(
        "console",
        admin_token=config.Secret(TOKEN),
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        qonto_client_id="bench-oauth-app",
        qonto_client_secret=config.Secret("bench-oauth-secret"),
    )
    figures: list[common.Figure] = []
    async with common.environment_ready(settings) as pool:
        ids = await _fill(pool, settings)
        await _dead_letters(settings)
        env = {
            **common.environment(settings),
            "RELAY_ADMIN_TOKEN": TOKEN,
            "RELAY_WORKERS": "1",
            "RELAY_PUBLIC_URL": settings.public_url,
        }
        server = common.start(common.relay_command("serve"), env)
        try:
            async with httpx.AsyncClient(base_url=settings.public_url, timeout=30) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError("relay serve did not start")
                    await asyncio.sleep(0.1)
                await _sign_in(client)
                busiest = ids[0]
                page_two = await pool.fetchval(
                    "SELECT id FROM documents WHERE connection_id = $1 ORDER BY id DESC "
                    "OFFSET 50 LIMIT 1",
                    busiest,
                )
                run_id = await pool.fetchval("SELECT max(id) FROM runs")
                pages = {
                    "Today (connections)": "/console/",
                    "a connection, newest documents": f"/console/connections/{busiest}",
                    "a connection, second page": f"/console/connections/{busiest}?before={page_two}",
                    "a connection, failed only": f"/console/connections/{busiest}?state=failed",
                    "a connection, file-name search": f"/console/connections/{busiest}?q=Shop-77",
                    "runs": "/console/runs",
                    "a run's report (200 connections)": f"/console/runs/{run_id}",
                    "dead letters (50)": "/console/dead-letters",
                    "a dead letter": "/console/dead-letters/dl-7",
                    "invitations": "/console/invitations",
                    "health": "/console/health",
                }
                for label, path in pages.items():
                    measured = await _latency(client, path)
                    figures.append(
                        common.Figure(
                            f"console: {label}, median",
                            measured["median_ms"],
                            "ms",
                            target=f"< {TARGET_MS:.0f} ms",
                            met=measured["p95_ms"] < TARGET_MS,
                            detail={**measured, "path": path.split("?")[0]},
                        )
                    )
        finally:
            common.stop(server)
        reads = {
            "Today: connections with last deposits": await _read_by(pool, "console_connections"),
            "Today: counts by state": await _read_by(pool, "count_documents_by_state", None),
            "connection: counts by state": await _read_by(
                pool, "count_documents_by_state", busiest
            ),
            "connection: newest page": await _read_by(
                pool, "console_documents_page", busiest, None, None, None, None, 51
            ),
            "connection: second page": await _read_by(
                pool, "console_documents_page", busiest, None, None, None, page_two, 51
            ),
            "connection: failed only": await _read_by(
                pool, "console_documents_page", busiest, "failed", None, None, None, 51
            ),
            "connection: search": await _read_by(
                pool, "console_documents_page", busiest, None, None, "%Shop-77%", None, 51
            ),
        }
        for label, read in reads.items():
            figures.append(
                common.Figure(
                    f"console rows: {label}",
                    read["documents_read"],
                    "documents read",
                    ceiling=DOCUMENTS,
                    ceiling_name="every document",
                    detail=read,
                )
            )
    return figures
