"""An operator's decision on a document: ``relay documents resolve ID`` for one in doubt,
``relay documents retry ID`` for a failed one.

Only an operator can know whether a file whose upload got no answer is in the client's Loop inbox.
"""

from __future__ import annotations

import asyncpg

from relay import errors, log, models
from relay.store import db, overview, queries

logger = log.get(__name__)


async def resolve(pool: asyncpg.Pool, document_id: int, *, uploaded: bool) -> models.Document:
    """Settle an in-doubt document as the operator decided (``--uploaded`` or ``--resend``).

    ``--uploaded``: the file is in the client's Loop inbox; the document is uploaded.
    ``--resend``: it is not; the document goes back to pending (and its content is no longer
    counted as in the dossier) for the next flush. The attempt history is kept either way.
    """
    with db.translate("resolve document"):
        async with pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(queries.get("get_document"), document_id)
            if current is None:
                raise errors.NotFound(f"no document {document_id}")
            if current["state"] != models.DocumentState.IN_DOUBT:
                raise errors.Refused(
                    f"document {document_id} is {current['state']}, not in_doubt: only a document whose "
                    "upload outcome is unknown can be resolved"
                )
            if uploaded:
                record = await conn.fetchrow(
                    queries.get("resolve_document"),
                    document_id,
                    models.DocumentState.UPLOADED,
                    "confirmed in Loop by an operator",
                )
            else:
                await conn.execute(queries.get("release_dossier_content"), document_id)
                record = await conn.fetchrow(
                    queries.get("resolve_document"),
                    document_id,
                    models.DocumentState.PENDING,
                    "resend requested by an operator",
                )
    if record is None:  # another operator resolved it between our read and our update
        raise errors.Refused(f"document {document_id} changed state meanwhile: try again")
    logger.info("document_resolved", document=document_id, uploaded=uploaded)
    return models.Document.from_record(record)


RETRY_REASON = "retry requested by an operator"


async def retry(pool: asyncpg.Pool, document_id: int) -> models.Document:
    """Put a failed document back to pending for the next flush (``relay documents retry ID``; the
    operator fixed what made Loop refuse it). Only a failed document can be retried."""
    document = await overview.retry_document(pool, document_id, RETRY_REASON)
    if document is None:
        with db.translate("retry document"):
            state = await pool.fetchval(queries.get("document_state"), document_id)
        if state is None:
            raise errors.NotFound(f"no document {document_id}")
        raise errors.Refused(
            f"document {document_id} is {state}, not failed: only a document Loop refused can be "
            "retried"
        )
    logger.info("document_retried", document=document_id)
    return document
