"""The flush of every pending document to Cegid Loop, exactly once, one transaction per transition.

    pending ──claim──▶ uploading ──download, type, dedupe──▶ (commit the attempt: "sending")
        ──POST /storeDocument──▶ uploaded | pending (retry next run) | failed | in_doubt

The run and each connection's claims are here; one document's way is in :mod:`consumers.upload`,
the settling of what a worker left ``uploading`` in :mod:`consumers.recovery`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import functools
import pathlib
import tempfile
import time
import uuid
from typing import Any, Final

import asyncpg

from consumers import patience, recovery, scanner, upload
from relay import config, crypto, errors, log, models, store
from relay.domain import connections, credentials, report
from relay.store import db
from relay.upstreams import cegid, qonto

logger = log.get(__name__)

CLAIM_BATCH: Final = 16
# Loop accepts deposits for a dossier it does not know and drops them silently: check it again daily.
DOSSIER_CHECK_EVERY: Final = dt.timedelta(hours=24)


# ------------------------------------------------------------------------------------ a connection


async def _check_dossier(ctx: upload.Context, run: upload.ConnectionRun) -> None:
    """Check the connection's Cegid dossier once a day, flagging the connection on a refusal.

    A wrong or dissociated dossier code loses deposits silently; an unavailable Cegid is not
    conclusive, so the run deposits anyway and checks again next run.
    """
    connection = run.connection
    checked = connection.dossier_checked_at
    if checked is not None and ctx.cutoff - checked < DOSSIER_CHECK_EVERY:
        return
    try:
        await ctx.cegid.check_dossier(run.cegid_creds, connection.cegid_dossier)
    except errors.CegidAccessRefused as exc:
        run.refused = f"{upload.CEGID_REASON}{exc}"
        run.refused_by = models.Refuser.CEGID
        logger.warning("dossier_check_refused", connection=str(connection.id))
        return
    except errors.Retryable as exc:  # not conclusive: deposit anyway, check again next run
        logger.info("dossier_check_unavailable", connection=str(connection.id), reason=str(exc))
        return
    await upload.transition(
        ctx,
        "set_dossier_checked",
        functools.partial(store.connections.set_dossier_checked, ctx.pool, connection.id),
    )


async def _recheck(
    ctx: upload.Context, connection: models.Connection, creds: credentials.CegidCredentials
) -> models.Connection:
    """Read the dossier of a connection Cegid refused once more before its documents wait.

    The connection was flagged because Cegid refused its key or dossier. Accepted, the flag is
    cleared and the connection goes in this run; refused or unavailable, it stays flagged.
    """
    try:
        await ctx.cegid.check_dossier(creds, connection.cegid_dossier)
    except errors.CegidAccessRefused as exc:
        logger.info("flag_kept", connection=str(connection.id), reason=str(exc))
        return connection
    except errors.Retryable as exc:
        logger.info("flag_check_unavailable", connection=str(connection.id), reason=str(exc))
        return connection
    cleared = await ctx.guard.run(
        "clear flag",
        functools.partial(connections.clear_cegid_flag, ctx.pool, connection.id),
    )
    if cleared is None:  # changed meanwhile (disconnected, revoked, flagged by Qonto)
        return connection
    logger.info("flag_cleared", connection=str(connection.id))
    return cleared


async def _claim(
    ctx: upload.Context, run: upload.ConnectionRun, wanted: int
) -> list[models.Document]:
    """Claim up to ``wanted`` of the connection's pending documents for this worker.

    Documents are claimed with ``FOR UPDATE SKIP LOCKED``, so several flush processes share a
    night. After a claim that failed with the database (its commit may have gone through), this
    first takes back what the worker holds without knowing it.
    """
    try:
        if ctx.lease.lost:  # a recovery could take this worker for dead: re-take it first
            raise errors.DatabaseUnavailable("claim documents: the worker lease was lost")
        if run.claim_unsure:
            held = await store.documents.held(
                ctx.pool, run.connection.id, ctx.worker, sorted(run.seen), wanted
            )
            if held:
                logger.warning(
                    "documents_adopted", connection=str(run.connection.id), count=len(held)
                )
                return held
            run.claim_unsure = False
        return await store.documents.claim(
            ctx.pool, run.connection.id, ctx.worker, wanted, ctx.cutoff
        )
    except errors.DatabaseUnavailable:
        run.claim_unsure = True
        raise


async def _connection_loop(ctx: upload.Context, run: upload.ConnectionRun) -> None:
    """Claim and upload the connection's pending documents as slots free up, until none is left.

    A refused access stops it too. An error here stops this connection only (the others go on,
    and documents in hand finish first). While the database is gone nothing is claimed; when the
    flush gives up on it, claiming stops.
    """
    inflight: set[asyncio.Task[None]] = set()
    try:
        await _check_dossier(ctx, run)
        while not run.refused:
            await ctx.gates.slots.acquire()
            wanted = 1
            while wanted < CLAIM_BATCH and not ctx.gates.slots.locked():
                await ctx.gates.slots.acquire()  # free: returns at once
                wanted += 1
            claimed: list[models.Document] = []
            try:
                claimed = await ctx.guard.run(
                    "claim documents", functools.partial(_claim, ctx, run, wanted)
                )
            finally:
                for _ in range(wanted - len(claimed)):
                    ctx.gates.slots.release()
            run.seen.update(document.id for document in claimed)
            for document in claimed:  # each task releases its slot
                task = asyncio.create_task(upload.process(ctx, run, document))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            if not claimed:
                break
    except asyncio.CancelledError:
        for task in inflight:
            task.cancel()
        raise
    except errors.OutageTooLong:
        pass  # the flush stops: the documents in hand finish (below), then it says what is left
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
    if run.refused and not ctx.guard.gave_up:
        run.report.attention = run.refused
        refused, refused_by = run.refused, run.refused_by
        with contextlib.suppress(errors.OutageTooLong):
            await ctx.guard.run(
                "flag connection",
                lambda: connections.flag(
                    ctx.pool,
                    run.connection.id,
                    models.ConnectionState.NEEDS_ATTENTION,
                    refused,
                    () if refused_by is None else (refused_by,),
                ),
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
    sleep: upload.Sleep = asyncio.sleep,
    now: dt.datetime | None = None,
) -> report.RunReport:
    """Recover, scan Qonto, then upload every pending document and return the run's report.

    With ``connection_id``, that connection only (NotFound when there is none, Refused when it is
    disconnected or revoked).

    PostgreSQL lost mid-run (stopped, restarted, backends terminated) does not make doubt: every
    write of the run goes through a :class:`consumers.patience.Guard`, so the flush stops claiming,
    lets the deposits already out finish, records their answers once the database is back (its
    worker lease re-taken first), and claims the rest. Past ``RELAY_OUTAGE_LIMIT`` the run raises
    OutageTooLong, whose one line says what it leaves: the documents it could not settle are
    settled by the next run's recovery (in doubt when an attempt was committed, pending when not).
    A document is left in doubt by a run only when no answer came, or when the process itself dies.
    """
    if connection_id is not None:
        only = await connections.get(pool, connection_id)
        if only.state in (models.ConnectionState.DISCONNECTED, models.ConnectionState.REVOKED):
            raise errors.Refused(
                f"connection {connection_id} is {only.state}: reconnect it before flushing it"
            )
    started = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    run_report = report.RunReport(kind=run_kind, started_at=started)
    if run_id is None:
        run_id = await store.runs.insert_manual(pool)
    since_previous = await store.runs.previous_start(pool, run_id)
    lease = await recovery.Lease.take(pool)
    guard = patience.Guard(pool, settings.outage_limit_s, on_back=lease.keep)
    ctx: upload.Context | None = None
    try:
        run_report.recovered = await guard.run("recover", lambda: recovery.recover(pool))
        async with (
            qonto.http_clients(settings) as qonto_http,
            cegid.http_client(settings) as cegid_http,
        ):
            scan = await scanner.scan(
                settings,
                pool,
                qonto_http,
                connection_id=connection_id,
                since=since,
                now=now,
                guard=guard,
            )
            # files go from Qonto to a temporary file and from it to Loop, never whole in memory;
            # uploads are capped globally (RELAY_UPLOAD_CONCURRENCY, below) and per firm
            # (RELAY_UPLOAD_CONCURRENCY_PER_FIRM, in ``firms``)
            with tempfile.TemporaryDirectory(prefix="relay-flush-") as tmp:
                ctx = upload.Context(
                    settings=settings,
                    pool=pool,
                    qonto_http=qonto_http,
                    cegid=cegid.CegidClient(settings, cegid_http),
                    box=crypto.Box(settings.secret_key.reveal()),
                    sleep=sleep,
                    tmpdir=pathlib.Path(tmp),
                    cutoff=await guard.run("database time", lambda: _database_now(pool)),
                    guard=guard,
                    lease=lease,
                    gates=upload.Gates.of(settings),
                )
                runs = await _prepare(ctx, scan, connection_id)
                await asyncio.gather(
                    *(_connection_loop(ctx, r) for r in runs if r.report.state == "active")
                )
                if guard.gave_up:
                    raise guard.gave_up
                await _save_tokens(ctx, runs)
                await _settle_own(ctx, runs)
                await _summarise(ctx, runs, run_report, since_previous)
        run_report.finished_at = dt.datetime.now(dt.UTC)
        # a scheduled run's row too: the scheduler's connection may have gone with an outage, and
        # an unfinished row would run the day again
        finished = run_report.to_json()
        await guard.run("finish run", lambda: _finish_run(pool, run_id, finished))
    except errors.OutageTooLong as exc:
        raise errors.OutageTooLong(_stopped(exc, ctx)) from exc
    finally:
        await guard.close()
        await lease.release()
    logger.info(
        "flush_finished",
        kind=run_kind,
        duration_s=round(time.perf_counter() - clock, 3),
        outages=len(guard.outages),
        **run_report.totals(),
    )
    return run_report


def _stopped(exc: errors.OutageTooLong, ctx: upload.Context | None) -> str:
    """Write the closing line of a flush that gave up on PostgreSQL (what it leaves, what next)."""
    left = ctx.answers.left if ctx is not None else collections.Counter[str]()
    parts = [f"{exc}: the flush stopped"]
    sent = left["stored"] + left["sent"]
    if sent:
        parts.append(
            f"{sent} document(s) sent to Cegid Loop whose answers could not be recorded "
            f"({left['stored']} stored by Loop, by its answer) become in_doubt at the next "
            "flush's recovery: their answers are logged (document_outcome_unrecorded); check "
            "Loop, then `relay documents resolve ID --uploaded|--resend`"
        )
    else:
        parts.append("no deposit was left without its recorded answer")
    if left["unsent"]:
        parts.append(
            f"{left['unsent']} document(s) claimed but not sent go back to pending at the next "
            "flush's recovery"
        )
    parts.append("every other document waits for the next run")
    return "; ".join(parts)


async def _settle_own(ctx: upload.Context, runs: list[upload.ConnectionRun]) -> None:
    """Settle what this worker still holds after an error, into the report.

    One document's error (a bug, a statement that keeps failing) stops that document only: it
    stays ``uploading`` under this worker and is settled here like a dead worker's. If the
    database keeps failing, the next run's recovery does it.
    """
    reports = [r.report for r in runs]
    try:
        await ctx.guard.run("settle", lambda: recovery.settle_own(ctx.pool, ctx.worker, reports))
    except errors.OutageTooLong:
        raise
    except errors.DatabaseUnavailable as exc:
        logger.warning("flush_settle_deferred", reason=str(exc))


async def _database_now(pool: asyncpg.Pool) -> dt.datetime:
    return await store.server.now(pool)


async def _finish_run(pool: asyncpg.Pool, run_id: int, finished: dict[str, Any]) -> None:
    await store.runs.finish(pool, run_id, finished)


async def _save_tokens(ctx: upload.Context, runs: list[upload.ConnectionRun]) -> None:
    """Store each Qonto refresh token rotated during the uploads and not stored yet.

    The old token is dead, so without the new one the next run is refused.
    """
    for run in runs:
        if run.qonto.tokens_unsaved and not await run.qonto.save_tokens():
            run.report.warnings.append(
                "the rotated Qonto refresh token could not be stored: "
                "reconnect the organization if the next run is refused"
            )


async def _prepare(
    ctx: upload.Context, scan: scanner.ScanReport, only: uuid.UUID | None
) -> list[upload.ConnectionRun]:
    runs = []
    for connection in await ctx.guard.run(
        "list connections", lambda: connections.list_all(ctx.pool)
    ):
        if only is not None and connection.id != only:
            continue
        if connection.state in (
            models.ConnectionState.REVOKED,
            models.ConnectionState.DISCONNECTED,
        ):
            continue
        qonto_creds, cegid_creds = await ctx.guard.run(
            "load credentials",
            functools.partial(credentials.load, ctx.pool, ctx.box, connection.id),
        )
        if connection.state == models.ConnectionState.NEEDS_ATTENTION and connection.refused_by == {
            models.Refuser.CEGID
        }:
            connection = await _recheck(ctx, connection, cegid_creds)

        async def store(
            creds: credentials.QontoCredentials, cid: uuid.UUID = connection.id
        ) -> None:
            await ctx.guard.run(
                "store credentials",
                lambda: credentials.store_qonto(ctx.pool, ctx.box, cid, creds),
            )

        scanned = scan.for_connection(connection.id)
        run = upload.ConnectionRun(
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
    ctx: upload.Context,
    runs: list[upload.ConnectionRun],
    run_report: report.RunReport,
    since_previous: dt.datetime | None,
) -> None:
    for run in runs:
        since = since_previous or run.connection.created_at

        async def read(
            cid: uuid.UUID = run.connection.id, since: dt.datetime = since
        ) -> tuple[dict[str, Any], list[store.documents.ReasonCount]]:
            description = await connections.describe(ctx.pool, cid)
            return description, await store.documents.skipped_since(ctx.pool, cid, since)

        description, skipped = await ctx.guard.run("summarise", read)
        run.report.skipped.clear()
        for count in skipped:
            run.report.skipped[report.group(count.code, count.detail)] += count.n
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
    """Run one flush on a pool of its own and return the report (``relay flush --now``)."""
    async with db.pool_for(settings, min_size=2, max_size=8) as pool:
        return await flush(
            settings, pool, connection_id=connection_id, since=since, run_kind="manual"
        )
