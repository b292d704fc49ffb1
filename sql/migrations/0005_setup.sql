-- Setting up a client in the browser (the setup pages): invitations, browser sessions, OAuth states,
-- and counters that rate-limit guesses. No token is stored in clear: setup tokens, session ids and
-- OAuth states are kept as their SHA-256; the secrets typed or obtained during the setup (Qonto
-- tokens, the Loop API key and secret) are sealed with RELAY_SECRET_KEY, like a connection's.

CREATE TABLE invitations (
    id                      uuid PRIMARY KEY,
    token_hash              bytea NOT NULL UNIQUE,   -- sha256 of the setup link's token
    client_name             text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    expires_at              timestamptz NOT NULL,
    used_at                 timestamptz,             -- set when Create stored the connection
    connection_id           uuid REFERENCES connections (id) ON DELETE SET NULL,
    -- the Qonto step, after a consent by an eligible member
    qonto_organization_id   text,
    qonto_organization_name text,
    qonto_role              text,
    qonto_plan              text,                    -- NULL: Qonto named no plan (not verified)
    qonto_tokens            bytea,                   -- sealed OAuth tokens
    qonto_connected_at      timestamptz,
    -- the accountant's steps
    cegid_credentials       bytea,                   -- sealed {"api_key", "api_secret"}
    cegid_dossier           text,
    cegid_domain            text,
    -- a refusal at Create, shown on the step it belongs to until that step is submitted again
    problem_step            text,
    problem                 text,
    updated_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE web_sessions (
    id_hash     bytea PRIMARY KEY,                   -- sha256 of the cookie's random id
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);

CREATE TABLE oauth_states (
    state_hash     bytea PRIMARY KEY,                -- sha256 of the state sent to Qonto
    invitation_id  uuid NOT NULL REFERENCES invitations (id) ON DELETE CASCADE,
    session_hash   bytea NOT NULL,                   -- the browser that started the consent
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz
);

CREATE TABLE web_rate_limits (
    bucket        text NOT NULL,
    window_start  timestamptz NOT NULL,
    hits          integer NOT NULL,
    PRIMARY KEY (bucket, window_start)
);
