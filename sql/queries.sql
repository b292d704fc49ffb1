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
UPDATE connections SET state = $2, state_reason = $3, refused_by = '{}', updated_at = now()
WHERE id = $1
RETURNING *;

-- name: flag_connection
-- params: $1 connection_id, $2 state (active or needs_attention), $3 state_reason,
--         $4 refused_by (text[]: qonto, cegid; empty when active)
-- What the relay decides by itself (a refusal seen, a check passed) never overrides an operator's
-- disconnect or a revocation: only an active or flagged connection changes.
UPDATE connections SET state = $2, state_reason = $3, refused_by = $4::text[], updated_at = now()
WHERE id = $1 AND state IN ('active', 'needs_attention')
RETURNING *;

-- name: clear_cegid_flag
-- params: $1 connection_id
-- A dossier read passed: the flag a Cegid refusal raised is cleared, and only such a flag (never
-- one Qonto refused too, a disconnect or a revocation, even one made since the flag was read).
UPDATE connections SET state = 'active', state_reason = NULL, refused_by = '{}',
       dossier_checked_at = now(), updated_at = now()
WHERE id = $1 AND state = 'needs_attention' AND refused_by = ARRAY['cegid']::text[]
RETURNING *;

-- name: set_dossier_checked
-- params: $1 connection_id
UPDATE connections SET dossier_checked_at = now(), updated_at = now() WHERE id = $1;

-- name: list_webhook_secrets
-- params: $1 connection_id
SELECT id, qonto_subscription_id, topics, created_at, revoked_at
FROM webhook_secrets WHERE connection_id = $1 ORDER BY id;

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

-- name: document_state
-- params: $1 id
SELECT state FROM documents WHERE id = $1;

-- name: count_documents_by_state
-- params: $1 connection_id (or NULL for all)
SELECT connection_id, state, count(*) AS n FROM documents
WHERE ($1::uuid IS NULL OR connection_id = $1)
GROUP BY connection_id, state;

-- ============================================================================ events & documents (consumer)

-- name: connection_states
-- params: $1 connection ids (uuid[])
SELECT id, state FROM connections WHERE id = ANY($1::uuid[]);

-- name: insert_events
-- params: $1 connection ids, $2 event ids, $3 topics, $4 outcomes, $5 qonto created_at, $6 payloads (text)
-- Returns the events not seen before: a duplicate delivery or a duplicate Qonto event is a no-op.
INSERT INTO events (connection_id, event_id, topic, outcome, qonto_created_at, payload)
SELECT c, e, t, o, q, p::jsonb
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
     AS x(c, e, t, o, q, p)
ON CONFLICT (connection_id, event_id) DO NOTHING
RETURNING connection_id, event_id;

-- name: count_events
-- params: (none)
SELECT count(*) FROM events;

-- name: set_event_outcomes
-- params: $1 connection ids, $2 event ids, $3 outcomes
UPDATE events ev SET outcome = x.o
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS x(c, e, o)
WHERE ev.connection_id = x.c AND ev.event_id = x.e;

-- name: upsert_resources
-- params: $1 connection ids, $2 sources, $3 resource ids, $4 updated_at (NULL when unknown),
--         $5 each snapshot's complete attachment list as a JSON array (NULL when it has none)
-- Records each resource's newest snapshot and what it says of its files; returns the ones applied
-- (an older snapshot is stale).
INSERT INTO resources (connection_id, source, resource_id, updated_at, attachment_ids)
SELECT c, s, r, u, CASE WHEN l IS NULL THEN NULL
                        ELSE ARRAY(SELECT jsonb_array_elements_text(l::jsonb)) END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[]) AS x(c, s, r, u, l)
ON CONFLICT (connection_id, source, resource_id) DO UPDATE
    SET updated_at = EXCLUDED.updated_at, attachment_ids = EXCLUDED.attachment_ids
WHERE resources.updated_at IS NULL OR EXCLUDED.updated_at IS NULL
   OR EXCLUDED.updated_at >= resources.updated_at
RETURNING connection_id, source, resource_id;

-- name: insert_documents
-- params: $1 connection ids, $2 sources, $3 resource ids, $4 attachment ids, $5 directions,
--         $6 document dates, $7 counterparties, $8 amounts, $9 currencies, $10 Qonto file names,
-- One pending document per connection and attachment; one skipped as deleted comes back if listed again.
INSERT INTO documents (connection_id, source, qonto_resource_id, qonto_attachment_id, direction,
                       document_date, counterparty, amount, currency, qonto_file_name)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::date[],
                     $7::text[], $8::text[], $9::text[], $10::text[])
