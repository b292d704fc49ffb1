-- A flush request outlives its connection: deleting the connection used to delete the request with
-- it (lost, and `GET /admin/flush/{id}` said 404). Without the foreign key the request stays, and
-- the scheduler fails it with the reason (no such connection).
ALTER TABLE flush_requests DROP CONSTRAINT flush_requests_connection_id_fkey;
