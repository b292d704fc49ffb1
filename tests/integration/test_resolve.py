"""`relay documents resolve ID --uploaded|--resend`: an operator settles an in-doubt document."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from consumers import flusher
from relay import config, errors, models
from relay.domain import resolve
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories


async def _in_doubt(
    settings: config.Settings,
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    connection_id: uuid.UUID,
    content: bytes,
) -> int:
    """A document whose deposit got no answer (Loop stored it, then dropped the connection)."""
    tx, attachment = factories.receipt(qonto, content, seed=1)
    await factories.ingest_transaction(pool, connection_id, tx)
    loop.faults.push("store_then_drop")
    await flusher.flush(settings, pool, sleep=factories.no_wait)
    record = await pool.fetchrow(
        "SELECT id, state FROM documents WHERE qonto_attachment_id = $1", attachment
    )
    assert record is not None
    assert record["state"] == "in_doubt"
    return int(record["id"])


async def _content_holders(pool: asyncpg.Pool) -> list[int]:
    return [r["document_id"] for r in await pool.fetch("SELECT document_id FROM dossier_contents")]


async def _attempts(pool: asyncpg.Pool, document_id: int) -> list[str]:
    rows = await pool.fetch(
        "SELECT outcome FROM uploads WHERE document_id = $1 ORDER BY id", document_id
    )
    return [r["outcome"] for r in rows]


async def test_uploaded_settles_the_document_and_keeps_its_content_in_the_dossier(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """--uploaded: uploaded with the operator's reason; the same bytes later are a duplicate."""
    content = files.pdf(seed=11)
    document_id = await _in_doubt(upstream_settings, pool, qonto, loop, connection_id, content)
    resolved = await resolve.resolve(pool, document_id, uploaded=True)
    assert (resolved.state, resolved.reason) == ("uploaded", "confirmed in Loop by an operator")
    assert resolved.uploaded_at is not None
    assert await _content_holders(pool) == [document_id]
    assert await _attempts(pool, document_id) == ["in_doubt"]
    tx, copy = factories.receipt(qonto, content, seed=2)
    await factories.ingest_transaction(pool, connection_id, tx)
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    duplicate = await pool.fetchrow(
        "SELECT state, reason FROM documents WHERE qonto_attachment_id = $1", copy
    )
    assert duplicate is not None
    assert duplicate["state"] == "skipped"
    assert duplicate["reason"].startswith(models.SKIP_DUPLICATE)
    assert len(loop.stored) == 1


async def test_resend_requeues_the_document_and_releases_its_content(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """--resend: pending with the operator's reason, not deduped against itself, history kept."""
    document_id = await _in_doubt(
        upstream_settings, pool, qonto, loop, connection_id, files.pdf(seed=12)
    )
    resolved = await resolve.resolve(pool, document_id, uploaded=False)
    assert (resolved.state, resolved.reason) == ("pending", "resend requested by an operator")
    assert await _content_holders(pool) == []
    assert await _attempts(pool, document_id) == ["in_doubt"]
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert await _attempts(pool, document_id) == ["in_doubt", "uploaded"]
    assert len(loop.stored) == 2  # the operator said the first copy was not in Loop


async def test_only_an_in_doubt_document_can_be_resolved(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Pending, uploaded, or resolved already: refused with the state, nothing changes."""
    tx, attachment = factories.receipt(qonto, seed=3)
    await factories.ingest_transaction(pool, connection_id, tx)
    pending = await pool.fetchval(
        "SELECT id FROM documents WHERE qonto_attachment_id = $1", attachment
    )
    with pytest.raises(errors.Refused, match="is pending, not in_doubt"):
        await resolve.resolve(pool, pending, uploaded=True)
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    with pytest.raises(errors.Refused, match="is uploaded, not in_doubt"):
        await resolve.resolve(pool, pending, uploaded=False)
    assert await pool.fetchval("SELECT state FROM documents WHERE id = $1", pending) == "uploaded"
    assert await _attempts(pool, pending) == ["uploaded"]


async def test_an_unknown_document_is_not_found(pool: asyncpg.Pool) -> None:
    """A document id that does not exist: NotFound, naming it."""
    with pytest.raises(errors.NotFound, match="no document 987654"):
        await resolve.resolve(pool, 987654, uploaded=True)
