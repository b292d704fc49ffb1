"""The run report: what each connection's flush did and what is left; its exit code."""

from __future__ import annotations

import datetime as dt
import uuid

import orjson

from relay import models
from relay.domain import report

STARTED = dt.datetime(2026, 11, 24, 20, 0, tzinfo=dt.UTC)


def _connection(**values: object) -> report.ConnectionReport:
    connection = report.ConnectionReport(
        connection_id=uuid.UUID(int=1), client_name="Acme", dossier="ACME001", state="active"
    )
    for name, value in values.items():
        setattr(connection, name, value)
    return connection


def _run(*connections: report.ConnectionReport) -> report.RunReport:
    return report.RunReport(
        kind="manual",
        started_at=STARTED,
        finished_at=STARTED + dt.timedelta(seconds=3),
        connections=list(connections),
    )


def test_uploaded_and_skipped_with_reasons_is_success() -> None:
    """Everything uploaded or skipped with a reason: exit code 0, totals add up."""
    connection = _connection(uploaded=3)
    connection.skipped["unsupported type: HEIC image"] += 2
    run = _run(connection)
    assert run.exit_code == 0
    assert run.totals() == {"uploaded": 3, "skipped": 2, "failed": 0, "in_doubt": 0, "pending": 0}


def test_failed_in_doubt_pending_or_attention_make_the_run_fail() -> None:
    """Anything an operator must look at makes `relay flush --now` exit 1."""
    failed = _connection()
    failed.failed["Cegid refused the file (HTTP 415)"] += 1
    pending = _connection()
    pending.pending["Cegid Loop unavailable, retried next run"] += 1
    for connection in (
        failed,
        pending,
        _connection(in_doubt=1),
        _connection(in_doubt_total=1),
        _connection(attention="Cegid refused access to dossier ACME001"),
    ):
        assert _run(_connection(uploaded=1), connection).exit_code == 1


def test_json_is_one_document_with_reasons_warnings_and_duration() -> None:
    """`--json`: serialisable, per connection counts by reason, the warnings, the duration."""
    connection = _connection(uploaded=1, warnings=["disconnect and reconnect"])
    connection.skipped["deleted before sync"] += 1
    body = orjson.loads(orjson.dumps(_run(connection).to_json()))
    assert body["duration_s"] == 3.0
    assert body["exit_code"] == 0
    assert body["connections"][0]["skipped"] == {"deleted before sync": 1}
    assert body["connections"][0]["warnings"] == ["disconnect and reconnect"]
    assert body["connections"][0]["connection_id"] == str(uuid.UUID(int=1))


def test_rendered_table_names_every_reason_and_the_advice() -> None:
    """The terminal view shows each count with its reason, in-doubt advice and warnings."""
    connection = _connection(uploaded=2, in_doubt=1, warnings=["folder not seen in Loop"])
    connection.failed["Cegid refused the file (HTTP 415)"] += 1
    text = _run(connection).render()
    assert "Acme (dossier ACME001)" in text
    assert "uploaded   2" in text
    assert "failed     1  (Cegid refused the file (HTTP 415))" in text
    assert "relay documents resolve ID --uploaded|--resend" in text
    assert "WARNING: folder not seen in Loop" in text
    assert text.splitlines()[-1] == "Total: uploaded 2, skipped 0, failed 1, in_doubt 1, pending 0"


def test_report_groups_come_from_reason_codes() -> None:
    """Each reason code (and the value qualifying it) names one group; no prose is parsed."""
    assert report.group(models.Reason.UNSUPPORTED_TYPE, "HEIC image") == (
        "unsupported type: HEIC image"
    )
    assert report.group(models.Reason.DELETED) == models.SKIP_DELETED
    assert report.group(models.Reason.ACCESS_REFUSED, "qonto") != report.group(
        models.Reason.ACCESS_REFUSED, "cegid"
    )
    assert report.group(None) == "unknown"
    assert len({report.group(code) for code in models.Reason}) == len(models.Reason)
