"""The ledger under races and partial failures: what keeps a file from going to Loop twice or never.

Each test sets up the interleaving it is about on the real PostgreSQL (two sessions, one waiting
on the other's row lock) or makes the database refuse one statement (a trigger), then checks the
outcome in the ledger and in the Cegid sandbox's record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import uuid

import asyncpg
import pytest

from consumers import flusher, recovery, scheduler
from relay import config, errors, models
from relay.domain import connections
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from relay.store import queries
from relay.upstreams import cegid
from tests.integration import factories


async def _seed(
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    connection_id: uuid.UUID,
    content: bytes,
) -> tuple[dict[str, object], int]:
    tx, attachment = factories.receipt(qonto, content)
    await factories.ingest_transaction(pool, connection_id, tx)
    document_id = await pool.fetchval(
        "SELECT id FROM documents WHERE connection_id = $1 AND qonto_attachment_id = $2",
        connection_id,
        attachment,
    )
    return tx, int(document_id)


async def _state(pool: asyncpg.Pool, document_id: int) -> tuple[str, str | None]:
    row = await pool.fetchrow("SELECT state, reason FROM documents WHERE id = $1", document_id)
    assert row is not None
    return row["state"], row["reason"]


async def _waiting_on_a_lock(pool: asyncpg.Pool, fragment: str) -> None:
    """Until some session runs a statement containing ``fragment`` and waits on a lock."""
    async with asyncio.timeout(10):
        while not await pool.fetchval(  # noqa: ASYNC110 - no event to await: poll under a deadline
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND strpos(query, $1) > 0",
            fragment,
        ):
            await asyncio.sleep(0.01)


async def test_a_removal_applied_while_a_flush_claims_leaves_the_claimed_document_alone(
    pool: asyncpg.Pool, connection_id: uuid.UUID, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """The consumer skips a removed attachment only if it is still pending once it holds the row:
    a flush that claimed it meanwhile keeps it (else the file goes out marked skipped, and a
    re-attachment would send it again)."""
    tx, document_id = await _seed(pool, qonto, connection_id, files.pdf(seed=1))
    removed = qonto.update_transaction(str(tx["id"]), attachment_ids=[])
    async with pool.acquire() as flush_session:
        claim = flush_session.transaction()
        await claim.start()
        await flush_session.execute(
            "UPDATE documents SET state = 'uploading', claimed_by = 42 WHERE id = $1", document_id
        )
        consumer = asyncio.create_task(factories.ingest_transaction(pool, connection_id, removed))
        await _waiting_on_a_lock(pool, "SET state = 'skipped'")
        await claim.commit()
        await consumer
    assert await _state(pool, document_id) == ("uploading", None)


async def test_recovery_sees_an_attempt_committed_while_it_waited_for_the_document(
    pool: asyncpg.Pool, connection_id: uuid.UUID, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """A worker taken for dead records its attempt while a recovery waits on the row: the
    recovery must see the attempt and settle in doubt, not pending (pending would send it again)."""
    _, document_id = await _seed(pool, qonto, connection_id, files.pdf(seed=2))
    worker = 5150  # no session holds its lock: recovery takes it for dead
    await pool.execute(
        "UPDATE documents SET state = 'uploading', claimed_by = $2 WHERE id = $1",
        document_id,
        worker,
    )
    async with pool.acquire() as worker_session:
        attempt = worker_session.transaction()
        await attempt.start()
        assert await worker_session.fetchval(queries.get("start_upload"), document_id, worker)
        recovering = asyncio.create_task(recovery.recover(pool))
        await _waiting_on_a_lock(pool, "FOR UPDATE")
        await attempt.commit()
        assert await recovering == {"in_doubt": 1, "pending": 0}
    state, reason = await _state(pool, document_id)
    assert state == "in_doubt"
    assert reason is not None
    assert recovery.DIED_REASON in reason


async def test_an_attempt_is_recorded_only_by_the_worker_holding_the_document(
    pool: asyncpg.Pool, connection_id: uuid.UUID, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """start_upload returns nothing (so nothing is sent) unless the document is uploading under
    this very worker: a worker whose document was recovered by another process cannot send it."""
    _, document_id = await _seed(pool, qonto, connection_id, files.pdf(seed=3))
    start = queries.get("start_upload")
    assert await pool.fetchval(start, document_id, 1) is None  # pending: nobody's
    await pool.execute(
        "UPDATE documents SET state = 'uploading', claimed_by = 1 WHERE id = $1", document_id
    )
    assert await pool.fetchval(start, document_id, 2) is None  # another worker's
    assert await pool.fetchval(start, document_id, 1) is not None
    assert await pool.fetchval("SELECT count(*) FROM uploads") == 1


async def test_a_copy_that_never_reached_loop_gives_its_content_up(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """A receipt attached twice: the first copy took the content, then was removed before the
    flush. The second copy is sent (before: skipped as a duplicate of a file never deposited)."""
    content = files.pdf(seed=4)
    first_tx, first = await _seed(pool, qonto, connection_id, content)
    _, second = await _seed(pool, qonto, connection_id, content)
    await pool.execute(
        "INSERT INTO dossier_contents (cegid_domain, cegid_dossier, sha256, document_id) "
        "VALUES ('CABINET', 'ACME001', $1, $2)",
        hashlib.sha256(content).hexdigest(),
        first,
    )
    removed = qonto.update_transaction(str(first_tx["id"]), attachment_ids=[])
    await factories.ingest_transaction(pool, connection_id, removed)
    assert await _state(pool, first) == ("skipped", models.SKIP_DELETED)
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert (await _state(pool, second))[0] == "uploaded"
    assert [s.sha256 for s in loop.stored] == [hashlib.sha256(content).hexdigest()]


async def test_a_copy_being_sent_by_another_worker_makes_the_second_wait(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """The content's holder is being sent by a live worker elsewhere: the second copy is neither
    sent (a duplicate if the first lands) nor skipped (lost if it does not): it waits."""
    content = files.pdf(seed=5)
    _, first = await _seed(pool, qonto, connection_id, content)
    _, second = await _seed(pool, qonto, connection_id, content)
    async with pool.acquire() as other_worker:
        await other_worker.execute(
            "SELECT pg_advisory_lock($1, $2)", recovery.WORKER_LOCK_SPACE, 777
        )
        await pool.execute(
            "UPDATE documents SET state = 'uploading', claimed_by = 777 WHERE id = $1", first
        )
        await pool.execute(
            "INSERT INTO dossier_contents (cegid_domain, cegid_dossier, sha256, document_id) "
            "VALUES ('CABINET', 'ACME001', $1, $2)",
            hashlib.sha256(content).hexdigest(),
            first,
        )
        await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
        state, reason = await _state(pool, second)
        await other_worker.execute(
            "SELECT pg_advisory_unlock($1, $2)", recovery.WORKER_LOCK_SPACE, 777
        )
    assert state == "pending"
    assert reason is not None
    assert reason.startswith(f"waiting: document {first} ")
    assert loop.stored == []


async def _refuse_in_database(pool: asyncpg.Pool, condition: str) -> None:
    """A trigger making PostgreSQL refuse the updates of documents that match ``condition``."""
    await pool.execute(
        f"""
        CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {condition} THEN RAISE EXCEPTION 'refused by the test'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_update BEFORE UPDATE ON documents
            FOR EACH ROW EXECUTE FUNCTION refuse_update();
        """
    )


async def test_an_error_on_one_document_stops_that_document_only(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """The database refuses to record one upload: that document ends in doubt (Loop has it, the
    ledger could not say so), the others are uploaded, and the report counts it."""
    ids = [(await _seed(pool, qonto, connection_id, files.pdf(seed=10 + i)))[1] for i in range(4)]
    unlucky = ids[1]
    await _refuse_in_database(pool, f"NEW.id = {unlucky} AND NEW.state = 'uploaded'")
    result = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    state, reason = await _state(pool, unlucky)
    assert state == "in_doubt"
    assert reason is not None
    assert recovery.ERROR_SENT_REASON in reason
    assert [(await _state(pool, i))[0] for i in ids if i != unlucky] == ["uploaded"] * 3
    assert len(loop.stored) == 4
    assert result.totals()["in_doubt"] == 1
    assert result.exit_code == 1


async def test_an_error_on_one_connection_stops_that_connection_only(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """The database refuses one connection's claims: its documents wait for the next run, its
    report says why, and the other connection's documents are all uploaded."""
    other = await factories.connect(
        upstream_settings, pool, qonto, dossier="OTHER002", client_name="Other"
    )
    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=["ACME001", "OTHER002"])
    for i in range(3):
        await _seed(pool, qonto, connection_id, files.pdf(seed=20 + i))
    await _refuse_in_database(
        pool, f"NEW.connection_id = '{connection_id}' AND NEW.state = 'uploading'"
    )
    result = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    rows = await pool.fetch("SELECT connection_id, state FROM documents")
    assert {r["state"] for r in rows if r["connection_id"] == connection_id} == {"pending"}
    assert {r["state"] for r in rows if r["connection_id"] == other} == {"uploaded"}
    failed = next(c for c in result.connections if c.connection_id == connection_id)
    assert failed.attention is not None
    assert "next run" in failed.attention
    assert {s.dossier for s in loop.stored} == {"OTHER002"}


