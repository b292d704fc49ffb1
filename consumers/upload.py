"""One document's way to Cegid Loop, one transaction per transition (see consumers.flusher).

A claimed document (``uploading``) is downloaded from Qonto to a temporary file, typed by its bytes,
deduplicated per dossier against a copy that is in Loop, in doubt or being sent, and its attempt row
(``uploads``, outcome ``sending``) is committed, while this worker still holds the document, before
the first byte is sent. The POST ends ``uploaded``, ``pending`` (retried next run), ``failed`` or
``in_doubt`` (sent, no answer: never re-sent without an operator). Uploads are capped globally and
per firm; the flush's shared state is a :class:`Context`, one connection's part of it a
:class:`ConnectionRun`.

Every write goes through the flush's :class:`consumers.patience.Guard`: when PostgreSQL is gone it
waits for it, so a deposit already out keeps its answer and records it once the database is back,
and nothing is sent before its attempt row is committed. If the flush gives up on the database, the
document is counted in ``Context.left`` by what is known of it (its answer is logged as
``document_outcome_unrecorded``) and left to the next run's recovery.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import asyncpg

from consumers import patience, recovery
from relay import config, crypto, errors, filetype, log, models, naming, retry, store
from relay.domain import credentials, report
from relay.store import db
from relay.upstreams import attachments, cegid, qonto

logger = log.get(__name__)

# a deposit Loop did not keep (429, 5xx, refused connection): five tries, then the next run
POLICY: Final = retry.Policy(first_s=0.5, cap_s=30.0, attempts=5)
CEGID_REASON: Final = "Cegid: "  # how the reason shown for a Cegid refusal begins
STORED: Final = "stored in Loop"  # how an answer held in memory begins when Loop kept the file

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
    guard: patience.Guard
    lease: recovery.Lease
    # documents in hand (downloading, waiting for an upload slot, uploading), all connections
    # together: bounds temporary files and Qonto downloads whatever the number of connections
    slots: asyncio.Semaphore
    contents: dict[tuple[str, str, str], _Turn] = dataclasses.field(default_factory=dict)
    # Loop's answer to each deposit whose outcome is not recorded yet (what is said of it if the
    # flush gives up on the database), and what was left so: stored, sent (not stored), unsent
    answers: dict[int, str] = dataclasses.field(default_factory=dict)
    left: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

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
    refused: str | None = None  # why the connection's access was refused (shown)
    refused_by: models.Refuser | None = None
    first_upload_recorded: bool = False
    # every document this run has had in hand for the connection: a claim whose answer was lost
    # is made good by taking what the worker holds outside this set
    seen: set[int] = dataclasses.field(default_factory=set)
    claim_unsure: bool = False


# ------------------------------------------------------------------------------------ transitions


async def transition(ctx: Context, what: str, write: Callable[[], Awaitable[None]]) -> None:
    """Runs one write that may run twice (it sets a state) through the guard."""
    await ctx.guard.run(what, write)


async def _already(ctx: Context, document: models.Document, state: str) -> bool:
    """A transition that found the document no longer held, on a second run: whether its first
    run had landed (its answer lost with the database) rather than a recovery taking it."""

    async def read() -> bool:
        return await store.documents.state_of(ctx.pool, document.id) == state

    return await ctx.guard.run("read document", read)


async def _finish(
    ctx: Context,
    run: ConnectionRun,
    document: models.Document,
    state: models.DocumentState,
    why: models.Why,
    *,
    upload_id: int | None = None,
    outcome: str | None = None,
    http_status: int | None = None,
    answer: Any = None,
    release_content: bool = False,
) -> None:
    """One transaction: the document's new state, its attempt's outcome, the dossier's content."""
    runs = 0

    async def write() -> bool:
        nonlocal runs
        runs += 1
        async with db.transaction(ctx.pool, "finish document") as conn:
            held = await store.documents.finish(conn, document.id, state, why, ctx.worker)
            if upload_id is not None:
                assert outcome is not None
                await store.uploads.finish(conn, upload_id, outcome, http_status, answer, why.text)
            if release_content:
                await store.dossier_contents.release(conn, document.id)
        return held

    if not await ctx.guard.run("finish document", write) and not (
        runs > 1 and await _already(ctx, document, str(state))
    ):
        _lost_hold(document, str(state))
    ctx.answers.pop(document.id, None)
    counts = {
        models.DocumentState.SKIPPED: run.report.skipped,
        models.DocumentState.FAILED: run.report.failed,
        models.DocumentState.PENDING: run.report.pending,
    }
    if state in counts:
        counts[state][report.group(why.code, why.detail)] += 1
    elif state == models.DocumentState.IN_DOUBT:
        run.report.in_doubt += 1
    logger.info(
        "document_finished",
        document=document.id,
        connection=str(document.connection_id),
        state=str(state),
        reason=why.text,
        code=str(why.code),
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
        _waiting(run),
        upload_id=upload_id,
        outcome="access_refused",
        release_content=True,
    )


