-- zhian-gateway district receiver, schema version 1 (applied by the receiver itself, refinery).
-- Keeps, per (gateway, window start, window secs), the highest complete rev of each summary;
-- alerts, care notices and daily counts once each; every gateway's last status and heartbeat.

CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO settings (key, value) VALUES ('silent_after', '3 minutes'), ('timezone', 'Asia/Shanghai');

CREATE TABLE gateways (
    gateway        text PRIMARY KEY,
    site           jsonb,
    status         text,
    status_at      timestamptz,
    last_heartbeat timestamptz,
    heartbeat      jsonb
);

-- Parts of a summary rev until the rev is complete (all parts arrived).
CREATE TABLE summary_parts (
    gateway      text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_secs  int         NOT NULL,
    rev          int         NOT NULL,
    part         int         NOT NULL,
    parts        int         NOT NULL,
    counts       jsonb       NOT NULL,
    received     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, window_start, window_secs, rev, part)
);

-- The rev in force per window (the highest complete one) and its rows.
CREATE TABLE windows (
    gateway      text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_secs  int         NOT NULL,
    rev          int         NOT NULL,
    updated      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, window_start, window_secs)
);
CREATE TABLE window_rows (
    gateway      text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_secs  int         NOT NULL,
    kind         text        NOT NULL,
    device       text        NOT NULL,
    action       text        NOT NULL,
    result       text        NOT NULL,
    n            bigint      NOT NULL,
    PRIMARY KEY (gateway, window_start, window_secs, kind, device, action, result)
);
CREATE INDEX window_rows_start ON window_rows (window_start);

CREATE TABLE alerts (
    gateway  text        NOT NULL,
    kind     text        NOT NULL,
    device   text        NOT NULL,
    action   text        NOT NULL,
    id       text        NOT NULL,
    ts       timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, kind, device, id)
);

CREATE TABLE care_notices (
    seq         bigserial   PRIMARY KEY,
    gateway     text        NOT NULL,
    alias       text        NOT NULL,
    state       text        NOT NULL,
    last_seen   timestamptz,
    silent_secs bigint      NOT NULL,
    received    timestamptz NOT NULL DEFAULT now()
);
-- A redelivered notice is the same notice.
CREATE UNIQUE INDEX care_notices_once ON care_notices
    (gateway, alias, state, (coalesce(last_seen, 'epoch'::timestamptz)), silent_secs);

CREATE TABLE daily (
    gateway         text        NOT NULL,
    date            date        NOT NULL,
    tz              text        NOT NULL,
    rev             int         NOT NULL,
    access_subjects bigint,
    vehicles        bigint,
    counts          jsonb       NOT NULL,
    received        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, date)
);

CREATE TABLE rejects (
    seq      bigserial   PRIMARY KEY,
    topic    text        NOT NULL,
    reason   text        NOT NULL,
    detail   text        NOT NULL,
    received timestamptz NOT NULL DEFAULT now()
);

-- Views for analysts and dashboards (contract: "District receiver").
CREATE VIEW window_counts AS
    SELECT r.gateway, r.window_start, r.window_secs, w.rev,
           r.kind, r.device, r.action, r.result, r.n
    FROM window_rows r
    JOIN windows w USING (gateway, window_start, window_secs);

CREATE VIEW gateway_state AS
    SELECT g.gateway, g.status, g.last_heartbeat,
           (g.last_heartbeat IS NULL
            OR g.last_heartbeat < now() - (SELECT value::interval FROM settings WHERE key = 'silent_after')) AS silent,
           g.site ->> 'district' AS district, g.site ->> 'community' AS community,
           g.site ->> 'compound' AS compound, g.status_at
    FROM gateways g;

CREATE VIEW silent_gateways AS
    SELECT * FROM gateway_state WHERE silent OR status = 'offline';

CREATE VIEW counts_hourly AS
    SELECT c.gateway, g.site ->> 'compound' AS compound, c.kind,
           date_trunc('hour', c.window_start) AS hour, sum(c.n)::bigint AS n
    FROM window_counts c LEFT JOIN gateways g USING (gateway)
    GROUP BY 1, 2, 3, 4;

CREATE VIEW counts_daily AS
    SELECT c.gateway, g.site ->> 'compound' AS compound, c.kind,
           (c.window_start AT TIME ZONE (SELECT value FROM settings WHERE key = 'timezone'))::date AS day,
           sum(c.n)::bigint AS n
    FROM window_counts c LEFT JOIN gateways g USING (gateway)
    GROUP BY 1, 2, 3, 4;

CREATE VIEW open_care_notices AS
    SELECT * FROM (
        SELECT DISTINCT ON (gateway, alias) gateway, alias, state, last_seen, silent_secs, received
        FROM care_notices
        ORDER BY gateway, alias, received DESC, seq DESC
    ) latest
    WHERE state = 'silent';
