-- One row per running role (a `relay serve` worker, `relay consume`, `relay scheduler`,
-- `relay flush --now`, and each of the three roles of `relay run`), rewritten at every heartbeat.
-- `relay status` reads it: a row whose heartbeat is stale while it is not stopped is a role that
-- stopped working without saying so. Times are the database's clock (`now()` at each beat), except
-- `oldest_held_at`, the intake's `x-received-at-ms` of the oldest message a consumer holds.
CREATE TABLE heartbeats (
    id              uuid PRIMARY KEY,            -- one per role instance, drawn at its start
    role            text NOT NULL CHECK (role IN ('serve', 'consume', 'scheduler', 'flush')),
    command         text NOT NULL,               -- the relay command running it (`run` holds three)
    host            text NOT NULL,               -- socket.gethostname() (a container's id)
    pid             integer NOT NULL,
    started_at      timestamptz NOT NULL,
    beat_at         timestamptz NOT NULL,
    interval_s      real NOT NULL,               -- the beat the role promised
    stopped_at      timestamptz,                 -- set by a clean stop (or a role that failed)
    stop_reason     text,
    work_unit       text NOT NULL,               -- webhooks (accepted), events (settled), documents (uploaded)
    work_done       bigint NOT NULL DEFAULT 0,
    last_work_at    timestamptz,
    -- the consumer's side (NULL for the other roles)
    subscribed      boolean,                     -- a consume-ok in force on the events queue
    in_hand         integer,                     -- messages delivered, not yet settled
    oldest_held_at  timestamptz,
    waiting_since   timestamptz                  -- holding messages (or unsubscribed) without settling any since
);
CREATE INDEX heartbeats_beat_at ON heartbeats (beat_at);
