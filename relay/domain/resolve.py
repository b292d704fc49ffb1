"""An operator's decision on a document that the relay cannot settle alone.

``relay documents resolve ID`` settles one in doubt; ``relay documents retry ID`` retries a failed
one.

Only an operator can know whether a file whose upload got no answer is in the client's Loop inbox.
"""

from __future__ import annotations

import asyncpg

from relay import errors, log, models, store
from relay.store import db

logger = log.get(__name__)


async def resolve(pool: asyncpg.Pool, document_id: int, *, uploaded: bool) -> models.Document:
    async with db.transaction(pool, "resolve document") as conn:
        current = await store.documents.get(conn, document_id)
        if current is None:
            raise errors.NotFound(f"no document {document_id}")
        if current.state != models.DocumentState.IN_DOUBT:
            raise errors.Refused(
                f"document {document_id} is {current.state}, not in_doubt: only a document whose "
                "upload outcome is unknown can be resolved"
            )
        if uploaded:
            resolved = await store.documents.resolve(
                conn,
                document_id,
                models.DocumentState.UPLOADED,
                models.Why(models.Reason.CONFIRMED_BY_OPERATOR, "confirmed in Loop by an operator"),
            )
        else:
            await store.dossier_contents.release(conn, document_id)
            resolved = await store.documents.resolve(
                conn,
                document_id,
                models.DocumentState.PENDING,
                models.Why(models.Reason.RESEND_REQUESTED, "resend requested by an operator"),
            )
    if resolved is None:  # another operator resolved it between our read and our update
        raise errors.Refused(f"document {document_id} changed state meanwhile: try again")
    logger.info("document_resolved", document=document_id, uploaded=uploaded)
    return resolved


RETRY = models.Why(models.Reason.RETRY_REQUESTED, "retry requested by an operator")


async def retry(pool: asyncpg.Pool, document_id: int) -> models.Document:
    """Put a failed document back to pending for the next flush (``relay documents retry ID``).

    The operator fixed what made Loop refuse it. Only a failed document can be retried.
    """
    document = await store.overview.retry_document(pool, document_id, RETRY)
    if document is None:
        state = await store.documents.state_of(pool, document_id)
        if state is None:
            raise errors.NotFound(f"no document {document_id}")
        raise errors.Refused(
            f"document {document_id} is {state}, not failed: only a document Loop refused can be "
            "retried"
        )
    logger.info("document_retried", document=document_id)
    return document
