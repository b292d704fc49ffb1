"""The ``dossier_contents`` table, naming the document that holds each content in a Loop dossier."""

from __future__ import annotations

import dataclasses

from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """The document holding a content for a dossier, and its state."""

    id: int
    state: str


async def claim(
    conn: db.Executor,
    domain: str,
    dossier: str,
    sha256: str,
    document_id: int,
    size: int,
    content_type: str,
    file_name: str,
) -> Holder | None:
    """Take the content for the document and record its file, unless another copy holds it.

    Another copy holds it while that copy is in Loop, in doubt or being sent. Returns the holder,
    or None when a concurrent transaction took it.
    """
    with db.translate("start upload"):
        record = await conn.fetchrow(
            queries.get("claim_dossier_content"),
            domain,
            dossier,
            sha256,
            document_id,
            size,
            content_type,
            file_name,
        )
    return None if record is None else Holder(record["id"], record["state"])


async def holder(conn: db.Executor, domain: str, dossier: str, sha256: str) -> Holder | None:
    """Read who holds a content in a dossier."""
    with db.translate("start upload"):
        record = await conn.fetchrow(queries.get("dossier_content_holder"), domain, dossier, sha256)
    return None if record is None else Holder(record["id"], record["state"])


async def release(conn: db.Executor, document_id: int) -> None:
    """Give up the document's content, which is not in Loop (another copy may be sent)."""
    with db.translate("release content"):
        await conn.execute(queries.get("release_dossier_content"), document_id)
