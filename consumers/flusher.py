"""The flush: every pending document to Cegid Loop, exactly once. One transaction per transition.

    pending ──claim──▶ uploading ──download, type, dedupe──▶ (commit the attempt: "sending")
        ──POST /storeDocument──▶ uploaded | pending (retry next run) | failed | in_doubt

Loop has no idempotency key and no way to list what it holds, so this ledger is the only guard
against a duplicate in the accountant's inbox:
- the attempt row (``uploads``, outcome ``sending``) is committed before the first byte is sent;
- a document left ``uploading`` by a dead worker becomes ``in_doubt`` if its attempt row exists (the
  request may have gone out) and ``pending`` if not (it provably never left); a worker is dead when
  the PostgreSQL advisory lock it holds for the whole flush is free;
- a request fully sent without an answer is ``in_doubt`` and is never re-sent without an operator;
- the attempt row is written only while the worker still holds the document, under the same row
  lock a recovery takes, so a worker taken for dead cannot send a document someone else recovered;
- content is deduplicated per dossier against a copy that is in Loop, in doubt or being sent; a
  copy that never reached Loop (pending, skipped, failed) gives the content up to the next one.

One document's error (the database gone for a moment, a bug) stops that document only: it stays
``uploading`` under this worker and is settled at the end of the run like a dead worker's. One
connection's error stops that connection only; the others go on.

Documents are claimed with ``FOR UPDATE SKIP LOCKED``, so several flush processes share a night.
Uploads are capped globally (``RELAY_UPLOAD_CONCURRENCY``) and per firm
(``RELAY_UPLOAD_CONCURRENCY_PER_FIRM``); files go from Qonto to a temporary file and from it to Loop,
never whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import pathlib
import random
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import asyncpg

from consumers import recovery, scanner
from relay import (
    attachments,
    cegid,
    config,
    connections,
    credentials,
    crypto,
    db,
    errors,
    filetype,
    log,
    models,
    naming,
    qonto,
    queries,
    report,
)

logger = log.get(__name__)

UPLOAD_ATTEMPTS: Final = 5
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 30.0
CLAIM_BATCH: Final = 16
CEGID_REASON: Final = "Cegid: "  # prefix of a Cegid refusal's reason (the daily check may clear it)
# Loop accepts deposits for a dossier it does not know and drops them silently: check it again daily.
DOSSIER_CHECK_EVERY: Final = dt.timedelta(hours=24)

Sleep = Callable[[float], Awaitable[None]]


@dataclasses.dataclass
class Context:
    settings: config.Settings
    pool: asyncpg.Pool
    worker: int
    qonto_http: qonto.HttpClients
    cegid: cegid.CegidClient
    box: crypto.Box
    sleep: Sleep
    tmpdir: pathlib.Path
    uploads: asyncio.Semaphore
    firms: dict[str, asyncio.Semaphore]
    cutoff: dt.datetime
    # documents in hand (downloading, waiting for an upload slot, uploading), all connections
    # together: bounds temporary files and Qonto downloads whatever the number of connections
    slots: asyncio.Semaphore
    contents: dict[tuple[str, str, str], _Turn] = dataclasses.field(default_factory=dict)

    def firm(self, fingerprint: str) -> asyncio.Semaphore:
        if fingerprint not in self.firms:
            self.firms[fingerprint] = asyncio.Semaphore(self.settings.upload_concurrency_per_firm)
        return self.firms[fingerprint]


@dataclasses.dataclass
class _Turn:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


@dataclasses.dataclass
class ConnectionRun:
    connection: models.Connection
    qonto: qonto.QontoClient
    cegid_creds: credentials.CegidCredentials
    report: report.ConnectionReport
    refused: str | None = None
    first_upload_recorded: bool = False


def _backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(max(retry_after, 0.0), BACKOFF_CAP_S * 4)
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


# ------------------------------------------------------------------------------------ transitions


async def _transition(ctx: Context, name: str, *args: Any) -> None:
    with db.translate(name):
        await ctx.pool.execute(queries.get(name), *args)


async def _finish(
    ctx: Context,
    run: ConnectionRun,
    document: models.Document,
    state: models.DocumentState,
    reason: str | None,
    *,
    upload_id: int | None = None,
    outcome: str | None = None,
    http_status: int | None = None,
    answer: Any = None,
    release_content: bool = False,
) -> None:
    """One transaction: the document's new state, its attempt's outcome, the dossier's content."""
    with db.translate("finish document"):
        async with ctx.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                queries.get("finish_document"), document.id, state, reason, ctx.worker
            )
            if status == "UPDATE 0":
                _lost_hold(document, str(state))
            if upload_id is not None:
                await conn.execute(
                    queries.get("finish_upload"), upload_id, outcome, http_status, answer, reason
                )
            if release_content:
                await conn.execute(queries.get("release_dossier_content"), document.id)
    counts = {
        models.DocumentState.SKIPPED: run.report.skipped,
        models.DocumentState.FAILED: run.report.failed,
        models.DocumentState.PENDING: run.report.pending,
    }
    if state in counts:
        counts[state][report.reason_key(reason)] += 1
    elif state == models.DocumentState.IN_DOUBT:
        run.report.in_doubt += 1
    logger.info(
        "document_finished",
        document=document.id,
        connection=str(document.connection_id),
        state=str(state),
        reason=reason,
    )


