"""The flush against the Qonto and Cegid Loop sandboxes: every file once, every other one with a reason."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg
import pytest

from consumers import flusher, recovery, upload
from relay import config, errors, models
from relay.domain import resolve
from relay.sandbox import cegid as cegid_sandbox
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from tests.integration import factories


async def _document(pool: asyncpg.Pool, attachment_id: str) -> asyncpg.Record:
    record = await pool.fetchrow(
        "SELECT * FROM documents WHERE qonto_attachment_id = $1", attachment_id
    )
    assert record is not None
    return record


async def _seed(
    pool: asyncpg.Pool,
    qonto: qonto_sandbox.QontoSandbox,
    connection_id: uuid.UUID,
    **kwargs: object,
) -> str:
    tx, attachment = factories.receipt(qonto, **kwargs)  # type: ignore[arg-type]
    await factories.ingest_transaction(pool, connection_id, tx)
    return attachment


async def test_each_file_is_deposited_once_with_type_name_and_direction(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """A JPEG receipt of a debit and a PDF of a credit: the right Content-Type, transaction and name."""
    jpeg = await _seed(
        pool,
        qonto,
        connection_id,
        content=files.jpeg(seed=1),
        name="photo.pdf",
        content_type="application/pdf",
    )  # Qonto's name and type are wrong: bytes win
    pdf = await _seed(pool, qonto, connection_id, seed=2, side="credit")
    result = await flusher.flush(upstream_settings, pool)
    stored = {s.sha256: s for s in loop.stored_by_dossier("ACME001")}
    assert len(stored) == 2
    first, second = await _document(pool, jpeg), await _document(pool, pdf)
    assert first["state"] == second["state"] == "uploaded"
    assert stored[first["sha256"]].content_type == "image/jpeg"
    assert stored[first["sha256"]].transaction == "PURCHASE"
    assert stored[first["sha256"]].filename.endswith(f"_receipt_{jpeg}.jpg")
    assert stored[second["sha256"]].transaction == "SALE"
    assert first["cegid_document_id"] == stored[first["sha256"]].document_id
    assert result.totals()["uploaded"] == 2
    assert result.exit_code == 0
    again = await flusher.flush(upstream_settings, pool)
    assert again.totals()["uploaded"] == 0
    assert len(loop.stored) == 2


async def test_unsupported_large_duplicate_and_deleted_files_are_skipped_with_reasons(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """HEIC by its bytes, over 50 MB, same bytes twice, deleted in Qonto: each skipped, saying why."""
    heic = await _seed(
        pool,
        qonto,
        connection_id,
        content=files.heic(seed=1),
        name="IMG.jpg",
        content_type="image/jpeg",
    )
    big = await _seed(
        pool, qonto, connection_id, content=files.Synthetic("pdf", 50 * 1024 * 1024 + 1, 2)
    )
    original = await _seed(pool, qonto, connection_id, content=files.pdf(seed=3))
    copy = await _seed(pool, qonto, connection_id, content=files.pdf(seed=3))
    deleted = await _seed(pool, qonto, connection_id, seed=4)
    qonto.delete_attachment(deleted)
    result = await flusher.flush(upstream_settings, pool)
    reasons = {a: (await _document(pool, a))["reason"] for a in (heic, big, deleted)}
    assert reasons[heic] == "unsupported type: HEIC image"
    assert reasons[big].startswith(models.SKIP_TOO_LARGE)
    assert reasons[deleted] == models.SKIP_DELETED
    # the same bytes twice: whichever is processed first is sent, the other is a duplicate
    twins = sorted(
        [await _document(pool, original), await _document(pool, copy)], key=lambda d: d["state"]
    )
    assert [t["state"] for t in twins] == ["skipped", "uploaded"]
    assert (
        twins[0]["reason"]
        == f"{models.SKIP_DUPLICATE}: document {twins[1]['id']} has the same content"
    )
    assert len(loop.stored) == 1
    assert result.connections[0].skipped == {
        "unsupported type: HEIC image": 1,
        models.SKIP_TOO_LARGE: 1,
        models.SKIP_DUPLICATE: 1,
        models.SKIP_DELETED: 1,
    }


async def test_transient_faults_are_retried_within_the_run(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Qonto 429/503 and an expired URL, Cegid 429 and 503: retried, each file stored once."""
    attachment = await _seed(pool, qonto, connection_id)
    qonto.faults.fail_next("/v2/attachments/", 429, retry_after=0.01)
    qonto.faults.fail_next("/v2/attachments/", 503)
    qonto.faults.expire_next_urls(1)
    loop.faults.push("429", "503")
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert (await _document(pool, attachment))["state"] == "uploaded"
    assert len(loop.stored) == 1
    assert qonto.faults.injected["expired_url"] == 1
    outcomes = await pool.fetch("SELECT outcome FROM uploads ORDER BY id")
    assert [r["outcome"] for r in outcomes] == ["retry", "retry", "uploaded"]