async def _record_uploaded(
    ctx: Context,
    run: ConnectionRun,
    document: models.Document,
    stored: cegid.Stored,
    upload_id: int,
) -> None:
    """One statement: the attempt uploaded and the document with it (a second run finds it done);
    then the connection's first deposit, once."""
    runs = 0

    async def write() -> bool:
        nonlocal runs
        runs += 1
        held = await store.documents.mark_uploaded(
            ctx.pool,
            document.id,
            stored.document_id,
            ctx.worker,
            upload_id,
            stored.status,
            stored.body,
        )
        if not run.first_upload_recorded:
            await store.connections.set_first_upload(ctx.pool, run.connection.id)
        return held

    if not await ctx.guard.run("document uploaded", write) and not (
        runs > 1 and await _already(ctx, document, str(models.DocumentState.UPLOADED))
    ):
        _lost_hold(document, "uploaded")


def _waiting(run: ConnectionRun) -> models.Why:
    """The reason a document waits while its connection's access is refused."""
    return models.Why(
        models.Reason.ACCESS_REFUSED,
        f"waiting: {run.refused}",
        None if run.refused_by is None else str(run.refused_by),
    )


def _answer(stored: cegid.Stored | errors.RelayError) -> str:
    """Loop's answer to a deposit, in a line (held until the outcome is recorded)."""
    if isinstance(stored, cegid.Stored):
        return f"{STORED} as {stored.document_id or 'a document without id'} (HTTP {stored.status})"
    if isinstance(stored, errors.CegidUnavailable | errors.CegidAccessRefused):
        return f"not stored: {stored}"
    if isinstance(stored, errors.CegidFileRejected):
        return f"refused: {stored}"
    return f"no answer: {stored}"


