-- When the connection was last (re)connected: set when `connections add` stores it (the default) and
-- by `connections reconnect`. The advice about the client's folder in Loop counts from it.
ALTER TABLE connections ADD COLUMN connected_at timestamptz NOT NULL DEFAULT now();
UPDATE connections SET connected_at = created_at;