async def test_cegid_retry_after_is_waited_before_the_next_try(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """429 with Retry-After: the flush waits what Loop asked for, then stores the file once."""
    attachment = await _seed(pool, qonto, connection_id)
    loop.faults.retry_after = "2.5"
    loop.faults.push("429")
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)
        await asyncio.sleep(0)

    await flusher.flush(upstream_settings, pool, sleep=record)
    assert waits == [2.5]
    assert (await _document(pool, attachment))["state"] == "uploaded"
    assert len(loop.stored) == 1


async def test_cegid_down_for_the_whole_run_leaves_documents_pending_with_the_reason(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Still 5xx after every retry: pending, with the last reason, tried again next run."""
    attachment = await _seed(pool, qonto, connection_id)
    loop.faults.push(*["500"] * upload.POLICY.attempts)
    result = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    document = await _document(pool, attachment)
    assert document["state"] == "pending"
    assert document["reason"].startswith("Cegid Loop unavailable, retried next run")
    assert result.exit_code == 1
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert (await _document(pool, attachment))["state"] == "uploaded"
    assert len(loop.stored) == 1


async def test_refused_access_flags_the_connection_and_others_continue(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """401/403: the connection needs attention, its documents stay pending; another one goes on."""
    other_id = await factories.connect(
        upstream_settings, pool, qonto, dossier="OTHER002", client_name="Other"
    )
    refused = await _seed(pool, qonto, connection_id, seed=1)
    fine = await _seed(pool, qonto, other_id, seed=2)
    # the accountant dissociated ACME001 from the key in Loop Hub (it now belongs to another firm)
    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=["OTHER002"])
    loop.add_firm("someone-else", "their-secret", dossiers=["ACME001"])
    result = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    # both connections are the same Qonto organization here: the scan gives each both files
    by_connection = {
        (r["connection_id"], r["qonto_attachment_id"]): r["state"]
        for r in await pool.fetch("SELECT connection_id, qonto_attachment_id, state FROM documents")
    }
    assert by_connection[(connection_id, refused)] == "pending"
    assert by_connection[(connection_id, fine)] == "pending"
    assert by_connection[(other_id, fine)] == "uploaded"
    assert by_connection[(other_id, refused)] == "uploaded"
    flagged_row = await pool.fetchrow(
        "SELECT state, state_reason, refused_by FROM connections WHERE id = $1", connection_id
    )
    assert flagged_row is not None
    assert flagged_row["state"] == "needs_attention"
    assert "Loop Hub" in flagged_row["state_reason"]
    assert flagged_row["refused_by"] == ["cegid"]
    waiting = await pool.fetch(
        "SELECT DISTINCT reason_code, reason_detail FROM documents WHERE connection_id = $1",
        connection_id,
    )
    assert [tuple(r) for r in waiting] == [("access_refused", "cegid")]
    flagged = next(c for c in result.connections if c.connection_id == connection_id)
    assert flagged.attention is not None


async def test_a_refused_file_fails_with_the_reason(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """400/413/415: the file itself is refused; failed, with Cegid's answer, not retried."""
    attachment = await _seed(pool, qonto, connection_id)
    loop.faults.push("415")
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    document = await _document(pool, attachment)
    assert document["state"] == "failed"
    assert document["reason"].startswith("Cegid refused the file (HTTP 415)")


async def test_no_answer_after_sending_is_in_doubt_and_never_resent(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Stored then the connection dropped: in_doubt; the next flush leaves it; the operator decides."""
    attachment = await _seed(pool, qonto, connection_id)
    loop.faults.push("store_then_drop")
    result = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    document = await _document(pool, attachment)
    assert document["state"] == "in_doubt"
    assert "relay documents resolve" in document["reason"]
    assert result.totals()["in_doubt"] == 1
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert len(loop.stored) == 1
    resolved = await resolve.resolve(pool, document["id"], uploaded=True)
    assert resolved.state == "uploaded"
    with pytest.raises(errors.Refused):
        await resolve.resolve(pool, document["id"], uploaded=False)


async def test_resend_sends_an_in_doubt_document_again(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Dropped before storing (the relay cannot tell): in doubt; --resend makes the next flush send it."""
    attachment = await _seed(pool, qonto, connection_id)
    loop.faults.push("drop_before_store")
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    document = await _document(pool, attachment)
    assert document["state"] == "in_doubt"
    assert loop.stored == []
    await resolve.resolve(pool, document["id"], uploaded=False)
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert (await _document(pool, attachment))["state"] == "uploaded"
    assert len(loop.stored) == 1


async def test_recovery_after_a_dead_worker(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Left uploading: in_doubt if its attempt was recorded (it may have left), pending if not."""
    sent = await _seed(pool, qonto, connection_id, seed=1)
    never = await _seed(pool, qonto, connection_id, seed=2)
    dead_worker = 424242
    await pool.execute("UPDATE documents SET state = 'uploading', claimed_by = $1", dead_worker)
    await pool.execute(
        "INSERT INTO uploads (document_id, worker) SELECT id, $1 FROM documents "
        "WHERE qonto_attachment_id = $2",
        dead_worker,
        sent,
    )
    recovered = await recovery.recover(pool)
    assert recovered == {"in_doubt": 1, "pending": 1}
    assert (await _document(pool, sent))["state"] == "in_doubt"
    assert (await _document(pool, never))["state"] == "pending"
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert (await _document(pool, never))["state"] == "uploaded"
    assert (await _document(pool, sent))["state"] == "in_doubt"


async def test_a_live_workers_documents_are_left_alone(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A document claimed by a worker that still holds its lock is not recovered by another."""
    attachment = await _seed(pool, qonto, connection_id)
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", recovery.WORKER_LOCK_SPACE, 777)
        await pool.execute("UPDATE documents SET state = 'uploading', claimed_by = 777")
        assert await recovery.recover(pool) == {"in_doubt": 0, "pending": 0}
        assert (await _document(pool, attachment))["state"] == "uploading"
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", recovery.WORKER_LOCK_SPACE, 777)


async def test_concurrent_flushes_share_documents_and_send_each_once(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Three flush workers on the same night: every file stored exactly once."""
    attachments = [await _seed(pool, qonto, connection_id, seed=i) for i in range(40)]
    loop.latency_s = 0.01
    settings = dataclasses.replace(
        upstream_settings, upload_concurrency=4, upload_concurrency_per_firm=4
    )
    await asyncio.gather(
        *(flusher.flush(settings, pool, sleep=factories.no_wait) for _ in range(3))
    )
    assert loop.duplicates() == []
    assert len(loop.stored) == 40
    assert set((await factories.states(pool)).values()) == {"uploaded"}
    assert len(attachments) == 40


async def test_a_dossier_loop_does_not_know_is_caught_by_the_daily_check_with_the_advice(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Loop takes deposits for an unknown dossier and drops them; a day later the check flags it."""
    await _seed(pool, qonto, connection_id, seed=1)
    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=[])  # dissociated in Loop Hub
    first = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert first.connections[0].uploaded == 1  # accepted, and silently lost: nothing can tell yet
    assert (len(loop.lost), first.connections[0].warnings) == (1, [])
    await pool.execute(
        "UPDATE connections SET created_at = now() - interval '25 hours', "
        "connected_at = now() - interval '25 hours', "
        "dossier_checked_at = now() - interval '25 hours', "
        "first_upload_at = now() - interval '25 hours' WHERE id = $1",
        connection_id,
    )
    waiting = await _seed(pool, qonto, connection_id, seed=2)
    later = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert (await _document(pool, waiting))["state"] == "pending"
    assert len(loop.lost) == 1
    report = later.connections[0]
    assert report.state == "needs_attention"
    assert report.attention is not None
    assert "Loop Hub" in report.attention
    [warning] = report.warnings
    assert "has not appeared in Loop 24 hours after setup: disconnect and reconnect" in warning
    assert "WARNING: the client's folder has not appeared" in later.render()
    assert later.exit_code == 1


async def test_a_dossier_checked_within_a_day_is_not_checked_again(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """One dossier check a day at most: a fresh check (at setup) means no GET /journal at flush."""
    await _seed(pool, qonto, connection_id)
    checked_before = await pool.fetchval(
        "SELECT dossier_checked_at FROM connections WHERE id = $1", connection_id
    )
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert checked_before == await pool.fetchval(
        "SELECT dossier_checked_at FROM connections WHERE id = $1", connection_id
    )
    await pool.execute(
        "UPDATE connections SET dossier_checked_at = now() - interval '25 hours' WHERE id = $1",
        connection_id,
    )
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    rechecked = await pool.fetchval(
        "SELECT dossier_checked_at FROM connections WHERE id = $1", connection_id
    )
    assert rechecked > checked_before
    assert len(loop.stored) == 1


async def _connection_state(pool: asyncpg.Pool, connection_id: uuid.UUID) -> tuple[str, str | None]:
    row = await pool.fetchrow(
        "SELECT state, state_reason FROM connections WHERE id = $1", connection_id
    )
    assert row is not None
    return row["state"], row["state_reason"]


async def test_a_flag_cegid_raised_is_checked_again_by_the_flush_and_cleared_when_accepted(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
) -> None:
    """Cegid refused the key: flagged, documents wait; while still refused the next flush leaves
    the flag; once Loop accepts the key again the next flush clears it and the documents go."""
    attachment = await _seed(pool, qonto, connection_id)
    loop.add_firm(factories.FIRM_KEY, "a-secret-loop-no-longer-has", dossiers=["ACME001"])
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    state, reason = await _connection_state(pool, connection_id)
    assert state == "needs_attention"
    assert reason is not None
    assert reason.startswith(upload.CEGID_REASON)
    still = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert await _connection_state(pool, connection_id) == (state, reason)
    assert still.connections[0].attention == reason
    assert (await _document(pool, attachment))["state"] == "pending"

    loop.add_firm(factories.FIRM_KEY, factories.FIRM_SECRET, dossiers=["ACME001", "OTHER002"])
    result = await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert await _connection_state(pool, connection_id) == ("active", None)
    assert (await _document(pool, attachment))["state"] == "uploaded"
    assert len(loop.stored) == 1
    assert result.connections[0].attention is None
    assert result.exit_code == 0


@pytest.mark.parametrize(
    ("state", "reason", "refused_by"),
    [
        (
            "needs_attention",
            "Qonto refused the credentials: reconnect the organization (401)",
            ["qonto"],
        ),
        ("needs_attention", "Qonto: refused (401); Cegid: refused (403)", ["cegid", "qonto"]),
        ("disconnected", "disconnected by an operator", []),
        ("revoked", "consent revoked in Qonto", []),
    ],
)
async def test_the_flush_clears_only_a_flag_cegid_raised(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    loop: cegid_sandbox.CegidSandbox,
    state: str,
    reason: str,
    refused_by: list[str],
) -> None:
    """A Qonto refusal (alone or beside Cegid's), a disconnect, a revocation: Loop accepting the
    key changes none of them."""
    attachment = await _seed(pool, qonto, connection_id)
    await pool.execute(
        "UPDATE connections SET state = $2, state_reason = $3, refused_by = $4 WHERE id = $1",
        connection_id,
        state,
        reason,
        refused_by,
    )
    await flusher.flush(upstream_settings, pool, sleep=factories.no_wait)
    assert await _connection_state(pool, connection_id) == (state, reason)
    assert (await _document(pool, attachment))["state"] == "pending"
    assert loop.stored == []
