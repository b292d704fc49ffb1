-- Facts as values. Who refused a connection (Qonto, Cegid, or both when a check found both) and
-- why a document is where it is (a reason code, and the file kind of an unsupported type) become
-- columns; the prose (state_reason, reason) stays for display only. Existing rows are carried over
-- from their prose here, once: the relay never parses it again.

ALTER TABLE connections
    ADD COLUMN refused_by text[] NOT NULL DEFAULT '{}'
        CHECK (refused_by <@ ARRAY['qonto', 'cegid']::text[]);

-- A flag's reason names each side that refused, one per ';'-separated part ("Cegid: ...",
-- "Qonto: ...", "Qonto refused the credentials: ..."). Only flagged connections hold a refusal.
UPDATE connections c SET refused_by = ARRAY(
    SELECT DISTINCT lower(substring(ltrim(part) FROM '^(Qonto|Cegid)'))
    FROM unnest(string_to_array(c.state_reason, ';')) AS part
    WHERE ltrim(part) ~ '^(Qonto|Cegid)'
    ORDER BY 1
)
WHERE c.state = 'needs_attention' AND c.state_reason IS NOT NULL;

ALTER TABLE documents
    ADD COLUMN reason_code text CHECK (reason_code IN (
        'deleted', 'unsupported_type', 'too_large', 'duplicate_content', 'file_refused',
        'qonto_download_failed', 'cegid_unavailable', 'access_refused', 'copy_being_sent',
        'in_doubt', 'flush_stopped', 'flush_error', 'resend_requested', 'retry_requested',
        'confirmed_by_operator', 'other')),
    -- the value a code is qualified by: the file kind of an unsupported type, the side that
    -- refused access (qonto, cegid)
    ADD COLUMN reason_detail text;

UPDATE documents SET
    reason_code = CASE
        WHEN state = 'failed' THEN 'file_refused'
        WHEN state = 'in_doubt' THEN 'in_doubt'
        WHEN reason = 'deleted before sync' THEN 'deleted'
        WHEN reason LIKE 'unsupported type: %' THEN 'unsupported_type'
        WHEN reason LIKE 'too large%' THEN 'too_large'
        WHEN reason LIKE 'duplicate content%' THEN 'duplicate_content'
        WHEN reason LIKE 'Qonto download failed%' THEN 'qonto_download_failed'
        WHEN reason LIKE 'Cegid Loop unavailable%' THEN 'cegid_unavailable'
        WHEN reason LIKE 'waiting: document %' OR reason LIKE 'waiting: another document %'
            THEN 'copy_being_sent'
        WHEN reason LIKE 'waiting: Qonto%' OR reason LIKE 'waiting: Cegid%' THEN 'access_refused'
        WHEN reason = 'the previous flush stopped before sending it' THEN 'flush_stopped'
        WHEN reason LIKE 'an error stopped the flush before sending it%' THEN 'flush_error'
        WHEN reason = 'resend requested by an operator' THEN 'resend_requested'
        WHEN reason = 'retry requested by an operator' THEN 'retry_requested'
        WHEN reason = 'confirmed in Loop by an operator' THEN 'confirmed_by_operator'
        ELSE 'other'
    END,
    reason_detail = CASE
        WHEN reason LIKE 'unsupported type: %' THEN substring(reason FROM 19)
        WHEN reason LIKE 'waiting: Qonto%' THEN 'qonto'
        WHEN reason LIKE 'waiting: Cegid%' THEN 'cegid'
    END
WHERE reason IS NOT NULL;