async def test_uploads_stay_within_the_global_cap_across_connections(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Three connections of one firm, a slow Loop: never more deposits at once than the global
    cap, and the cap is used (the documents in hand keep the upload slots busy); never more
    documents in hand (claimed: downloading, waiting or sending) than twice the cap, all
    connections together (it was twice the cap per connection)."""
    dossiers = ["ACME001", "OTHER002", "THIRD003"]
    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=dossiers)
    ids = [connection_id]
    for dossier in dossiers[1:]:
        ids.append(await factories.connect(upstream_settings, pool, qonto, dossier=dossier))
    for i in range(10):
        tx, _ = factories.receipt(qonto, files.pdf(seed=30 + i))
        for cid in ids:
            await factories.ingest_transaction(pool, cid, tx)
    loop.latency_s = 0.05
    settings = dataclasses.replace(
        upstream_settings, upload_concurrency=3, upload_concurrency_per_firm=3
    )
    in_hand: list[int] = []
    flushing = asyncio.create_task(flusher.flush(settings, pool, sleep=factories.no_wait))
    while not flushing.done():  # sampled while the flush runs (its own loop turns in between)
        in_hand.append(
            await pool.fetchval("SELECT count(*) FROM documents WHERE state = 'uploading'")
        )
        await asyncio.wait({flushing}, timeout=0.005)
    await flushing
    assert len(loop.stored) == 30
    assert loop.peak_in_flight == 3
    assert 3 < max(in_hand) <= 2 * 3


async def test_what_the_relay_decides_never_overrides_a_revocation_or_a_disconnect(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A refusal seen by a flush (needs_attention) or a passed check (active) is not applied to a
    connection revoked or disconnected meanwhile; an active one is flagged."""
    attention = models.ConnectionState.NEEDS_ATTENTION
    assert await connections.flag(pool, connection_id, attention, "Cegid: refused")
    await pool.execute("UPDATE connections SET state = 'revoked' WHERE id = $1", connection_id)
    assert not await connections.flag(pool, connection_id, attention, "Cegid: refused")
    assert not await connections.flag(pool, connection_id, models.ConnectionState.ACTIVE, None)
    assert await pool.fetchval("SELECT state FROM connections") == "revoked"


async def test_a_refused_deposit_is_cleared_by_the_daily_check_once_access_is_back(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Loop refuses a deposit (403): the connection waits with a Cegid reason, which the next
    dossier check clears when Loop lets the key in again."""
    _, document_id = await _seed(pool, qonto, connection_id, files.pdf(seed=40))
    loop.faults.push("403")
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    row = await pool.fetchrow("SELECT state, state_reason FROM connections")
    assert row is not None
    assert row["state"] == "needs_attention"
    assert row["state_reason"].startswith(scheduler.CEGID_REASON)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    async with cegid.http_client(upstream_settings) as http:
        await scheduler.check_dossiers(upstream_settings, pool, http, now=later)
    assert await pool.fetchval("SELECT state FROM connections") == "active"
    assert (await _state(pool, document_id))[0] == "pending"


async def test_flushing_one_connection_needs_a_connection_that_exists_and_is_connected(
    upstream_settings: config.Settings, pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """`relay flush --now --connection ID`: an unknown id is NotFound, a disconnected one Refused."""
    with pytest.raises(errors.NotFound):
        await flusher.flush(upstream_settings, pool, connection_id=uuid.uuid4())
    await connections.disconnect(pool, connection_id)
    with pytest.raises(errors.Refused):
        await flusher.flush(upstream_settings, pool, connection_id=connection_id)
