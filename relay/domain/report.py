"""The run report, per connection, of what this flush did to each document, what is left and why."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import uuid
from typing import Any, Final

from relay import models

Reason = models.Reason

_GROUPS: Final = {
    Reason.DELETED: models.SKIP_DELETED,
    Reason.UNSUPPORTED_TYPE: models.SKIP_UNSUPPORTED,
    Reason.TOO_LARGE: models.SKIP_TOO_LARGE,
    Reason.DUPLICATE_CONTENT: models.SKIP_DUPLICATE,
    Reason.FILE_REFUSED: "Cegid refused the file",
    Reason.QONTO_DOWNLOAD_FAILED: "Qonto download failed, retried next run",
    Reason.CEGID_UNAVAILABLE: "Cegid Loop unavailable, retried next run",
    Reason.ACCESS_REFUSED: "waiting: access refused",
    Reason.COPY_BEING_SENT: "waiting: a copy with the same content is being sent",
    Reason.IN_DOUBT: "sent to Cegid Loop but no answer came back",
    Reason.FLUSH_STOPPED: "the previous flush stopped before sending it",
    Reason.FLUSH_ERROR: "an error stopped the flush before sending it, retried next run",
    Reason.RESEND_REQUESTED: "resend requested by an operator",
    Reason.RETRY_REQUESTED: "retry requested by an operator",
    Reason.CONFIRMED_BY_OPERATOR: "confirmed in Loop by an operator",
    Reason.OTHER: "other (recorded before reasons had codes)",
}
_REFUSED: Final = {
    models.Refuser.QONTO: "waiting: Qonto refused the credentials",
    models.Refuser.CEGID: "waiting: Cegid refused access to the dossier",
}


def group(code: models.Reason | None, detail: str | None = None) -> str:
    """Name the report's group of a reason code and the value qualifying it."""
    if code is None:
        return "unknown"
    if code is Reason.UNSUPPORTED_TYPE and detail:
        return f"{models.SKIP_UNSUPPORTED}: {detail}"
    if code is Reason.ACCESS_REFUSED and detail in set(models.Refuser):
        return _REFUSED[models.Refuser(detail)]
    return _GROUPS[code]


@dataclasses.dataclass
class ConnectionReport:
    connection_id: uuid.UUID
    client_name: str
    dossier: str
    state: str
    uploaded: int = 0
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    failed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    in_doubt: int = 0
    pending: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    recovered_in_doubt: int = 0
    in_doubt_total: int = 0
    attention: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    scan: dict[str, Any] | None = None

    @property
    def problems(self) -> bool:
        return bool(
            self.failed or self.in_doubt or self.pending or self.attention or self.in_doubt_total
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "connection_id": str(self.connection_id),
            "client_name": self.client_name,
            "dossier": self.dossier,
            "state": self.state,
            "uploaded": self.uploaded,
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "in_doubt": self.in_doubt,
            "in_doubt_total": self.in_doubt_total,
            "recovered_in_doubt": self.recovered_in_doubt,
            "pending": dict(self.pending),
            "needs_attention": self.attention,
            "warnings": self.warnings,
            "scan": self.scan,
        }


@dataclasses.dataclass
class RunReport:
    kind: str
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    connections: list[ConnectionReport] = dataclasses.field(default_factory=list)
    recovered: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """Return 0 when all is uploaded or skipped with a reason, 1 when anything needs a look."""
        return 1 if any(c.problems for c in self.connections) else 0

    def totals(self) -> dict[str, int]:
        return {
            "uploaded": sum(c.uploaded for c in self.connections),
            "skipped": sum(sum(c.skipped.values()) for c in self.connections),
            "failed": sum(sum(c.failed.values()) for c in self.connections),
            "in_doubt": sum(c.in_doubt for c in self.connections),
            "pending": sum(sum(c.pending.values()) for c in self.connections),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "duration_s": round((self.finished_at - self.started_at).total_seconds(), 3)
            if self.finished_at
            else None,
            "totals": self.totals(),
            "recovered": self.recovered,
            "connections": [c.to_json() for c in self.connections],
            "exit_code": self.exit_code,
        }

    def render(self) -> str:
        lines = []
        duration = (self.finished_at - self.started_at).total_seconds() if self.finished_at else 0.0
        lines.append(
            f"Flush ({self.kind}) started {self.started_at:%Y-%m-%d %H:%M:%S} UTC, {duration:.1f} s"
        )
        if any(self.recovered.values()):
            lines.append(f"  recovered from a previous run: {self.recovered}")
        for c in self.connections:
            lines.append("")
            lines.append(f"{c.client_name} (dossier {c.dossier}) [{c.state}] {c.connection_id}")
            if c.scan is not None:
                lines.append(
                    f"  scan: {c.scan.get('seen', {})} seen, {c.scan.get('new_documents', 0)} new"
                    + (f", errors: {c.scan['errors']}" if c.scan.get("errors") else "")
                )
            lines.append(f"  uploaded   {c.uploaded}")
            for reason, count in sorted(c.skipped.items()):
                lines.append(f"  skipped    {count}  ({reason})")
            for reason, count in sorted(c.failed.items()):
                lines.append(f"  failed     {count}  ({reason})")
            if c.in_doubt or c.in_doubt_total:
                lines.append(
                    f"  in doubt   {c.in_doubt} this run, {c.in_doubt_total} in all: check Loop, then "
                    "relay documents resolve ID --uploaded|--resend"
                )
            for reason, count in sorted(c.pending.items()):
                lines.append(f"  pending    {count}  ({reason})")
            if c.attention:
                lines.append(f"  NEEDS ATTENTION: {c.attention}")
            for warning in c.warnings:
                lines.append(f"  WARNING: {warning}")
        totals = self.totals()
        lines.append("")
        lines.append("Total: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
        return "\n".join(lines)
