-- What the newest snapshot of each resource says of its files: its complete list of attachment ids,
-- or NULL when that snapshot carried none (it says nothing of the files it does not name). A file
-- that only an older snapshot names, applied later or in the same batch, is listed against it:
-- skipped as deleted when the list leaves it out, pending otherwise. Rows recorded before this
-- version are NULL: unknown.
ALTER TABLE resources ALTER COLUMN attachment_ids DROP NOT NULL,
                      ALTER COLUMN attachment_ids DROP DEFAULT;
UPDATE resources SET attachment_ids = NULL;