ON CONFLICT (connection_id, qonto_attachment_id) DO UPDATE
    SET state = 'pending', reason = NULL, reason_code = NULL, reason_detail = NULL, updated_at = now()
    WHERE documents.state = 'skipped' AND documents.reason_code = 'deleted'
RETURNING id;

-- name: insert_named_documents
-- params: $1 connection ids, $2 sources, $3 resource ids, $4 attachment ids, $5 directions,
--         $6 document dates, $7 counterparties, $8 amounts, $9 currencies, $10 Qonto file names,
--         $11 the "deleted before sync" reason (shown), $12 its code
-- Files only older snapshots named (the newest one won, in the batch or before it): each is listed
-- once, pending unless the newest snapshot of its resource lists its files and leaves it out
-- (skipped, deleted before sync). A document that exists keeps its state. Returns their states.
INSERT INTO documents (connection_id, source, qonto_resource_id, qonto_attachment_id, direction,
                       document_date, counterparty, amount, currency, qonto_file_name, state, reason,
                       reason_code)
SELECT x.c, x.s, x.r, x.a, x.d, x.dd, x.cp, x.am, x.cu, x.fn,
       CASE WHEN g.gone THEN 'skipped' ELSE 'pending' END,
       CASE WHEN g.gone THEN $11 END,
       CASE WHEN g.gone THEN $12 END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::date[], $7::text[],
            $8::text[], $9::text[], $10::text[]) AS x(c, s, r, a, d, dd, cp, am, cu, fn)
LEFT JOIN resources res ON res.connection_id = x.c AND res.source = x.s AND res.resource_id = x.r
CROSS JOIN LATERAL (SELECT coalesce(NOT (x.a = ANY (res.attachment_ids)), false) AS gone) AS g
ON CONFLICT (connection_id, qonto_attachment_id) DO NOTHING
RETURNING state;

-- name: skip_removed_attachments
-- params: $1 connection ids, $2 sources, $3 resource ids (the applied complete snapshots),
--         $4 connection ids, $5 attachment ids (what they still list), $6 the reason (shown),
--         $7 its code
-- Written as joins (index on connection, source, resource) and an anti-join: a NOT IN over the
-- kept list degrades to a per-row scan under a generic prepared plan.
UPDATE documents d SET state = 'skipped', reason = $6, reason_code = $7, reason_detail = NULL,
       updated_at = now()
FROM (
    SELECT x.id
    FROM unnest($1::uuid[], $2::text[], $3::text[]) AS r(connection_id, source, resource_id)
    JOIN documents x ON x.connection_id = r.connection_id AND x.source = r.source
                    AND x.qonto_resource_id = r.resource_id AND x.state = 'pending'
    LEFT JOIN unnest($4::uuid[], $5::text[]) AS k(connection_id, attachment_id)
           ON k.connection_id = x.connection_id AND k.attachment_id = x.qonto_attachment_id
    WHERE k.attachment_id IS NULL
) AS gone
WHERE d.id = gone.id
  AND d.state = 'pending';  -- rechecked on the row itself: a flush may have claimed it meanwhile

-- name: revoke_connection
-- params: $1 connection_id, $2 reason
UPDATE connections SET state = 'revoked', state_reason = $2, refused_by = '{}', updated_at = now()
WHERE id = $1 AND state <> 'revoked';

-- ============================================================================ scan

-- name: advance_scan_watermark
-- params: $1 connection_id, $2 source, $3 scanned up to (never moves backwards)
UPDATE connections SET
    supplier_invoices_scanned_to = CASE WHEN $2 = 'supplier_invoice'
        THEN greatest(supplier_invoices_scanned_to, $3) ELSE supplier_invoices_scanned_to END,
    client_invoices_scanned_to = CASE WHEN $2 = 'client_invoice'
        THEN greatest(client_invoices_scanned_to, $3) ELSE client_invoices_scanned_to END,
    transactions_scanned_to = CASE WHEN $2 = 'transaction'
        THEN greatest(transactions_scanned_to, $3) ELSE transactions_scanned_to END,
    updated_at = now()
WHERE id = $1;

-- ============================================================================ flush