def _lost_hold(document: models.Document, state: str) -> None:
    """This worker no longer held the document (a recovery settled it): its state is left alone."""
    logger.warning(
        "document_transition_lost",
        document=document.id,
        connection=str(document.connection_id),
        state=state,
    )


# ------------------------------------------------------------------------------------ one document


async def _process(ctx: Context, run: ConnectionRun, document: models.Document) -> None:
    path = ctx.tmpdir / f"{document.id}-{secrets.token_hex(4)}"
    try:
        await _download_and_upload(ctx, run, document, path)
    except Exception as exc:  # one document's error must not stop the others
        # it stays uploading under this worker: settled at the end of the run (recovery)
        logger.error(
            "document_error",
            document=document.id,
            connection=str(document.connection_id),
            error=f"{type(exc).__name__}: {exc}",
            exc_info=not isinstance(exc, errors.RelayError),
        )
    finally:
        ctx.slots.release()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _download_and_upload(
    ctx: Context, run: ConnectionRun, document: models.Document, path: pathlib.Path
) -> None:
    if run.refused:
        await _finish(ctx, run, document, models.DocumentState.PENDING, f"waiting: {run.refused}")
        return
    try:
        download = await run.qonto.download(document.qonto_attachment_id, path)
    except errors.QontoNotFound:
        await _finish(ctx, run, document, models.DocumentState.SKIPPED, models.SKIP_DELETED)
        return
    except attachments.TooLarge:
        await _finish(
            ctx,
            run,
            document,
            models.DocumentState.SKIPPED,
            f"{models.SKIP_TOO_LARGE} (over {models.MAX_UPLOAD_BYTES // (1024 * 1024)} MB)",
        )
        return
    except errors.QontoAuthRejected as exc:
        run.refused = f"Qonto refused the credentials: reconnect the organization ({exc})"
        await _finish(ctx, run, document, models.DocumentState.PENDING, f"waiting: {run.refused}")
        return
    except (errors.Retryable, errors.QontoProtocolError, errors.ConfigurationError) as exc:
        await _finish(
            ctx,
            run,
            document,
            models.DocumentState.PENDING,
            f"Qonto download failed, retried next run ({exc})",
        )
        return
    kind = filetype.detect(download.head)
    if not kind.exported:
        await _finish(
            ctx,
            run,
            document,
            models.DocumentState.SKIPPED,
            f"{models.SKIP_UNSUPPORTED}: {kind.name}",
        )
        return
    key = (run.connection.cegid_domain, run.connection.cegid_dossier, download.sha256)
    async with _content_turn(ctx, key):
        await _deposit(ctx, run, document, path, download, kind)


@contextlib.asynccontextmanager
async def _content_turn(ctx: Context, key: tuple[str, str, str]) -> AsyncIterator[None]:
    """One document at a time per dossier and content in this process: a second copy waits for
    the first one's outcome (in Loop: a duplicate; refused: it may go) instead of a next run."""
    turn = ctx.contents.setdefault(key, _Turn())
    turn.users += 1
    try:
        async with turn.lock:
            yield
    finally:
        turn.users -= 1
        if not turn.users:
            del ctx.contents[key]


