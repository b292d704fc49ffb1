"""One document's way to Cegid Loop, one transaction per transition (see consumers.flusher).

A claimed document (``uploading``) is downloaded from Qonto to a temporary file, typed by its bytes,
deduplicated per dossier against a copy that is in Loop, in doubt or being sent, and its attempt row
(``uploads``, outcome ``sending``) is committed, while this worker still holds the document, before
the first byte is sent. The POST ends ``uploaded``, ``pending`` (retried next run), ``failed`` or
``in_doubt`` (sent, no answer: never re-sent without an operator). Uploads are capped globally and
per firm; the flush's shared state is a :class:`Context`, one connection's part of it a
:class:`ConnectionRun`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import pathlib
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import asyncpg

from consumers import recovery
from relay import (
    attachments,
    cegid,
    config,
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
CEGID_REASON: Final = "Cegid: "  # prefix of a Cegid refusal's reason (the daily check may clear it)

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


async def transition(ctx: Context, name: str, *args: Any) -> None:
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


async def _wait_for_access(
    ctx: Context, run: ConnectionRun, document: models.Document, upload_id: int | None
) -> None:
    """Loop refused the connection's access: the document waits (pending) with that reason and
    gives up its content claim (nothing went into Loop); the connection is flagged at its end."""
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


def _lost_hold(document: models.Document, state: str) -> None:
    """This worker no longer held the document (a recovery settled it): its state is left alone."""
    logger.warning(
        "document_transition_lost",
        document=document.id,
        connection=str(document.connection_id),
        state=state,
    )


# ------------------------------------------------------------------------------------ one document


async def process(ctx: Context, run: ConnectionRun, document: models.Document) -> None:
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
        if run.refused:  # refused for another document meanwhile
            await _wait_for_access(ctx, run, document, upload_id)
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
            await transition(ctx, "finish_upload", upload_id, "retry", None, None, str(stored))
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
            await _wait_for_access(ctx, run, document, upload_id)
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
