"""The console's words: dead letters shown with their secrets masked, and what a connection needs
first."""

from __future__ import annotations

import datetime as dt
import uuid

import orjson

from relay import models
from relay.edge.console import words
from relay.store import overview


def test_secrets_and_presigned_links_are_masked_in_a_dead_letter() -> None:
    """Keys naming a secret lose their value; URLs keep their path, never their query string."""
    body = orjson.dumps(
        {
            "event_id": "e1",
            "data": {
                "webhook_secret": "whsec_abcdef",
                "access_token": "tok-123",
                "url": "https://files.example/a.pdf?X-Amz-Signature=deadbeef&X-Amz-Credential=k",
                "label": "SHOP",
            },
        }
    )
    shown = words.masked_body(body)
    for secret in ("whsec_abcdef", "tok-123", "deadbeef", "X-Amz-Credential"):
        assert secret not in shown
    assert "https://files.example/a.pdf?" in shown
    assert "SHOP" in shown
    assert "e1" in shown


def test_a_body_that_is_not_json_is_masked_too() -> None:
    """Not JSON: ``token=...`` assignments and URL queries are masked all the same."""
    shown = words.masked_body(b"garbage token=s3cr3t see https://x.test/f?sig=abc")
    assert "s3cr3t" not in shown
    assert "sig=abc" not in shown
    assert "garbage" in shown


def _row(state: str, reason: str | None = None) -> overview.ConnectionRow:
    now = dt.datetime.now(dt.UTC)
    connection = models.Connection(
        id=uuid.uuid4(),
        client_name="Acme",
        qonto_organization_id="org",
        qonto_auth_kind="api_key",
        cegid_dossier="ACME001",
        cegid_domain="CABINET",
        cegid_key_fingerprint="f",
        state=state,
        state_reason=reason,
        scan_since=now,
        transactions_scanned_to=None,
        supplier_invoices_scanned_to=None,
        client_invoices_scanned_to=None,
        dossier_checked_at=None,
        first_upload_at=None,
        created_at=now,
        updated_at=now,
    )
    return overview.ConnectionRow(connection, now, None, None)


def test_credentials_inside_text_are_masked_in_json_and_plain_bodies() -> None:
    """A bearer token, an Authorization header or a ``password=`` written inside a text (an error
    copied into the payload, a header dump) is masked, in JSON strings and in plain bodies."""
    body = orjson.dumps(
        {
            "error": "Qonto said 401 to Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def",
            "note": "retried with password=hunter2 and client_secret: s3cr3t-value",
            "headers": ["authorization: Basic dXNlcjpwYXNz"],
        }
    )
    plain = b"POST /v1 Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc.def api_key=k-123"
    for shown in (words.masked_body(body), words.masked_body(plain)):
        for secret in ("eyJhbGciOiJIUzI1NiJ9", "hunter2", "s3cr3t-value", "dXNlcjpwYXNz", "k-123"):
            assert secret not in shown, (secret, shown)
    assert "Qonto said 401" in words.masked_body(body)


def test_what_a_connection_needs_first() -> None:
    """Access refused, then in doubt, then failed, then the folder advice; otherwise nothing."""
    flagged = words.attention(_row("needs_attention", "Cegid: refused"), {"in_doubt": 1}, None)
    assert flagged.priority == words.URGENT
    assert "Cegid: refused" in flagged.next_action
    doubt = words.attention(_row("active"), {"in_doubt": 2, "failed": 1}, None)
    assert doubt.priority == words.URGENT
    assert "2 documents in doubt" in doubt.next_action
    failed = words.attention(_row("active"), {"failed": 1}, None)
    assert failed.priority == words.TODAY
    assert "Retry" in failed.next_action
    folder = words.attention(_row("active"), {"pending": 3}, "the client's folder has not appeared")
    assert folder.next_action.startswith("The client's folder")
    assert words.attention(_row("active"), {"uploaded": 9}, None).next_action == "Nothing to do."
