-- Applying a snapshot looks up the documents of one resource: without this index that lookup scans
-- every pending document of the connection, once per batch (quadratic over a big backlog).
CREATE INDEX documents_resource ON documents (connection_id, source, qonto_resource_id);