async def _deposit(
    ctx: Context,
    run: ConnectionRun,
    document: models.Document,
    path: pathlib.Path,
    download: attachments.Download,
    kind: filetype.Kind,
) -> None:
    """Claim the content for the dossier, then POST it to Loop and record the outcome."""
    file_name = naming.file_name(document, kind.extension)
    connection = run.connection
    with db.translate("start upload"):
        holder = await ctx.pool.fetchrow(
            queries.get("claim_dossier_content"),
            connection.cegid_domain,
            connection.cegid_dossier,
            download.sha256,
            document.id,
            download.size,
            kind.content_type,
            file_name,
        )
        if holder is None:  # taken by a concurrent transaction, committed by now
            holder = await ctx.pool.fetchrow(
                queries.get("dossier_content_holder"),
                connection.cegid_domain,
                connection.cegid_dossier,
                download.sha256,
            )
    if holder is None or holder["id"] != document.id:
        if holder is not None and holder["state"] in (
            models.DocumentState.UPLOADED,
            models.DocumentState.IN_DOUBT,
        ):
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.SKIPPED,
                f"{models.SKIP_DUPLICATE}: document {holder['id']} has the same content",
            )
        else:  # the other copy is being sent now: whether it lands decides, next run
            other = f"document {holder['id']}" if holder is not None else "another document"
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.PENDING,
                f"waiting: {other} with the same content is being sent, retried next run",
            )
        return
    upload_id: int | None = None
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        if run.refused:
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.PENDING,
                f"waiting: {run.refused}",
                upload_id=upload_id,
                outcome="access_refused",
                release_content=True,
            )
            return
        # The upload slots are held only while a request is out: bookkeeping and backoff
        # happen outside them, so they stay busy (issue: >= 0.9 x C/L).
        async with ctx.firm(connection.cegid_key_fingerprint), ctx.uploads:
            with db.translate("record attempt"):
                upload_id = await ctx.pool.fetchval(
                    queries.get("start_upload"), document.id, ctx.worker
                )
            if upload_id is None:  # a recovery took it from this worker: not ours to send
                _lost_hold(document, "uploading")
                return
            try:
                stored: cegid.Stored | errors.RelayError = await ctx.cegid.store_document(
                    run.cegid_creds,
                    dossier=connection.cegid_dossier,
                    file_name=file_name,
                    transaction=document.direction,
                    content_type=kind.content_type,
                    path=path,
                    size=download.size,
                )
            except (
                errors.CegidUnavailable,
                errors.CegidAccessRefused,
                errors.CegidFileRejected,
                errors.OutcomeUnknown,
            ) as exc:
                stored = exc
        if isinstance(stored, errors.CegidUnavailable):  # includes CegidRateLimited
            if attempt == UPLOAD_ATTEMPTS:
                await _finish(
                    ctx,
                    run,
                    document,
                    models.DocumentState.PENDING,
                    f"Cegid Loop unavailable, retried next run ({stored})",
                    upload_id=upload_id,
                    outcome="retry",
                    release_content=True,
                )
                return
            await _transition(ctx, "finish_upload", upload_id, "retry", None, None, str(stored))
            delay = _backoff(attempt, stored.retry_after)
            logger.info(
                "upload_retry",
                document=document.id,
                attempt=attempt,
                delay_s=round(delay, 2),
                reason=str(stored),
            )
            await ctx.sleep(delay)
            continue
        if isinstance(stored, errors.CegidAccessRefused):
            # the prefix lets the daily dossier check clear the flag once access is back
            run.refused = f"{CEGID_REASON}{stored}"
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.PENDING,
                f"waiting: {run.refused}",
                upload_id=upload_id,
                outcome="access_refused",
                release_content=True,
            )
            return
        if isinstance(stored, errors.CegidFileRejected):
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.FAILED,
                str(stored),
                upload_id=upload_id,
                outcome="failed",
                http_status=stored.status,
                release_content=True,
            )
            return
        if isinstance(stored, errors.RelayError):  # OutcomeUnknown: sent, no answer
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.IN_DOUBT,
                recovery.IN_DOUBT_REASON.format(detail=stored, id=document.id),
                upload_id=upload_id,
                outcome="in_doubt",
            )
            return
        with db.translate("document uploaded"):
            status = await ctx.pool.execute(
                queries.get("mark_uploaded"),
                document.id,
                stored.document_id,
                ctx.worker,
                upload_id,
                stored.status,
                stored.body,
            )
            if status == "UPDATE 0":
                _lost_hold(document, "uploaded")
            if not run.first_upload_recorded:
                await ctx.pool.execute(queries.get("set_first_upload"), connection.id)
                run.first_upload_recorded = True
        run.report.uploaded += 1
        logger.info(
            "document_uploaded",
            document=document.id,
            connection=str(connection.id),
            cegid_document=stored.document_id,
            size=download.size,
        )
        return


