-- The operators' console: flush runs asked for over HTTP (the scheduler runs them), and the audit of
-- every change an operator made in a browser. Plus the indexes its pages read documents by.

-- A flush asked for (`POST /admin/flush`, the console's Flush now). The HTTP process only records it;
-- a scheduler picks it up under its lock, runs it as a manual run and links the run here.
CREATE TABLE flush_requests (
    id              bigserial PRIMARY KEY,
    connection_id   uuid REFERENCES connections (id) ON DELETE CASCADE,  -- NULL: every connection
    since           timestamptz,                                        -- the scan's start, when given
    requested_by    text NOT NULL,                                      -- "admin API", "console"
    requested_at    timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,                                        -- picked by a scheduler
    run_id          bigint REFERENCES runs (id) ON DELETE SET NULL,
    finished_at     timestamptz,
    outcome         text CHECK (outcome IN ('finished', 'failed')),
    error           text
);
CREATE INDEX flush_requests_open ON flush_requests (id) WHERE finished_at IS NULL;

CREATE FUNCTION notify_flush_requested() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_flush_requested', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER flush_requested AFTER INSERT ON flush_requests
    FOR EACH STATEMENT EXECUTE FUNCTION notify_flush_requested();

-- Every state change made in the console: who (the session, by a short fingerprint), what, when, and
-- the outcome. Never a secret.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    who         text NOT NULL,
    action      text NOT NULL,           -- sign_in, check_connection, resolve_document, ...
    target_kind text,                    -- connection, document, dead_letter, invitation, run
    target      text,
    outcome     text NOT NULL,           -- ok, refused, failed
    detail      text
);
CREATE INDEX audit_log_target ON audit_log (target_kind, target, id);

-- A connection's documents, newest first, by keyset (filtered by state or source, or not).
CREATE INDEX documents_connection_newest ON documents (connection_id, id);
CREATE INDEX documents_connection_state_newest ON documents (connection_id, state, id);
-- The last deposit of each connection.
CREATE INDEX documents_last_deposit ON documents (connection_id, uploaded_at) WHERE state = 'uploaded';
