-- Schema version 3 (issue 19): gateway state by epoch, street and config serial in
-- gateway_state, parts keyed by their count, and the receivers' roll-call.

-- The epoch of the state in force (contract: "Upstream", `status`): the highest epoch wins;
-- within one epoch `offline` wins over `online`. NULL for gateways older than epochs.
ALTER TABLE gateways ADD COLUMN epoch bigint;
-- The fleet configuration serial in force (NULL until fleet configuration reports one).
ALTER TABLE gateways ADD COLUMN config_serial bigint;

-- A gateway that learns the district broker's packet limit re-sends a rev split into more
-- parts: part 1 of 2 and part 1 of 4 are different messages, so `parts` is in the key.
ALTER TABLE summary_parts DROP CONSTRAINT summary_parts_pkey;
ALTER TABLE summary_parts ADD PRIMARY KEY (gateway, window_start, window_secs, rev, parts, part);

-- Each receiver writes its row every 15 s: a receiver gone for good (whose broker session
-- still queues its share of the messages) shows as a stale row to the others.
CREATE TABLE receivers (
    client_id  text        PRIMARY KEY,
    grp        text        NOT NULL,
    host       text        NOT NULL,
    version    text        NOT NULL,
    started    timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    stopped    timestamptz
);

DROP VIEW silent_gateways;
DROP VIEW gateway_state;
CREATE VIEW gateway_state AS
    SELECT g.gateway, g.status, g.epoch, g.last_heartbeat,
           (g.last_heartbeat IS NULL
            OR g.last_heartbeat < now() - (SELECT value::interval FROM settings WHERE key = 'silent_after')) AS silent,
           g.site ->> 'district' AS district, g.site ->> 'street' AS street,
           g.site ->> 'community' AS community, g.site ->> 'compound' AS compound,
           g.status_at, g.config_serial
    FROM gateways g;
CREATE VIEW silent_gateways AS
    SELECT * FROM gateway_state WHERE silent OR status = 'offline';