-- name: claim_documents
-- params: $1 connection_id, $2 worker, $3 how many, $4 the run's cut-off
-- Several flush workers share a night: each takes documents no one else holds. A document that went
-- back to pending during this run (updated after the cut-off) waits for the next run.
UPDATE documents SET state = 'uploading', claimed_by = $2, attempts = attempts + 1, updated_at = now()
WHERE id IN (
    SELECT id FROM documents WHERE connection_id = $1 AND state = 'pending' AND updated_at < $4
    ORDER BY id FOR UPDATE SKIP LOCKED LIMIT $3
)
RETURNING *;

-- name: held_documents
-- params: $1 connection_id, $2 worker, $3 document ids this run has had in hand, $4 how many
-- After a claim that failed with the database, whose commit may have gone through all the same:
-- what this worker holds without knowing it, taken into the run before any new claim.
SELECT * FROM documents
WHERE connection_id = $1 AND state = 'uploading' AND claimed_by = $2 AND NOT (id = ANY($3::bigint[]))
ORDER BY id LIMIT $4;

-- name: finish_document
-- params: $1 document id, $2 state, $3 reason (shown), $4 the worker holding it, $5 reason code,
--         $6 what qualifies the code (a file kind, a refuser)
UPDATE documents SET state = $2, reason = $3, reason_code = $5, reason_detail = $6, claimed_by = NULL,
       updated_at = now()
WHERE id = $1 AND state = 'uploading' AND claimed_by = $4;

-- name: claim_dossier_content
-- params: $1 domain, $2 dossier, $3 sha256, $4 document id, $5 size, $6 content type (detected),
--         $7 file name for Loop
-- One statement: the document takes the content for the dossier and records its file. A holder
-- whose copy never reached Loop (pending, skipped, failed) gives the content up; one uploaded, in
-- doubt or being sent keeps it. Returns the holder and its state (no row when a concurrent
-- transaction took it: read it again with dossier_content_holder).
WITH claim AS (
    INSERT INTO dossier_contents (cegid_domain, cegid_dossier, sha256, document_id)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (cegid_domain, cegid_dossier, sha256) DO UPDATE SET document_id = EXCLUDED.document_id
    WHERE NOT EXISTS (
        SELECT 1 FROM documents h WHERE h.id = dossier_contents.document_id
                                    AND h.state IN ('uploaded', 'in_doubt', 'uploading'))
    RETURNING document_id
), file AS (
    UPDATE documents SET sha256 = $3, size_bytes = $5, content_type = $6, file_name = $7,
           sending_at = now(), updated_at = now()
    WHERE id = $4
)
SELECT h.id, h.state FROM documents h
WHERE h.id = coalesce(
    (SELECT document_id FROM claim),
    (SELECT document_id FROM dossier_contents
     WHERE cegid_domain = $1 AND cegid_dossier = $2 AND sha256 = $3)
);

-- name: dossier_content_holder
-- params: $1 domain, $2 dossier, $3 sha256
SELECT h.id, h.state FROM dossier_contents c JOIN documents h ON h.id = c.document_id
WHERE c.cegid_domain = $1 AND c.cegid_dossier = $2 AND c.sha256 = $3;

-- name: release_dossier_content
-- params: $1 document id (its content is not in Loop: another copy may be sent)
DELETE FROM dossier_contents WHERE document_id = $1;

-- name: start_upload
-- params: $1 document id, $2 worker
-- Committed before the first byte is sent: its existence means the request may have gone out.
-- Only while this worker still holds the document, locked against a concurrent recovery (which
-- settles it under the same lock): no row returned means someone else owns it now, do not send.
-- An attempt of this worker still 'sending' here was never sent: its insert committed but the
-- answer was lost with the database, so the worker never had its id (it sends only with one).
WITH mine AS (
    SELECT id FROM documents WHERE id = $1 AND state = 'uploading' AND claimed_by = $2 FOR UPDATE
), unsent AS (
    UPDATE uploads SET outcome = 'retry', finished_at = now(),
           error = 'never sent: the database was lost before the attempt was confirmed'
    WHERE document_id IN (SELECT id FROM mine) AND worker = $2 AND outcome = 'sending'
)
INSERT INTO uploads (document_id, worker) SELECT id, $2 FROM mine RETURNING id;

-- name: finish_upload
-- params: $1 upload id, $2 outcome, $3 HTTP status, $4 Cegid's answer (jsonb), $5 error
UPDATE uploads SET outcome = $2, http_status = $3, cegid_answer = $4, error = $5, finished_at = now()
WHERE id = $1;