def _doubt_unfounded(document: models.Document) -> None:
    """A recovery (another flush, taking this worker for dead while it waited for the database)
    put the document in doubt for an attempt row this worker committed without learning it: it
    was never sent. The ledger's rule stands (this worker no longer holds it, it writes nothing);
    the operator is told what to decide."""
    logger.warning(
        "document_in_doubt_never_sent",
        document=document.id,
        connection=str(document.connection_id),
        detail=(
            "taken from this flush while it waited for PostgreSQL, before its attempt was sent: "
            f"it is not in Loop, `relay documents resolve {document.id} --resend`"
        ),
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
    except errors.OutageTooLong:  # the flush gave up on the database: say what is left
        _unrecorded(ctx, document)
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
        ctx.answers.pop(document.id, None)
        ctx.slots.release()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _unrecorded(ctx: Context, document: models.Document) -> None:
    """A document whose outcome the flush could not record: the next run's recovery settles it
    (in doubt when an attempt was committed, pending when not); its answer, if any, is logged."""
    answer = ctx.answers.get(document.id)
    if answer is None:
        ctx.left["unsent"] += 1
        return
    ctx.left["stored" if answer.startswith(STORED) else "sent"] += 1
    logger.warning(
        "document_outcome_unrecorded",
        document=document.id,
        connection=str(document.connection_id),
        answer=answer,
    )


async def _download_and_upload(
    ctx: Context, run: ConnectionRun, document: models.Document, path: pathlib.Path
) -> None:
    if run.refused:
        await _finish(ctx, run, document, models.DocumentState.PENDING, _waiting(run))
        return
    try:
        download = await run.qonto.download(document.qonto_attachment_id, path)
    except errors.QontoNotFound:
        await _finish(ctx, run, document, models.DocumentState.SKIPPED, models.DELETED)
        return
    except attachments.TooLarge:
        await _finish(
            ctx,
            run,
            document,
            models.DocumentState.SKIPPED,
            models.Why(
                models.Reason.TOO_LARGE,
                f"{models.SKIP_TOO_LARGE} (over {models.MAX_UPLOAD_BYTES // (1024 * 1024)} MB)",
            ),
        )
        return
    except errors.QontoAuthRejected as exc:
        run.refused = f"Qonto refused the credentials: reconnect the organization ({exc})"
        run.refused_by = models.Refuser.QONTO
        await _finish(ctx, run, document, models.DocumentState.PENDING, _waiting(run))
        return
    except (errors.Retryable, errors.QontoProtocolError, errors.ConfigurationError) as exc:
        await _finish(
            ctx,
            run,
            document,
            models.DocumentState.PENDING,
            models.Why(
                models.Reason.QONTO_DOWNLOAD_FAILED,
                f"Qonto download failed, retried next run ({exc})",
            ),
        )
        return
    kind = filetype.detect(download.head)
    if not kind.exported:
        await _finish(
            ctx,
            run,
            document,
            models.DocumentState.SKIPPED,
            models.Why(
                models.Reason.UNSUPPORTED_TYPE, f"{models.SKIP_UNSUPPORTED}: {kind.name}", kind.name
            ),
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

    async def claim_content() -> store.dossier_contents.Holder | None:
        # a second run finds this document holding the content already: the same answer
        holder = await store.dossier_contents.claim(
            ctx.pool,
            connection.cegid_domain,
            connection.cegid_dossier,
            download.sha256,
            document.id,
            download.size,
            kind.content_type,
            file_name,
        )
        if holder is None:  # taken by a concurrent transaction, committed by now
            holder = await store.dossier_contents.holder(
                ctx.pool, connection.cegid_domain, connection.cegid_dossier, download.sha256
            )
        return holder

    holder = await ctx.guard.run("start upload", claim_content)
    if holder is None or holder.id != document.id:
        if holder is not None and holder.state in (
            models.DocumentState.UPLOADED,
            models.DocumentState.IN_DOUBT,
        ):
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.SKIPPED,
                models.Why(
                    models.Reason.DUPLICATE_CONTENT,
                    f"{models.SKIP_DUPLICATE}: document {holder.id} has the same content",
                ),
            )
        else:  # the other copy is being sent now: whether it lands decides, next run
            other = f"document {holder.id}" if holder is not None else "another document"
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.PENDING,
                models.Why(
                    models.Reason.COPY_BEING_SENT,
                    f"waiting: {other} with the same content is being sent, retried next run",
                ),
            )
        return
    upload_id: int | None = None

    starts = 0

    async def start() -> int | None:
        # committed before the first byte; a second run closes the first one's row if the
        # database took its answer away (nothing was sent under it)
        nonlocal starts
        starts += 1
        return await store.uploads.start(ctx.pool, document.id, ctx.worker)

    tries = POLICY.tries()
    while True:
        if run.refused:  # refused for another document meanwhile
            await _wait_for_access(ctx, run, document, upload_id)
            return
        # The upload slots are held only while a request is out: bookkeeping and backoff
        # happen outside them, so they stay busy (issue: >= 0.9 x C/L).
        async with ctx.firm(connection.cegid_key_fingerprint), ctx.uploads:
            starts = 0
            upload_id = await ctx.guard.run("record attempt", start)
            if upload_id is None:  # a recovery took it from this worker: not ours to send
                _lost_hold(document, "uploading")
                if starts > 1 and await _already(ctx, document, models.DocumentState.IN_DOUBT):
                    _doubt_unfounded(document)
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
        ctx.answers[document.id] = _answer(stored)
        if isinstance(stored, errors.CegidUnavailable):  # includes CegidRateLimited
            delay = tries.again(stored.retry_after)
            if delay is None:
                await _finish(
                    ctx,
                    run,
                    document,
                    models.DocumentState.PENDING,
                    models.Why(
                        models.Reason.CEGID_UNAVAILABLE,
                        f"Cegid Loop unavailable, retried next run ({stored})",
                    ),
                    upload_id=upload_id,
                    outcome="retry",
                    release_content=True,
                )
                return
            record_retry = functools.partial(
                store.uploads.finish, ctx.pool, upload_id, "retry", None, None, str(stored)
            )
            await transition(ctx, "finish_upload", record_retry)
            ctx.answers.pop(document.id, None)
            logger.info(
                "upload_retry",
                document=document.id,
                attempt=tries.attempt - 1,
                delay_s=round(delay, 2),
                reason=str(stored),
            )
            await ctx.sleep(delay)
            continue
        if isinstance(stored, errors.CegidAccessRefused):
            # the daily dossier check clears the flag once access is back
            run.refused = f"{CEGID_REASON}{stored}"
            run.refused_by = models.Refuser.CEGID
            await _wait_for_access(ctx, run, document, upload_id)
            return
        if isinstance(stored, errors.CegidFileRejected):
            await _finish(
                ctx,
                run,
                document,
                models.DocumentState.FAILED,
                models.Why(models.Reason.FILE_REFUSED, str(stored)),
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
                models.Why(
                    models.Reason.IN_DOUBT,
                    recovery.IN_DOUBT_REASON.format(detail=stored, id=document.id),
                ),
                upload_id=upload_id,
                outcome="in_doubt",
            )
            return
        assert upload_id is not None
        await _record_uploaded(ctx, run, document, stored, upload_id)
        run.first_upload_recorded = True
        ctx.answers.pop(document.id, None)
        run.report.uploaded += 1
        logger.info(
            "document_uploaded",
            document=document.id,
            connection=str(connection.id),
            cegid_document=stored.document_id,
            size=download.size,
        )
        return
