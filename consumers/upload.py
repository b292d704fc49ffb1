"""One document's way to Cegid Loop, one transaction per transition (see :mod:`consumers.flusher`).

A claimed document is downloaded, typed by its bytes, deduplicated per dossier, its attempt row
committed before the first byte, then POSTed; :class:`_Job` names each step. Every write goes
through the flush's :class:`consumers.patience.Guard`, which waits for PostgreSQL when it is gone,
so a deposit already out keeps its answer.
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
from typing import Final

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
class Gates:
    """The bounds a flush's connections share.

    They bound the documents in hand, the deposits in flight (all firms together and per firm), and
    allow one document at a time per dossier and content.
    """

    # documents in hand (downloading, waiting for an upload slot, uploading), all connections
    # together: bounds temporary files and Qonto downloads whatever the number of connections
    slots: asyncio.Semaphore
    uploads: asyncio.Semaphore  # RELAY_UPLOAD_CONCURRENCY
    per_firm: int  # RELAY_UPLOAD_CONCURRENCY_PER_FIRM
    firms: dict[str, asyncio.Semaphore] = dataclasses.field(default_factory=dict)
    contents: dict[tuple[str, str, str], _Turn] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, settings: config.Settings) -> Gates:
        """Build the gates the settings ask for."""
        return cls(
            slots=asyncio.Semaphore(max(4, settings.upload_concurrency * 2)),
            uploads=asyncio.Semaphore(settings.upload_concurrency),
            per_firm=settings.upload_concurrency_per_firm,
        )

    def firm(self, fingerprint: str) -> asyncio.Semaphore:
        """Return the upload slots of the firm whose Loop key has this fingerprint."""
        if fingerprint not in self.firms:
            self.firms[fingerprint] = asyncio.Semaphore(self.per_firm)
        return self.firms[fingerprint]


@dataclasses.dataclass
class Answers:
    """Loop's answers to deposits whose outcome is not recorded yet, and what was left so.

    An answer is what is said of a deposit if the flush gives up on the database; what was left is
    counted as stored, sent (not stored) or unsent.
    """

    held: dict[int, str] = dataclasses.field(default_factory=dict)
    left: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class Context:
    """What one flush's documents share (settings, store, upstream clients and gates)."""

    settings: config.Settings
    pool: asyncpg.Pool
    qonto_http: qonto.HttpClients
    cegid: cegid.CegidClient
    box: crypto.Box
    sleep: Sleep
    tmpdir: pathlib.Path
    cutoff: dt.datetime
    guard: patience.Guard
    lease: recovery.Lease
    gates: Gates
    answers: Answers = dataclasses.field(default_factory=Answers)

    @property
    def worker(self) -> int:
        """The flush's worker id, under which it holds documents."""
        return self.lease.worker


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
    """Run one write that may run twice (it sets a state) through the guard."""
    await ctx.guard.run(what, write)


def _waiting(run: ConnectionRun) -> models.Why:
    """Return the reason a document waits while its connection's access is refused."""
    return models.Why(
        models.Reason.ACCESS_REFUSED,
        f"waiting: {run.refused}",
        None if run.refused_by is None else str(run.refused_by),
    )


def _answer(stored: cegid.Stored | errors.RelayError) -> str:
    """Say Loop's answer to a deposit in a line (held until the outcome is recorded)."""
    if isinstance(stored, cegid.Stored):
        return f"{STORED} as {stored.document_id or 'a document without id'} (HTTP {stored.status})"
    if isinstance(stored, errors.CegidUnavailable | errors.CegidAccessRefused):
        return f"not stored: {stored}"
    if isinstance(stored, errors.CegidFileRejected):
        return f"refused: {stored}"
    return f"no answer: {stored}"


def _doubt_unfounded(document: models.Document) -> None:
    """Tell the operator that a document a recovery put in doubt was never sent.

    A recovery (another flush, taking this worker for dead while it waited for the database) put
    the document in doubt for an attempt row this worker committed without learning it. The
    ledger's rule stands (this worker no longer holds it, it writes nothing); the operator is told
    what to decide.
    """
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
    """Log that a recovery settled the document this worker held, leaving its state alone."""
    logger.warning(
        "document_transition_lost",
        document=document.id,
        connection=str(document.connection_id),
        state=state,
    )


# ------------------------------------------------------------------------------------ one document


