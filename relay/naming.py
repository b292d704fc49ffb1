"""The file name Loop shows, the only free text the relay controls.

So it carries what PIA cannot ask for (see :func:`file_name`).
"""

from __future__ import annotations

import re
import unicodedata

from relay import models

MAX_LENGTH = 120
_SOURCE = {
    models.Source.TRANSACTION: "receipt",
    models.Source.SUPPLIER_INVOICE: "supplier-invoice",
    models.Source.CLIENT_INVOICE: "client-invoice",
}


def slug(text: str, limit: int) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", ascii_text).strip("-")
    return cleaned[:limit].strip("-")


def file_name(document: models.Document, extension: str) -> str:
    """Name the document's file in Loop, ASCII, unique, at most ``MAX_LENGTH`` characters.

    The name is ``{date}_{counterparty}_{amount}{currency}_{source}_{attachment}.{ext}``.
    """
    parts = [
        document.document_date.isoformat() if document.document_date else "undated",
        slug(document.counterparty or "", 30) or "unknown",
    ]
    if document.amount:
        amount = slug(document.amount.replace(",", "."), 14).replace("-", ".")
        parts.append(f"{amount}{slug(document.currency or '', 3).upper()}")
    parts.append(_SOURCE[models.Source(document.source)])
    parts.append(slug(document.qonto_attachment_id, 40) or str(document.id))
    stem = "_".join(p for p in parts if p)
    if len(stem) + len(extension) + 1 > MAX_LENGTH:  # keep the unique tail, shorten the middle
        tail = "_".join(parts[-2:])
        stem = stem[: MAX_LENGTH - len(extension) - 2 - len(tail)] + "_" + tail
    return f"{stem}.{extension}"