# ------------------------------------------------------------------------------------ a connection


async def _check_dossier(ctx: Context, run: ConnectionRun) -> None:
    """The periodic dossier check (a wrong or dissociated dossier code loses deposits silently)."""
    connection = run.connection
    checked = connection.dossier_checked_at
    if checked is not None and ctx.cutoff - checked < DOSSIER_CHECK_EVERY:
        return
    try:
        await ctx.cegid.check_dossier(run.cegid_creds, connection.cegid_dossier)
    except errors.CegidAccessRefused as exc:
        run.refused = f"{CEGID_REASON}{exc}"
        logger.warning("dossier_check_refused", connection=str(connection.id))
        return
    except errors.Retryable as exc:  # not conclusive: deposit anyway, check again next run
        logger.info("dossier_check_unavailable", connection=str(connection.id), reason=str(exc))
        return
    await _transition(ctx, "set_dossier_checked", connection.id)


async def _connection_loop(ctx: Context, run: ConnectionRun) -> None:
    """Claim this connection's pending documents as slots free up, until none is left (or access
    is refused). An error here stops this connection only; documents in hand finish first."""
    inflight: set[asyncio.Task[None]] = set()
    try:
        await _check_dossier(ctx, run)
        while not run.refused:
            await ctx.slots.acquire()
            wanted = 1
            while wanted < CLAIM_BATCH and not ctx.slots.locked():
                await ctx.slots.acquire()  # free: returns at once
                wanted += 1
            records: list[asyncpg.Record] = []
            try:
                with db.translate("claim documents"):
                    records = await ctx.pool.fetch(
                        queries.get("claim_documents"),
                        run.connection.id,
                        ctx.worker,
                        wanted,
                        ctx.cutoff,
                    )
            finally:
                for _ in range(wanted - len(records)):
                    ctx.slots.release()
            for record in records:  # each task releases its slot
                task = asyncio.create_task(_process(ctx, run, models.Document.from_record(record)))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if not records:
                break
    except asyncio.CancelledError:
        for task in inflight:
            task.cancel()
        raise
    except Exception as exc:  # the other connections go on; this one is retried next run
        logger.error(
            "connection_flush_failed",
            connection=str(run.connection.id),
            error=f"{type(exc).__name__}: {exc}",
            exc_info=not isinstance(exc, errors.RelayError),
        )
        run.report.attention = (
            f"the flush stopped for this connection ({exc}); its documents wait for the next run"
        )
    finally:
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
    if run.refused:
        run.report.attention = run.refused
        await connections.flag(
            ctx.pool, run.connection.id, models.ConnectionState.NEEDS_ATTENTION, run.refused
        )


# ------------------------------------------------------------------------------------ the run


