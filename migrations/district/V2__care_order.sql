-- Schema version 2: the latest care notice per resident is decided by what the gateway said, not
-- by which receiver's transaction stored it first (two receivers, or a redelivery after a
-- receiver restart, can store a later notice before an earlier one). A notice with a later
-- last pass is later; for one last pass, `seen` comes before the `silent` that follows it.
CREATE OR REPLACE VIEW open_care_notices AS
    SELECT * FROM (
        SELECT DISTINCT ON (gateway, alias) gateway, alias, state, last_seen, silent_secs, received
        FROM care_notices
        ORDER BY gateway, alias, coalesce(last_seen, 'epoch'::timestamptz) DESC,
                 (state = 'silent') DESC, silent_secs DESC, seq DESC
    ) latest
    WHERE state = 'silent';