async def process(ctx: Context, run: ConnectionRun, document: models.Document) -> None:
    """Take one claimed document to Loop, or say why not, releasing its slot at the end."""
    job = _Job(ctx, run, document, ctx.tmpdir / f"{document.id}-{secrets.token_hex(4)}")
    try:
        await job.download_and_upload()
    except errors.OutageTooLong:  # the flush gave up on the database: say what is left
        job.unrecorded()
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
        ctx.answers.held.pop(document.id, None)
        ctx.gates.slots.release()
        with contextlib.suppress(FileNotFoundError):
            job.path.unlink()


@dataclasses.dataclass(frozen=True, slots=True)
class _File:
    """A downloaded file as it is deposited (where it is, what it is, what Loop calls it)."""

    path: pathlib.Path
    size: int
    sha256: str
    content_type: str
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Ended:
    """How a deposit attempt ended, recorded on its ``uploads`` row."""

    upload_id: int
    outcome: str  # retry, failed, in_doubt, access_refused
    http_status: int | None = None


@dataclasses.dataclass
class _Job:
    """One document in hand, each step of its way to Loop a method."""

    ctx: Context
    run: ConnectionRun
    document: models.Document
    path: pathlib.Path

    # -------------------------------------------------------------------------- download

    async def download_and_upload(self) -> None:
        """Download the file, type it by its bytes, then deposit it.

        One copy per dossier and content goes at a time in this process.
        """
        run = self.run
        if run.refused:
            await self.finish(models.DocumentState.PENDING, _waiting(run))
            return
        download = await self._download()
        if download is None:
            return
        kind = filetype.detect(download.head)
        if not kind.exported:
            await self.finish(
                models.DocumentState.SKIPPED,
                models.Why(
                    models.Reason.UNSUPPORTED_TYPE,
                    f"{models.SKIP_UNSUPPORTED}: {kind.name}",
                    kind.name,
                ),
            )
            return
        file = _File(
            path=self.path,
            size=download.size,
            sha256=download.sha256,
            content_type=kind.content_type,
            name=naming.file_name(self.document, kind.extension),
        )
        key = (run.connection.cegid_domain, run.connection.cegid_dossier, download.sha256)
        async with _content_turn(self.ctx, key):
            await self._deposit(file)

    async def _download(self) -> attachments.Download | None:
        """Stream the file from Qonto to ``path``, or return None when it cannot be had.

        The document is then finished (skipped, or pending with the reason).
        """
        run = self.run
        try:
            return await run.qonto.download(self.document.qonto_attachment_id, self.path)
        except errors.QontoNotFound:
            await self.finish(models.DocumentState.SKIPPED, models.DELETED)
        except attachments.TooLarge:
            limit_mb = models.MAX_UPLOAD_BYTES // (1024 * 1024)
            await self.finish(
                models.DocumentState.SKIPPED,
                models.Why(
                    models.Reason.TOO_LARGE, f"{models.SKIP_TOO_LARGE} (over {limit_mb} MB)"
                ),
            )
        except errors.QontoAuthRejected as exc:
            run.refused = f"Qonto refused the credentials: reconnect the organization ({exc})"
            run.refused_by = models.Refuser.QONTO
            await self.finish(models.DocumentState.PENDING, _waiting(run))
        except (errors.Retryable, errors.QontoProtocolError, errors.ConfigurationError) as exc:
            await self.finish(
                models.DocumentState.PENDING,
                models.Why(
                    models.Reason.QONTO_DOWNLOAD_FAILED,
                    f"Qonto download failed, retried next run ({exc})",
                ),
            )
        return None

    # -------------------------------------------------------------------------- deposit

    async def _deposit(self, file: _File) -> None:
        """Claim the content for the dossier, POST it to Loop and record the outcome.

        The POST is tried again under :data:`POLICY` after a failure Loop kept nothing of.
        """
        if not await self._claim_content(file):
            return
        tries = POLICY.tries()
        upload_id: int | None = None
        while True:
            if self.run.refused:  # refused for another document meanwhile
                await self._wait_for_access(upload_id)
                return
            sent = await self._send(file)
            if sent is None:
                return
            upload_id, stored = sent
            self.ctx.answers.held[self.document.id] = _answer(stored)
            if not isinstance(stored, errors.CegidUnavailable):  # CegidRateLimited included
                await self._settle(stored, upload_id, file)
                return
            delay = tries.again(stored.retry_after)
            if delay is None:
                await self.finish(
                    models.DocumentState.PENDING,
                    models.Why(
                        models.Reason.CEGID_UNAVAILABLE,
                        f"Cegid Loop unavailable, retried next run ({stored})",
                    ),
                    attempt=_Ended(upload_id, "retry"),
                    release_content=True,
                )
                return
            await self._record_retry(upload_id, stored, tries.attempt - 1, delay)
            await self.ctx.sleep(delay)

    async def _claim_content(self, file: _File) -> bool:
        """Claim the file's content for its dossier and tell whether this document holds it.

        If another one does, the document is finished: skipped when that copy is in Loop or in
        doubt, pending while it is being sent.
        """
        ctx, connection, document = self.ctx, self.run.connection, self.document

        async def claim() -> store.dossier_contents.Holder | None:
            # a second run finds this document holding the content already: the same answer
            holder = await store.dossier_contents.claim(
                ctx.pool,
                connection.cegid_domain,
                connection.cegid_dossier,
                file.sha256,
                document.id,
                file.size,
                file.content_type,
                file.name,
            )
            if holder is None:  # taken by a concurrent transaction, committed by now
                holder = await store.dossier_contents.holder(
                    ctx.pool, connection.cegid_domain, connection.cegid_dossier, file.sha256
                )
            return holder

        holder = await ctx.guard.run("start upload", claim)
        if holder is not None and holder.id == document.id:
            return True
        if holder is not None and holder.state in (
            models.DocumentState.UPLOADED,
            models.DocumentState.IN_DOUBT,
        ):
            await self.finish(
                models.DocumentState.SKIPPED,
                models.Why(
                    models.Reason.DUPLICATE_CONTENT,
                    f"{models.SKIP_DUPLICATE}: document {holder.id} has the same content",
                ),
            )
        else:  # the other copy is being sent now: whether it lands decides, next run
            other = f"document {holder.id}" if holder is not None else "another document"
            await self.finish(
                models.DocumentState.PENDING,
                models.Why(
                    models.Reason.COPY_BEING_SENT,
                    f"waiting: {other} with the same content is being sent, retried next run",
                ),
            )
        return False

    async def _send(self, file: _File) -> tuple[int, cegid.Stored | errors.RelayError] | None:
        """Make one attempt, its row committed before the first byte, then the POST.

        The POST runs inside the upload slots, held only while a request is out (bookkeeping and
        backoff do not keep them busy). Returns (attempt, Loop's answer), or None when a recovery
        took the document from this worker (not ours to send).
        """
        ctx, run, document = self.ctx, self.run, self.document
        starts = 0

        async def start() -> int | None:
            # a second run closes the first one's row if the database took its answer away
            # (nothing was sent under it)
            nonlocal starts
            starts += 1
            return await store.uploads.start(ctx.pool, document.id, ctx.worker)

        async with ctx.gates.firm(run.connection.cegid_key_fingerprint), ctx.gates.uploads:
            upload_id = await ctx.guard.run("record attempt", start)
            if upload_id is None:
                _lost_hold(document, "uploading")
                if starts > 1 and await self._already(models.DocumentState.IN_DOUBT):
                    _doubt_unfounded(document)
                return None
            try:
                stored: cegid.Stored | errors.RelayError = await ctx.cegid.store_document(
                    run.cegid_creds,
                    dossier=run.connection.cegid_dossier,
                    file_name=file.name,
                    transaction=document.direction,
                    content_type=file.content_type,
                    path=file.path,
                    size=file.size,
                )
            except (
                errors.CegidUnavailable,
                errors.CegidAccessRefused,
                errors.CegidFileRejected,
                errors.OutcomeUnknown,
            ) as exc:
                stored = exc
        return upload_id, stored

    async def _record_retry(
        self, upload_id: int, stored: errors.CegidUnavailable, attempt: int, delay: float
    ) -> None:
        """Close the attempt Loop kept nothing of (``retry``) before the next one."""
        record = functools.partial(
            store.uploads.finish, self.ctx.pool, upload_id, "retry", None, None, str(stored)
        )
        await transition(self.ctx, "finish_upload", record)
        self.ctx.answers.held.pop(self.document.id, None)
        logger.info(
            "upload_retry",
            document=self.document.id,
            attempt=attempt,
            delay_s=round(delay, 2),
            reason=str(stored),
        )

    async def _settle(
        self, stored: cegid.Stored | errors.RelayError, upload_id: int, file: _File
    ) -> None:
        """Record Loop's final answer.

        Access refused (the connection waits, the document ``pending`` for the next run), file
        refused (``failed``), no answer after the whole file was sent (``in_doubt``: never re-sent
        without an operator), or stored (``uploaded``).
        """
        run, document = self.run, self.document
        if isinstance(stored, errors.CegidAccessRefused):
            # the daily dossier check clears the flag once access is back
            run.refused = f"{CEGID_REASON}{stored}"
            run.refused_by = models.Refuser.CEGID
            await self._wait_for_access(upload_id)
        elif isinstance(stored, errors.CegidFileRejected):
            await self.finish(
                models.DocumentState.FAILED,
                models.Why(models.Reason.FILE_REFUSED, str(stored)),
                attempt=_Ended(upload_id, "failed", stored.status),
                release_content=True,
            )
        elif isinstance(stored, errors.RelayError):  # OutcomeUnknown: sent, no answer
            await self.finish(
                models.DocumentState.IN_DOUBT,
                models.Why(
                    models.Reason.IN_DOUBT,
                    recovery.IN_DOUBT_REASON.format(detail=stored, id=document.id),
                ),
                attempt=_Ended(upload_id, "in_doubt"),
            )
        else:
            await self._record_uploaded(stored, upload_id)
            run.first_upload_recorded = True
            self.ctx.answers.held.pop(document.id, None)
            run.report.uploaded += 1
            logger.info(
                "document_uploaded",
                document=document.id,
                connection=str(run.connection.id),
                cegid_document=stored.document_id,
                size=file.size,
            )

    # -------------------------------------------------------------------------- outcomes

    async def finish(
        self,
        state: models.DocumentState,
        why: models.Why,
        *,
        attempt: _Ended | None = None,
        release_content: bool = False,
    ) -> None:
        """Write the document's new state in one transaction, with its attempt's end if any.

        The same transaction gives up the dossier's content when asked; then come the report's
        count and the log line.
        """
        ctx, run, document = self.ctx, self.run, self.document
        runs = 0

        async def write() -> bool:
            nonlocal runs
            runs += 1
            async with db.transaction(ctx.pool, "finish document") as conn:
                held = await store.documents.finish(conn, document.id, state, why, ctx.worker)
                if attempt is not None:
                    await store.uploads.finish(
                        conn,
                        attempt.upload_id,
                        attempt.outcome,
                        attempt.http_status,
                        None,
                        why.text,
                    )
                if release_content:
                    await store.dossier_contents.release(conn, document.id)
            return held

        if not await ctx.guard.run("finish document", write) and not (
            runs > 1 and await self._already(str(state))
        ):
            _lost_hold(document, str(state))
        ctx.answers.held.pop(document.id, None)
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

    async def _wait_for_access(self, upload_id: int | None) -> None:
        """Leave the document pending after Loop refused the connection's access.

        It waits with that reason and gives up its content claim (nothing went into Loop); the
        connection is flagged at its end.
        """
        await self.finish(
            models.DocumentState.PENDING,
            _waiting(self.run),
            attempt=None if upload_id is None else _Ended(upload_id, "access_refused"),
            release_content=True,
        )

    async def _record_uploaded(self, stored: cegid.Stored, upload_id: int) -> None:
        """Mark the attempt and the document uploaded in one statement (a second run finds it done).

        Then the connection's first deposit is recorded, once.
        """
        ctx, run, document = self.ctx, self.run, self.document
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
            runs > 1 and await self._already(str(models.DocumentState.UPLOADED))
        ):
            _lost_hold(document, "uploaded")

    async def _already(self, state: str) -> bool:
        """Tell whether a transition's first run landed, once its second found the document gone.

        The first run's answer may have been lost with the database; otherwise a recovery took the
        document.
        """

        async def read() -> bool:
            return await store.documents.state_of(self.ctx.pool, self.document.id) == state

        return await self.ctx.guard.run("read document", read)

    def unrecorded(self) -> None:
        """Count this document as left unrecorded by the flush, logging Loop's answer if any.

        The next run's recovery settles it (in doubt when an attempt was committed, pending when
        not).
        """
        answers, document = self.ctx.answers, self.document
        answer = answers.held.get(document.id)
        if answer is None:
            answers.left["unsent"] += 1
            return
        answers.left["stored" if answer.startswith(STORED) else "sent"] += 1
        logger.warning(
            "document_outcome_unrecorded",
            document=document.id,
            connection=str(document.connection_id),
            answer=answer,
        )


@contextlib.asynccontextmanager
async def _content_turn(ctx: Context, key: tuple[str, str, str]) -> AsyncIterator[None]:
    """Let one document at a time per dossier and content through, in this process.

    A second copy waits for the first one's outcome (in Loop: a duplicate; refused: it may go)
    instead of a next run.
    """
    turn = ctx.gates.contents.setdefault(key, _Turn())
    turn.users += 1
    try:
        async with turn.lock:
            yield
    finally:
        turn.users -= 1
        if not turn.users:
            del ctx.gates.contents[key]