async def flush(
    settings: config.Settings,
    pool: asyncpg.Pool,
    *,
    connection_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    run_kind: str = "manual",
    run_id: int | None = None,
    sleep: Sleep = asyncio.sleep,
    now: dt.datetime | None = None,
) -> report.RunReport:
    """Recover, scan Qonto, then upload every pending document; returns the run's report.

    ``connection_id``: that connection only (NotFound when there is none, Refused when it is
    disconnected or revoked)."""
    if connection_id is not None:
        only = await connections.get(pool, connection_id)
        if only.state in (models.ConnectionState.DISCONNECTED, models.ConnectionState.REVOKED):
            raise errors.Refused(
                f"connection {connection_id} is {only.state}: reconnect it before flushing it"
            )
    started = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    run_report = report.RunReport(kind=run_kind, started_at=started)
    with db.translate("worker lease"):
        own_run = run_id is None
        if run_id is None:
            run_id = int(await pool.fetchval(queries.get("insert_manual_run")))
        since_previous = await pool.fetchval(queries.get("previous_run_start"), run_id)
        worker, lease = await recovery.worker_lease(pool)
    try:
        run_report.recovered = await recovery.recover(pool)
        async with (
            qonto.http_clients(settings) as qonto_http,
            cegid.http_client(settings) as cegid_http,
        ):
            scan = await scanner.scan(
                settings, pool, qonto_http, connection_id=connection_id, since=since, now=now
            )
            with tempfile.TemporaryDirectory(prefix="relay-flush-") as tmp:
                ctx = Context(
                    settings=settings,
                    pool=pool,
                    worker=worker,
                    qonto_http=qonto_http,
                    cegid=cegid.CegidClient(settings, cegid_http),
                    box=crypto.Box(settings.secret_key.reveal()),
                    sleep=sleep,
                    tmpdir=pathlib.Path(tmp),
                    uploads=asyncio.Semaphore(settings.upload_concurrency),
                    firms={},
                    cutoff=await pool.fetchval(queries.get("database_now")),
                    slots=asyncio.Semaphore(max(4, settings.upload_concurrency * 2)),
                )
                runs = await _prepare(ctx, scan, connection_id)
                await asyncio.gather(
                    *(_connection_loop(ctx, r) for r in runs if r.report.state == "active")
                )
                await recovery.settle_own(ctx.pool, ctx.worker, [r.report for r in runs])
                await _summarise(ctx, runs, run_report, since_previous)
    finally:
        with contextlib.suppress(Exception):
            await lease.execute(queries.get("worker_unlock"), recovery.WORKER_LOCK_SPACE, worker)
        await pool.release(lease)
    run_report.finished_at = dt.datetime.now(dt.UTC)
    if own_run:  # a scheduled run's row is finished by the scheduler
        with db.translate("finish run"):
            await pool.execute(queries.get("finish_run"), run_id, run_report.to_json())
    logger.info(
        "flush_finished",
        kind=run_kind,
        duration_s=round(time.perf_counter() - clock, 3),
        **run_report.totals(),
    )
    return run_report


async def _prepare(
    ctx: Context, scan: scanner.ScanReport, only: uuid.UUID | None
) -> list[ConnectionRun]:
    runs = []
    for connection in await connections.list_all(ctx.pool):
        if only is not None and connection.id != only:
            continue
        if connection.state in (
            models.ConnectionState.REVOKED,
            models.ConnectionState.DISCONNECTED,
        ):
            continue
        qonto_creds, cegid_creds = await credentials.load(ctx.pool, ctx.box, connection.id)

        async def store(
            creds: credentials.QontoCredentials, cid: uuid.UUID = connection.id
        ) -> None:
            await credentials.store_qonto(ctx.pool, ctx.box, cid, creds)

        scanned = scan.for_connection(connection.id)
        run = ConnectionRun(
            connection=connection,
            qonto=qonto.client(
                ctx.settings, qonto_creds, ctx.qonto_http, on_tokens_rotated=store, sleep=ctx.sleep
            ),
            cegid_creds=cegid_creds,
            report=report.ConnectionReport(
                connection_id=connection.id,
                client_name=connection.client_name,
                dossier=connection.cegid_dossier,
                state=str(connection.state),
                scan=scanned.to_json() if scanned else None,
            ),
        )
        if connection.state == models.ConnectionState.NEEDS_ATTENTION:
            run.report.attention = connection.state_reason or "the connection needs attention"
        runs.append(run)
    return runs


async def _summarise(
    ctx: Context,
    runs: list[ConnectionRun],
    run_report: report.RunReport,
    since_previous: dt.datetime | None,
) -> None:
    for run in runs:
        description = await connections.describe(ctx.pool, run.connection.id)
        since = since_previous or run.connection.created_at
        with db.translate("skipped since"):
            skipped = await ctx.pool.fetch(queries.get("skipped_since"), run.connection.id, since)
        run.report.skipped.clear()
        for record in skipped:
            run.report.skipped[report.reason_key(record["reason"])] += record["n"]
        by_state = description["documents"]
        run.report.in_doubt_total = int(by_state.get("in_doubt", 0))
        left = int(by_state.get("pending", 0)) - sum(run.report.pending.values())
        if left > 0:
            run.report.pending[
                "waiting for the connection to be fixed"
                if run.report.attention
                else "not processed in this run"
            ] += left
        run.report.state = description["state"]
        if run.report.attention is None and description["state"] == "needs_attention":
            run.report.attention = description["state_reason"]
        run.report.warnings = description["warnings"]
        run_report.connections.append(run.report)


async def run_once(
    settings: config.Settings,
    *,
    connection_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
) -> report.RunReport:
    """`relay flush --now`: its own pool, one run, the report."""
    async with db.pool_for(settings, min_size=2, max_size=8) as pool:
        return await flush(
            settings, pool, connection_id=connection_id, since=since, run_kind="manual"
        )
