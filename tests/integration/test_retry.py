"""`relay documents retry ID`: a document Loop refused goes back to pending once its cause is fixed,
and reaches Loop at the next flush; only a failed document can be retried."""

from __future__ import annotations

import json
import uuid

import asyncpg

from consumers import flusher
from relay import config
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories
from tests.integration.web import conftest as web


async def test_a_failed_document_is_retried_from_the_command_line_and_then_uploaded(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Refused once (400): failed; retried: pending with the operator's reason; flushed: uploaded.
    A second retry is refused (exit 1) and changes nothing."""
    tx, _ = factories.receipt(qonto, seed=3)
    await factories.ingest_transaction(pool, connection_id, tx)
    loop.faults.push("400")
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    document_id = await pool.fetchval("SELECT id FROM documents WHERE state = 'failed'")
    assert document_id is not None

    done = web.relay_command(upstream_settings, "documents", "retry", str(document_id), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["state"], shown["reason"]) == ("pending", "retry requested by an operator")

    again = web.relay_command(upstream_settings, "documents", "retry", str(document_id))
    assert again.returncode == 1
    assert "not failed" in again.stderr
    assert await pool.fetchval("SELECT state FROM documents") == "pending"

    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert await pool.fetchval("SELECT state FROM documents") == "uploaded"
    assert len(loop.stored) == 1
