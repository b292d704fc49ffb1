"""States, reasons and next actions in plain words, as the console shows them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any, Final

import orjson

from relay import models
from relay.store import overview

CONNECTION_STATES: Final = {
    "active": "Active",
    "needs_attention": "Needs attention",
    "revoked": "Access revoked in Qonto",
    "disconnected": "Disconnected",
}
SOURCES: Final = {
    "transaction": "Transaction",
    "supplier_invoice": "Supplier invoice",
    "client_invoice": "Client invoice",
}
STATES: Final = {
    "pending": "Pending",
    "uploading": "Uploading",
    "uploaded": "Uploaded",
    "skipped": "Skipped",
    "failed": "Failed",
    "in_doubt": "In doubt",
}
SKIPPED: Final = {
    models.SKIP_DELETED: "the attachment was deleted in Qonto before the flush",
    models.SKIP_UNSUPPORTED: "not a PDF, JPEG or PNG file, which Loop does not take",
    models.SKIP_DUPLICATE: "the same file is already in this client's Loop folder",
    models.SKIP_TOO_LARGE: "larger than Loop's 50 MB limit",
}
IN_DOUBT_EXPLANATION: Final = (
    "The file was sent to Loop and no answer came back: it may or may not be in the client's Loop "
    "inbox, and the relay never sends it again by itself. Look in Loop first. Mark as uploaded if it "
    "is there (nothing is sent). Send again if it is not: it goes at the next flush, and if it was "
    "there after all, the client's inbox gets it twice."
)
RETRY_EXPLANATION: Final = (
    "Loop refused this file. Retry once the cause is fixed: it goes back to pending and is sent at "
    "the next flush."
)

# Priorities on the Today page: the lower, the sooner someone should look.
URGENT, TODAY, LATER, FINE = 0, 1, 2, 3


def when(value: dt.datetime | str | None, *, never: str = "never") -> str:
    """Say a moment as the console shows it (minutes, UTC), reading an ISO text first."""
    moment = value
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(moment, dt.datetime):
        return never
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def document_reason(document: models.Document) -> str:
    """Say what happened to a document, for an operator."""
    state, reason = document.state, document.reason
    if state == models.DocumentState.PENDING:
        return f"waiting for the next flush ({reason})" if reason else "waiting for the next flush"
    if state == models.DocumentState.UPLOADING:
        return "being sent to Loop now"
    if state == models.DocumentState.UPLOADED:
        return f"in Loop since {when(document.uploaded_at)}"
    if state == models.DocumentState.SKIPPED:
        return f"not sent: {SKIPPED.get(reason or '', reason or 'no reason recorded')}"
    if state == models.DocumentState.FAILED:
        return f"Loop refused the file: {reason or 'no reason recorded'}"
    return "sent to Loop, but no answer came back: it may or may not be there"


def cegid_answer(row: overview.DocumentRow) -> str:
    """Say the last attempt's answer from Loop, short."""
    parts = []
    if row.last_http_status is not None:
        parts.append(f"HTTP {row.last_http_status}")
    if row.document.cegid_document_id:
        parts.append(f"id {row.document.cegid_document_id}")
    elif row.last_cegid_answer is not None:
        parts.append(orjson.dumps(row.last_cegid_answer).decode()[:160])
    if row.last_error and row.document.state != models.DocumentState.UPLOADED:
        parts.append(row.last_error[:160])
    return "; ".join(parts) or "none yet"


@dataclasses.dataclass(frozen=True, slots=True)
class Attention:
    """How soon a connection needs someone, and the next action in words."""

    priority: int
    next_action: str


def attention(
    row: overview.ConnectionRow, counts: dict[str, int], folder_warning: str | None
) -> Attention:
    """Decide the first thing someone should do about a connection, most urgent first."""
    connection = row.connection
    state = connection.state
    if state == models.ConnectionState.NEEDS_ATTENTION:
        return Attention(
            URGENT,
            f"Fix the access refused ({connection.state_reason or 'no reason recorded'}), then "
            "Check now; its documents wait meanwhile.",
        )
    if state == models.ConnectionState.REVOKED:
        return Attention(
            URGENT,
            "The organization revoked the relay's access in Qonto: create an invitation for a new "
            "connection if the client wants to go on.",
        )
    in_doubt, failed = counts.get("in_doubt", 0), counts.get("failed", 0)
    if in_doubt:
        return Attention(
            URGENT,
            f"Look in Loop for {in_doubt} document{'s' if in_doubt > 1 else ''} in doubt, then "
            "Mark as uploaded or Send again.",
        )
    if failed:
        return Attention(
            TODAY,
            f"Loop refused {failed} document{'s' if failed > 1 else ''}: fix the cause, then Retry.",
        )
    if folder_warning:
        return Attention(TODAY, folder_warning[:1].upper() + folder_warning[1:] + ".")
    if state == models.ConnectionState.DISCONNECTED:
        return Attention(LATER, "Disconnected by an operator: Reconnect to resume.")
    return Attention(FINE, "Nothing to do.")


_SECRET_KEY: Final = re.compile(
    r"secret|token|password|passwd|authorization|signature|api[_-]?key|credential|iban|bic",
    re.IGNORECASE,
)
_URL_QUERY: Final = re.compile(r"(https?://[^\s\"'?]+)\?[^\s\"']*")
_ASSIGNMENT: Final = re.compile(
    r"((?:secret|token|password|passwd|api[_-]?key|signature)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\s\"',&}]+",
    re.IGNORECASE,
)
# An HTTP credential written out: "Authorization: Bearer x", "Basic x".
_CREDENTIAL: Final = re.compile(
    r"((?:authorization[\"']?\s*[:=]\s*[\"']?)?(?:bearer|basic)\s+)[^\s\"',&}]+",
    re.IGNORECASE,
)
MASK: Final = "•••• (masked)"


def _masked_text(text: str) -> str:
    """Mask the credentials, ``secret=``-like assignments and URL queries written in a text."""
    text = _URL_QUERY.sub(r"\1?" + MASK, text)
    return _ASSIGNMENT.sub(r"\1" + MASK, _CREDENTIAL.sub(r"\1" + MASK, text))


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: MASK if _SECRET_KEY.search(str(key)) and value[key] else _masked(value[key])
            for key in value
        }
    if isinstance(value, list):
        return [_masked(item) for item in value]
    if isinstance(value, str):
        return _masked_text(value)
    return value


def masked_body(body: bytes) -> str:
    """Render a dead-lettered message for an operator's eyes, pretty-printed when it is JSON.

    Secrets, tokens, credentials written in texts and the query strings of URLs (presigned links)
    are masked.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _masked_text(body.decode("utf-8", "replace"))
    return orjson.dumps(_masked(value), option=orjson.OPT_INDENT_2).decode()