-- name: mark_uploaded
-- params: $1 document id, $2 Cegid document id (when the answer has one), $3 worker,
--         $4 upload id, $5 HTTP status, $6 Cegid's answer (jsonb)
-- One statement (atomic): the attempt's outcome and the document's state.
WITH attempt AS (
    UPDATE uploads SET outcome = 'uploaded', http_status = $5, cegid_answer = $6, finished_at = now()
    WHERE id = $4
)
-- A document a recovery settled as in doubt meanwhile (this worker was taken for dead) is
-- uploaded all the same: Loop's 2xx to this very attempt says so.
UPDATE documents SET state = 'uploaded', reason = NULL, reason_code = NULL, reason_detail = NULL,
       cegid_document_id = $2, uploaded_at = now(), claimed_by = NULL, updated_at = now()
WHERE id = $1 AND ((state = 'uploading' AND claimed_by = $3) OR state = 'in_doubt');

-- name: set_first_upload
-- params: $1 connection_id
UPDATE connections SET first_upload_at = now(), updated_at = now()
WHERE id = $1 AND first_upload_at IS NULL;

-- name: try_worker_lock
-- params: $1 lock namespace, $2 worker id
-- Session-level: a flush worker holds it for its whole run; free means the worker is gone.
SELECT pg_try_advisory_lock($1, $2);

-- name: worker_lock_held
-- params: $1 lock namespace, $2 worker id
-- Whether this session still holds the worker's lock (two-key advisory locks: classid, objid, 2).
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
      AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2
);

-- name: worker_unlock
-- params: $1 lock namespace, $2 worker id
SELECT pg_advisory_unlock($1, $2);

-- name: uploading_workers
-- params: (none)
SELECT DISTINCT claimed_by FROM documents WHERE state = 'uploading' AND claimed_by IS NOT NULL;

-- name: orphaned_documents
-- params: $1 worker (whose advisory lock is free: it died)
-- Locks them first; their attempts are read by the next statement (orphaned_attempts), whose fresh
-- snapshot sees an attempt committed while this one waited for a lock.
SELECT id, connection_id FROM documents WHERE state = 'uploading' AND claimed_by = $1 FOR UPDATE;

-- name: orphaned_attempts
-- params: $1 document ids (locked by orphaned_documents)
-- The attempt that may have gone out, per document; a document without one provably never left.
SELECT DISTINCT ON (document_id) document_id, id AS upload_id
FROM uploads WHERE document_id = ANY($1::bigint[]) AND outcome = 'sending'
ORDER BY document_id, id DESC;

-- name: resolve_document
-- params: $1 document id, $2 new state, $3 reason (shown), $4 its code
UPDATE documents SET state = $2, reason = $3, reason_code = $4, reason_detail = NULL, updated_at = now(),
       uploaded_at = CASE WHEN $2 = 'uploaded' THEN now() ELSE uploaded_at END
WHERE id = $1 AND state = 'in_doubt'
RETURNING *;

-- ============================================================================ runs

-- name: claim_scheduled_run
-- params: $1 day
-- The run of a day is inserted once, whatever the number of schedulers; NULL when it already exists.
INSERT INTO runs (kind, scheduled_for) VALUES ('scheduled', $1)
ON CONFLICT (kind, scheduled_for) DO NOTHING
RETURNING id;

-- name: get_scheduled_run
-- params: $1 day
SELECT id, started_at, finished_at FROM runs WHERE kind = 'scheduled' AND scheduled_for = $1;

-- name: try_scheduler_lock
-- params: $1 lock namespace, $2 lock key
-- Session-level: held for the whole scheduled run, released when the scheduler's connection dies.
SELECT pg_try_advisory_lock($1, $2);

-- name: scheduler_unlock
-- params: $1 lock namespace, $2 lock key
SELECT pg_advisory_unlock($1, $2);

-- name: insert_manual_run
-- params: (none)
INSERT INTO runs (kind) VALUES ('manual') RETURNING id;

-- name: database_now
-- params: (none)
SELECT clock_timestamp();

-- name: previous_run_start
-- params: $1 this run's id
SELECT max(started_at) FROM runs WHERE id < $1;

-- name: skipped_since
-- params: $1 connection_id, $2 since
-- Skipped documents since the previous run, whether the flush or the consumer skipped them.
SELECT reason_code, reason_detail, count(*) AS n FROM documents
WHERE connection_id = $1 AND state = 'skipped' AND updated_at >= $2
GROUP BY reason_code, reason_detail;

-- name: finish_run
-- params: $1 run id, $2 report (jsonb)
UPDATE runs SET finished_at = now(), report = $2 WHERE id = $1;

-- ============================================================================ reconnection, start-up checks

