-- Every statement the relay runs, by name. Each has a `-- name:` header and a `-- params:` line.
-- Sections: connections, intake cache, events & documents (consumer), scan, flush, runs, reports.

-- ============================================================================ connections

-- name: insert_connection
-- params: $1 id, $2 client_name, $3 qonto_organization_id, $4 qonto_auth_kind,
--         $5 qonto_credentials (sealed), $6 cegid_credentials (sealed), $7 cegid_key_fingerprint,
--         $8 cegid_dossier, $9 cegid_domain, $10 scan_since, $11 dossier_checked_at
INSERT INTO connections (
    id, client_name, qonto_organization_id, qonto_auth_kind, qonto_credentials, cegid_credentials,
    cegid_key_fingerprint, cegid_dossier, cegid_domain, scan_since, dossier_checked_at
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
RETURNING *;

-- name: insert_webhook_secret
-- params: $1 connection_id, $2 secret (sealed), $3 qonto_subscription_id, $4 topics
INSERT INTO webhook_secrets (connection_id, secret, qonto_subscription_id, topics)
VALUES ($1, $2, $3, $4)
RETURNING id;

-- name: list_connections
-- params: (none)
SELECT * FROM connections ORDER BY created_at, id;

-- name: get_connection
-- params: $1 id
SELECT * FROM connections WHERE id = $1;

-- name: get_sealed_credentials
-- params: $1 connection_id
SELECT id AS connection_id, qonto_auth_kind, qonto_credentials, cegid_credentials
FROM connections WHERE id = $1;

-- name: update_qonto_credentials
-- params: $1 connection_id, $2 qonto_credentials (sealed)
UPDATE connections SET qonto_credentials = $2, updated_at = now() WHERE id = $1;

-- name: set_connection_state
-- params: $1 connection_id, $2 state, $3 state_reason
UPDATE connections SET state = $2, state_reason = $3, updated_at = now()
WHERE id = $1
RETURNING *;

-- name: set_dossier_checked
-- params: $1 connection_id
UPDATE connections SET dossier_checked_at = now(), updated_at = now() WHERE id = $1;

-- name: list_webhook_secrets
-- params: $1 connection_id
SELECT id, qonto_subscription_id, topics, created_at, revoked_at
FROM webhook_secrets WHERE connection_id = $1 ORDER BY id;

-- name: revoke_webhook_secrets
-- params: $1 connection_id
UPDATE webhook_secrets SET revoked_at = now() WHERE connection_id = $1 AND revoked_at IS NULL;

-- ============================================================================ intake cache

-- name: intake_secrets_all
-- params: (none)
-- Every connection that accepts webhooks, with its currently valid sealed secrets.
SELECT c.id AS connection_id, ws.secret
FROM connections c
JOIN webhook_secrets ws ON ws.connection_id = c.id AND ws.revoked_at IS NULL
WHERE c.state IN ('active', 'needs_attention');

-- name: intake_secrets_one
-- params: $1 connection_id
SELECT c.id AS connection_id, ws.secret
FROM connections c
JOIN webhook_secrets ws ON ws.connection_id = c.id AND ws.revoked_at IS NULL
WHERE c.id = $1 AND c.state IN ('active', 'needs_attention');

-- ============================================================================ documents (reads)

-- name: list_documents
-- params: $1 connection_id (or NULL for all), $2 state (or NULL for all), $3 limit (or NULL)
SELECT * FROM documents
WHERE ($1::uuid IS NULL OR connection_id = $1)
  AND ($2::text IS NULL OR state = $2)
ORDER BY id
LIMIT $3;

-- name: get_document
-- params: $1 id
SELECT * FROM documents WHERE id = $1;

-- name: count_documents_by_state
-- params: $1 connection_id (or NULL for all)
SELECT connection_id, state, count(*) AS n FROM documents
WHERE ($1::uuid IS NULL OR connection_id = $1)
GROUP BY connection_id, state;

-- ============================================================================ events & documents (consumer)

-- ============================================================================ scan

-- ============================================================================ flush

-- ============================================================================ runs
