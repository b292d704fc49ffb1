"""Migration 0008: who refused a connection and why a document waits become values, carried over
once from the prose rows written before it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from relay import config, crypto, models, store
from relay.store import db, queries
from tests.integration.conftest import BASE_DSN

BEFORE = "0006_resources_attachment_list"

CONNECTIONS = {
    # state, state_reason -> refused_by after the migration
    "cegid": ("needs_attention", "Cegid: Cegid refused access to dossier D (HTTP 403)", ["cegid"]),
    "qonto": (
        "needs_attention",
        "Qonto refused the credentials: reconnect the organization (401)",
        ["qonto"],
    ),
    "both": ("needs_attention", "Qonto: refused (401); Cegid: refused (403)", ["cegid", "qonto"]),
    "disconnected": ("disconnected", "disconnected by an operator", []),
    "active": ("active", None, []),
}

DOCUMENTS = [
    # state, reason -> reason_code, reason_detail
    ("skipped", "deleted before sync", "deleted", None),
    ("skipped", "unsupported type: HEIC image", "unsupported_type", "HEIC image"),
    ("skipped", "too large (over 50 MB)", "too_large", None),
    ("skipped", "duplicate content: document 1 has the same content", "duplicate_content", None),
    ("failed", "Cegid refused the file (HTTP 415): unsupported", "file_refused", None),
    ("in_doubt", "sent to Cegid Loop but no answer came back (timeout): check", "in_doubt", None),
    (
        "pending",
        "waiting: Cegid: Cegid refused access to dossier D (HTTP 403)",
        "access_refused",
        "cegid",
    ),
    (
        "pending",
        "waiting: Qonto refused the credentials: reconnect (401)",
        "access_refused",
        "qonto",
    ),
    (
        "pending",
        "waiting: document 3 with the same content is being sent, retried next run",
        "copy_being_sent",
        None,
    ),
    ("pending", "Qonto download failed, retried next run (timeout)", "qonto_download_failed", None),
    ("pending", "Cegid Loop unavailable, retried next run (HTTP 503)", "cegid_unavailable", None),
    ("pending", "the previous flush stopped before sending it", "flush_stopped", None),
    (
        "pending",
        "an error stopped the flush before sending it, retried next run",
        "flush_error",
        None,
    ),
    ("pending", "resend requested by an operator", "resend_requested", None),
    ("pending", "retry requested by an operator", "retry_requested", None),
    ("uploaded", "confirmed in Loop by an operator", "confirmed_by_operator", None),
    ("skipped", "a reason no code matches", "other", None),
    ("pending", None, None, None),
]


@pytest.fixture
async def old_database() -> AsyncIterator[tuple[config.Settings, dict[str, uuid.UUID]]]:
    """A database at 0006's schema holding rows written the old way (prose only)."""
    settings = config.Settings(
        secret_key=config.Secret(crypto.generate_key()),
        database_url=config.Secret(f"{BASE_DSN.rstrip('/')}/relay_facts_{uuid.uuid4().hex[:10]}"),
    )
    await db.create_database_if_missing(settings)
    ids = {name: uuid.uuid4() for name in CONNECTIONS}
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in queries.migrations():
            if version > BEFORE:
                break
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        for name, (state, reason, _) in CONNECTIONS.items():
            await conn.execute(
                "INSERT INTO connections (id, client_name, qonto_organization_id, qonto_auth_kind,"
                " qonto_credentials, cegid_credentials, cegid_key_fingerprint, cegid_dossier,"
                " cegid_domain, state, state_reason, scan_since)"
                " VALUES ($1, $2, 'org', 'api_key', '\\x00', '\\x00', 'f', 'D', 'DOM', $3, $4, now())",
                ids[name],
                name,
                state,
                reason,
            )
        for index, (state, reason, _, _) in enumerate(DOCUMENTS):
            await conn.execute(
                "INSERT INTO documents (connection_id, source, qonto_resource_id,"
                " qonto_attachment_id, direction, state, reason)"
                " VALUES ($1, 'transaction', $2, $2, 'PURCHASE', $3, $4)",
                ids["cegid"],
                f"item-{index}",
                state,
                reason,
            )
    finally:
        await conn.close()
    yield settings, ids
    await db.drop_database(settings)


async def test_old_rows_get_their_facts_as_values(
    old_database: tuple[config.Settings, dict[str, uuid.UUID]],
) -> None:
    """Who refused comes from each flagged connection's reason, and each document's reason code
    and detail from its reason, once, at the migration."""
    settings, ids = old_database
    applied = await db.migrate(settings)
    assert "0008_facts" in applied
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        refused = {
            r["id"]: list(r["refused_by"])
            for r in await conn.fetch("SELECT id, refused_by FROM connections")
        }
        documents = {
            r["qonto_attachment_id"]: (r["reason_code"], r["reason_detail"])
            for r in await conn.fetch(
                "SELECT qonto_attachment_id, reason_code, reason_detail FROM documents"
            )
        }
    finally:
        await conn.close()
    assert refused == {ids[name]: expected for name, (_, _, expected) in CONNECTIONS.items()}
    assert documents == {
        f"item-{index}": (code, detail) for index, (_, _, code, detail) in enumerate(DOCUMENTS)
    }


async def test_after_the_migration_only_a_flag_cegid_alone_raised_is_cleared(
    old_database: tuple[config.Settings, dict[str, uuid.UUID]],
) -> None:
    """A dossier read that passes clears the carried-over Cegid flag, not one Qonto raised too."""
    settings, ids = old_database
    await db.migrate(settings)
    async with db.pool_for(settings, max_size=2) as pool:
        cleared = await store.connections.clear_cegid_flag(pool, ids["cegid"])
        assert cleared is not None
        assert (cleared.state, cleared.refused_by) == (models.ConnectionState.ACTIVE, frozenset())
        assert await store.connections.clear_cegid_flag(pool, ids["both"]) is None
        assert await store.connections.clear_cegid_flag(pool, ids["qonto"]) is None
        both = await store.connections.get(pool, ids["both"])
        assert both is not None
        assert both.refused_by == {models.Refuser.QONTO, models.Refuser.CEGID}