-- name: reconnect_connection
-- params: $1 connection_id, $2 state (the check's outcome: active or needs_attention), $3 state_reason,
--         $4 refused_by (text[])
-- `connections reconnect` after its check: the state from the outcome, and the clock of the advice
-- about the client's folder in Loop restarts. A revocation made meanwhile is never undone.
UPDATE connections SET state = $2, state_reason = $3, refused_by = $4::text[], connected_at = now(),
       updated_at = now()
WHERE id = $1 AND state <> 'revoked'
RETURNING *;

-- name: folder_facts
-- params: $1 connection_id
-- When the connection was (re)connected, and the first deposit Loop accepted since then.
SELECT c.connected_at,
       (SELECT min(d.uploaded_at) FROM documents d
        WHERE d.connection_id = c.id AND d.state = 'uploaded' AND d.uploaded_at >= c.connected_at)
       AS first_deposit_at
FROM connections c WHERE c.id = $1;

-- name: applied_migrations
-- params: (none)
SELECT version FROM schema_migrations;

-- ============================================================================ heartbeats, relay status

-- name: heartbeat
-- params: $1 id, $2 role, $3 command, $4 host, $5 pid, $6 seconds since start, $7 interval_s,
--         $8 work_unit, $9 work_done, $10 seconds since the last work (NULL: none yet),
--         $11 subscribed, $12 in_hand, $13 oldest held x-received-at-ms, $14 seconds waiting,
--         $15 stop reason (NULL while running)
-- One beat: the row is created by the first beat that reaches PostgreSQL (its start time kept),
-- and every field is rewritten by the next ones. Ages are given in seconds and turned into times of
-- the database's clock, so hosts whose clocks differ still compare.
INSERT INTO heartbeats (id, role, command, host, pid, started_at, beat_at, interval_s, work_unit,
                        work_done, last_work_at, subscribed, in_hand, oldest_held_at,
                        waiting_since, stopped_at, stop_reason)
VALUES ($1, $2, $3, $4, $5, now() - make_interval(secs => $6), now(), $7, $8, $9,
        now() - make_interval(secs => $10), $11, $12, to_timestamp($13::bigint / 1000.0),
        now() - make_interval(secs => $14), CASE WHEN $15::text IS NULL THEN NULL ELSE now() END,
        $15)
ON CONFLICT (id) DO UPDATE SET
    beat_at = now(), interval_s = EXCLUDED.interval_s, work_done = EXCLUDED.work_done,
    last_work_at = EXCLUDED.last_work_at, subscribed = EXCLUDED.subscribed,
    in_hand = EXCLUDED.in_hand, oldest_held_at = EXCLUDED.oldest_held_at,
    waiting_since = EXCLUDED.waiting_since, stopped_at = EXCLUDED.stopped_at,
    stop_reason = EXCLUDED.stop_reason;

-- name: prune_heartbeats
-- params: $1 seconds
-- Rows of roles stopped or dead for that long (a running role beats every few seconds).
DELETE FROM heartbeats WHERE beat_at < now() - make_interval(secs => $1);

-- name: list_heartbeats
-- params: $1 seconds (rows whose last beat is older are left out)
-- Ages in seconds on the database's clock.
SELECT id, role, command, host, pid, started_at, beat_at, interval_s, stopped_at, stop_reason,
       work_unit, work_done, last_work_at, subscribed, in_hand, oldest_held_at,
       extract(epoch FROM now() - beat_at)::float8 AS beat_age_s,
       extract(epoch FROM now() - last_work_at)::float8 AS work_age_s,
       extract(epoch FROM now() - oldest_held_at)::float8 AS oldest_held_age_s,
       extract(epoch FROM now() - waiting_since)::float8 AS waiting_s
FROM heartbeats
WHERE beat_at >= now() - make_interval(secs => $1)
ORDER BY role, host, started_at, pid;
-- ============================================================================ setup pages

-- name: insert_invitation
-- params: $1 id, $2 token_hash, $3 client_name, $4 expires_at
INSERT INTO invitations (id, token_hash, client_name, expires_at)
VALUES ($1, $2, $3, $4)
RETURNING *;

-- name: get_invitation_by_token
-- params: $1 token_hash
SELECT * FROM invitations WHERE token_hash = $1;

-- name: get_invitation
-- params: $1 id
SELECT * FROM invitations WHERE id = $1;

-- name: list_invitations
-- params: (none)
SELECT * FROM invitations ORDER BY created_at, id;

-- name: set_invitation_qonto
-- params: $1 id, $2 qonto_organization_id, $3 qonto_organization_name, $4 qonto_role,
--         $5 qonto_plan, $6 qonto_tokens (sealed)
-- A consent by an eligible member; clears a refusal shown on the Qonto step.
UPDATE invitations SET qonto_organization_id = $2, qonto_organization_name = $3, qonto_role = $4,
    qonto_plan = $5, qonto_tokens = $6, qonto_connected_at = now(),
    problem_step = CASE WHEN problem_step = 'qonto' THEN NULL ELSE problem_step END,
    problem = CASE WHEN problem_step = 'qonto' THEN NULL ELSE problem END,
    updated_at = now()
WHERE id = $1 AND used_at IS NULL AND expires_at > now()
RETURNING *;

-- name: set_invitation_qonto_tokens
-- params: $1 id, $2 qonto_tokens (sealed)
-- Tokens Qonto rotated while the setup used them (the old refresh token dies 60 s later).
UPDATE invitations SET qonto_tokens = $2, updated_at = now()
WHERE id = $1 AND used_at IS NULL;

-- name: forget_invitation_qonto
-- params: $1 id, $2 problem
-- Qonto refused the stored consent at Create: the member connects again (the refusal is shown).
UPDATE invitations SET qonto_organization_id = NULL, qonto_organization_name = NULL,
    qonto_role = NULL, qonto_plan = NULL, qonto_tokens = NULL, qonto_connected_at = NULL,
    problem_step = 'qonto', problem = $2, updated_at = now()
WHERE id = $1 AND used_at IS NULL;

-- name: set_invitation_cegid_credentials
-- params: $1 id, $2 cegid_credentials (sealed)
UPDATE invitations SET cegid_credentials = $2,
    problem_step = CASE WHEN problem_step = 'key' THEN NULL ELSE problem_step END,
    problem = CASE WHEN problem_step = 'key' THEN NULL ELSE problem END,
    updated_at = now()
WHERE id = $1 AND used_at IS NULL AND expires_at > now();

-- name: set_invitation_dossier
-- params: $1 id, $2 cegid_dossier, $3 cegid_domain
UPDATE invitations SET cegid_dossier = $2, cegid_domain = $3,
    problem_step = CASE WHEN problem_step = 'dossier' THEN NULL ELSE problem_step END,
    problem = CASE WHEN problem_step = 'dossier' THEN NULL ELSE problem END,
    updated_at = now()
WHERE id = $1 AND used_at IS NULL AND expires_at > now();

-- name: set_invitation_problem
-- params: $1 id, $2 problem_step, $3 problem (NULL clears)
UPDATE invitations SET problem_step = $2, problem = $3, updated_at = now()
WHERE id = $1 AND used_at IS NULL;

-- name: use_invitation
-- params: $1 id, $2 connection_id
-- In the transaction that stores the connection: no row means another Create won, or it expired.
UPDATE invitations SET used_at = now(), connection_id = $2, problem_step = NULL, problem = NULL,
    qonto_tokens = NULL, cegid_credentials = NULL, updated_at = now()
WHERE id = $1 AND used_at IS NULL AND expires_at > now()
RETURNING id;

-- name: insert_web_session
-- params: $1 id_hash, $2 data, $3 expires_at
INSERT INTO web_sessions (id_hash, data, expires_at) VALUES ($1, $2, $3);

-- name: get_web_session
-- params: $1 id_hash, $2 expires_at (extended to), $3 absolute limit (created_at must be after it)
-- A live session, its expiry pushed back (sliding, within the absolute limit).
UPDATE web_sessions SET expires_at = $2
WHERE id_hash = $1 AND expires_at > now() AND created_at > $3
RETURNING data, created_at, expires_at;

-- name: set_web_session_data
-- params: $1 id_hash, $2 data
UPDATE web_sessions SET data = $2 WHERE id_hash = $1;

-- name: delete_web_session
-- params: $1 id_hash
DELETE FROM web_sessions WHERE id_hash = $1;

-- name: delete_expired_web_sessions
-- params: (none)
DELETE FROM web_sessions WHERE expires_at < now();

-- name: insert_oauth_state
-- params: $1 state_hash, $2 invitation_id, $3 session_hash, $4 expires_at
INSERT INTO oauth_states (state_hash, invitation_id, session_hash, expires_at)
VALUES ($1, $2, $3, $4);

-- name: use_oauth_state
-- params: $1 state_hash
-- A state is good once: the row comes back with used_at as it was before this call.
UPDATE oauth_states s SET used_at = now()
FROM (SELECT state_hash, used_at FROM oauth_states WHERE state_hash = $1 FOR UPDATE) AS old
WHERE s.state_hash = old.state_hash
RETURNING s.invitation_id, s.session_hash, s.expires_at, old.used_at AS used_before;

-- name: delete_old_oauth_states
-- params: (none)
DELETE FROM oauth_states WHERE expires_at < now() - interval '1 day';

-- name: hit_rate_limit
-- params: $1 bucket, $2 window_start
INSERT INTO web_rate_limits (bucket, window_start, hits) VALUES ($1, $2, 1)
ON CONFLICT (bucket, window_start) DO UPDATE SET hits = web_rate_limits.hits + 1
RETURNING hits;

-- name: rate_limit_hits
-- params: $1 bucket, $2 window_start
SELECT COALESCE((SELECT hits FROM web_rate_limits WHERE bucket = $1 AND window_start = $2), 0);

-- name: delete_old_rate_limits
-- params: $1 before
DELETE FROM web_rate_limits WHERE window_start < $1;

-- ============================================================================ key rotation

-- name: rotation_connections
-- params: $1 after id (uuid), $2 batch size
SELECT id, qonto_credentials, cegid_credentials FROM connections
WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE;

-- name: rotation_update_connection
-- params: $1 id, $2 qonto_credentials (sealed), $3 cegid_credentials (sealed)
UPDATE connections SET qonto_credentials = $2, cegid_credentials = $3 WHERE id = $1;

-- name: rotation_webhook_secrets
-- params: $1 after id, $2 batch size
SELECT id, secret FROM webhook_secrets WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE;

-- name: rotation_update_webhook_secret
-- params: $1 id, $2 secret (sealed)
UPDATE webhook_secrets SET secret = $2 WHERE id = $1;

-- name: rotation_invitations
-- params: $1 after id (uuid), $2 batch size
SELECT id, qonto_tokens, cegid_credentials FROM invitations
WHERE id > $1 AND (qonto_tokens IS NOT NULL OR cegid_credentials IS NOT NULL)
ORDER BY id LIMIT $2 FOR UPDATE;

-- name: rotation_update_invitation
-- params: $1 id, $2 qonto_tokens (sealed or NULL), $3 cegid_credentials (sealed or NULL)
UPDATE invitations SET qonto_tokens = $2, cegid_credentials = $3 WHERE id = $1;

-- ============================================================================ flush requests

-- name: insert_flush_request
-- params: $1 connection_id (or NULL: every connection), $2 since (or NULL), $3 requested_by
INSERT INTO flush_requests (connection_id, since, requested_by) VALUES ($1, $2, $3)
RETURNING *;

-- name: get_flush_request
-- params: $1 id
SELECT * FROM flush_requests WHERE id = $1;

-- name: next_flush_request
-- params: (none)
-- Taken under the scheduler's lock: an open request already started belongs to a scheduler that
-- died during its run (the lock went with it), and is run again.
SELECT * FROM flush_requests WHERE finished_at IS NULL ORDER BY id LIMIT 1;

-- name: any_open_flush_request
-- params: (none)
SELECT EXISTS (SELECT 1 FROM flush_requests WHERE finished_at IS NULL);

-- name: start_flush_requests
-- params: $1 request id, $2 run id
-- The request, and every open request asking for the same thing, are served by this run.
UPDATE flush_requests r SET started_at = now(), run_id = $2
FROM flush_requests first
WHERE first.id = $1 AND r.finished_at IS NULL
  AND (r.id = first.id OR (r.connection_id IS NOT DISTINCT FROM first.connection_id
                           AND r.since IS NOT DISTINCT FROM first.since))
RETURNING r.id;

-- name: finish_flush_requests
-- params: $1 run id, $2 outcome (finished, failed), $3 error (or NULL)
UPDATE flush_requests SET finished_at = now(), outcome = $2, error = $3
WHERE run_id = $1 AND finished_at IS NULL;

-- name: list_open_flush_requests
-- params: (none)
SELECT * FROM flush_requests WHERE finished_at IS NULL ORDER BY id;

-- ============================================================================ audit

-- name: insert_audit
-- params: $1 who, $2 action, $3 target_kind, $4 target, $5 outcome, $6 detail
INSERT INTO audit_log (who, action, target_kind, target, outcome, detail)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING *;

-- name: audit_for_target
-- params: $1 target_kind, $2 target (or NULL: every target of that kind), $3 limit
SELECT * FROM audit_log
WHERE target_kind = $1 AND ($2::text IS NULL OR target = $2)
ORDER BY id DESC LIMIT $3;

-- ============================================================================ console (reads)

-- name: console_connections
-- params: (none)
-- Every connection with its last deposit and its first deposit since the (re)connection (the
-- folder advice); each read by index, never by walking the documents.
SELECT c.*,
       (SELECT max(d.uploaded_at) FROM documents d
        WHERE d.connection_id = c.id AND d.state = 'uploaded') AS last_deposit_at,
       (SELECT min(d.uploaded_at) FROM documents d
        WHERE d.connection_id = c.id AND d.state = 'uploaded' AND d.uploaded_at >= c.connected_at)
       AS first_deposit_at
FROM connections c ORDER BY c.client_name, c.id;

-- name: console_connection
-- params: $1 connection_id
SELECT c.*,
       (SELECT max(d.uploaded_at) FROM documents d
        WHERE d.connection_id = c.id AND d.state = 'uploaded') AS last_deposit_at,
       (SELECT min(d.uploaded_at) FROM documents d
        WHERE d.connection_id = c.id AND d.state = 'uploaded' AND d.uploaded_at >= c.connected_at)
       AS first_deposit_at
FROM connections c WHERE c.id = $1;

-- name: console_documents_page
-- params: $1 connection_id, $2 state (or NULL), $3 source (or NULL), $4 file name pattern for ILIKE (or NULL), $5 below this id (or NULL), $6 limit
-- One page of a connection's documents, newest first, by keyset; with the last attempt's answer.
-- The connection is bounded on both sides rather than compared with =, so that (connection_id, id)
-- stays the sort key: only the connection's own index gives that order, and it is walked from the
-- keyset down (the primary key, walked from the newest id, would read other clients' documents
-- first, as many as sit above the page).
SELECT d.*, u.http_status AS last_http_status, u.cegid_answer AS last_cegid_answer,
       u.error AS last_error
FROM (
    SELECT * FROM documents
    WHERE connection_id >= $1 AND connection_id <= $1
      AND id < coalesce($5::bigint, 9223372036854775807)
      AND ($2::text IS NULL OR state = $2)
      AND ($3::text IS NULL OR source = $3)
      AND ($4::text IS NULL OR coalesce(file_name, qonto_file_name, '') ILIKE $4)
    ORDER BY connection_id DESC, id DESC LIMIT $6
) d
LEFT JOIN LATERAL (
    SELECT http_status, cegid_answer, error FROM uploads
    WHERE document_id = d.id ORDER BY id DESC LIMIT 1
) u ON true
ORDER BY d.id DESC;

-- name: retry_document
-- params: $1 document id, $2 reason (shown), $3 its code
-- A failed document goes back to pending (an operator fixed the cause); NULL when it is not failed.
UPDATE documents SET state = 'pending', reason = $2, reason_code = $3, reason_detail = NULL,
       claimed_by = NULL, updated_at = now()
WHERE id = $1 AND state = 'failed'
RETURNING *;

-- name: console_runs
-- params: $1 below this run id (or NULL), $2 limit
-- Runs newest first, with their totals (not their whole reports) and the request that asked for one.
SELECT r.id, r.kind, r.scheduled_for, r.started_at, r.finished_at,
       r.report -> 'totals' AS totals, (r.report ->> 'exit_code')::int AS exit_code,
       jsonb_array_length(coalesce(r.report -> 'connections', '[]'::jsonb)) AS connection_count,
       (SELECT min(f.requested_by) FROM flush_requests f WHERE f.run_id = r.id) AS requested_by
FROM runs r
WHERE ($1::bigint IS NULL OR r.id < $1)
ORDER BY r.id DESC LIMIT $2;

-- name: console_run
-- params: $1 run id
SELECT r.*, (SELECT min(f.requested_by) FROM flush_requests f WHERE f.run_id = r.id) AS requested_by
FROM runs r WHERE r.id = $1;

-- name: last_scheduled_run
-- params: (none)
SELECT * FROM runs WHERE kind = 'scheduled' ORDER BY scheduled_for DESC NULLS LAST, id DESC LIMIT 1;

-- name: revoke_invitation
-- params: $1 invitation id
-- The console's Revoke: an open invitation expires now (its link stops working); NULL otherwise.
UPDATE invitations SET expires_at = now(), updated_at = now()
WHERE id = $1 AND used_at IS NULL AND expires_at > now()
RETURNING client_name;
