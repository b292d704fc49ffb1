-- The relay's ledger: connections, received events, documents, upload attempts, runs.
-- Secrets (Qonto and Cegid credentials, webhook secrets) are stored only as Fernet tokens (bytea)
-- sealed with RELAY_SECRET_KEY; nothing in this schema holds one in clear.

CREATE TABLE connections (
    id                        uuid PRIMARY KEY,
    client_name               text NOT NULL,
    qonto_organization_id     text NOT NULL,
    qonto_auth_kind           text NOT NULL CHECK (qonto_auth_kind IN ('api_key', 'oauth')),
    qonto_credentials         bytea NOT NULL,      -- sealed JSON
    cegid_credentials         bytea NOT NULL,      -- sealed JSON {"api_key", "api_secret"}
    cegid_key_fingerprint     text NOT NULL,       -- sha256 prefix of the API key: groups a firm's key
    cegid_dossier             text NOT NULL,
    cegid_domain              text NOT NULL,
    state                     text NOT NULL DEFAULT 'active'
                              CHECK (state IN ('active', 'needs_attention', 'revoked', 'disconnected')),
    state_reason              text,
    scan_since                timestamptz NOT NULL,
    transactions_scanned_to   timestamptz,
    supplier_invoices_scanned_to timestamptz,
    client_invoices_scanned_to timestamptz,
    dossier_checked_at        timestamptz,
    first_upload_at           timestamptz,
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX connections_organization ON connections (qonto_organization_id);

CREATE TABLE webhook_secrets (
    id                    bigserial PRIMARY KEY,
    connection_id         uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    secret                bytea NOT NULL,           -- sealed
    qonto_subscription_id text,
    topics                text[] NOT NULL DEFAULT '{}',
    created_at            timestamptz NOT NULL DEFAULT now(),
    revoked_at            timestamptz
);
CREATE INDEX webhook_secrets_connection ON webhook_secrets (connection_id) WHERE revoked_at IS NULL;

-- Every event ever received, unique per connection and Qonto event id: the dedupe key.
CREATE TABLE events (
    connection_id   uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    event_id        text NOT NULL,
    topic           text NOT NULL,
    outcome         text NOT NULL,               -- applied, stale, ignored_topic, revoked, ...
    qonto_created_at timestamptz,
    received_at     timestamptz NOT NULL DEFAULT now(),
    payload         jsonb NOT NULL,
    PRIMARY KEY (connection_id, event_id)
);

-- The newest snapshot applied per Qonto resource: events arrive unordered, an older one never wins.
CREATE TABLE resources (
    connection_id   uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    source          text NOT NULL CHECK (source IN ('transaction', 'supplier_invoice', 'client_invoice')),
    resource_id     text NOT NULL,
    updated_at      timestamptz,
    attachment_ids  text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (connection_id, source, resource_id)
);

CREATE TABLE documents (
    id                   bigserial PRIMARY KEY,
    connection_id        uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    source               text NOT NULL CHECK (source IN ('transaction', 'supplier_invoice', 'client_invoice')),
    qonto_resource_id    text NOT NULL,
    qonto_attachment_id  text NOT NULL,
    direction            text NOT NULL CHECK (direction IN ('PURCHASE', 'SALE')),
    state                text NOT NULL DEFAULT 'pending'
                         CHECK (state IN ('pending', 'uploading', 'uploaded', 'skipped', 'failed', 'in_doubt')),
    reason               text,
    -- what the file name is made of (no date/amount field exists on Cegid's side)
    document_date        date,
    counterparty         text,
    amount               text,
    currency             text,
    qonto_file_name      text,
    -- filled at download / upload
    file_name            text,
    content_type         text,
    size_bytes           bigint,
    sha256               text,
    attempts             integer NOT NULL DEFAULT 0,
    claimed_by           bigint,                 -- the flush worker holding it while 'uploading'
    sending_at           timestamptz,            -- set (and committed) just before the first byte
    cegid_document_id    text,
    uploaded_at          timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (connection_id, qonto_attachment_id)
);
CREATE INDEX documents_pending ON documents (connection_id, id) WHERE state = 'pending';
CREATE INDEX documents_uploading ON documents (claimed_by) WHERE state = 'uploading';
CREATE INDEX documents_state ON documents (state, connection_id);

-- Each upload attempt, its outcome and Cegid's answer.
CREATE TABLE uploads (
    id              bigserial PRIMARY KEY,
    document_id     bigint NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    worker          bigint NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    outcome         text NOT NULL DEFAULT 'sending'
                    CHECK (outcome IN ('sending', 'uploaded', 'retry', 'failed', 'in_doubt', 'access_refused')),
    http_status     integer,
    cegid_answer    jsonb,
    error           text
);
CREATE INDEX uploads_document ON uploads (document_id);

-- Content already in a dossier: the same bytes are never deposited twice into one client file.
CREATE TABLE dossier_contents (
    cegid_domain    text NOT NULL,
    cegid_dossier   text NOT NULL,
    sha256          text NOT NULL,
    document_id     bigint NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    PRIMARY KEY (cegid_domain, cegid_dossier, sha256)
);

-- Scan + flush runs; a scheduled day is claimed once, whatever the number of schedulers.
CREATE TABLE runs (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('scheduled', 'manual')),
    scheduled_for   date,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    report          jsonb,
    UNIQUE (kind, scheduled_for)
);

-- The intake caches connections and their secrets; tell it when they change.
CREATE FUNCTION notify_connections_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_connections_changed', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER connections_changed AFTER INSERT OR UPDATE OF state OR DELETE ON connections
    FOR EACH STATEMENT EXECUTE FUNCTION notify_connections_changed();
CREATE TRIGGER webhook_secrets_changed AFTER INSERT OR UPDATE OR DELETE ON webhook_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION notify_connections_changed();
