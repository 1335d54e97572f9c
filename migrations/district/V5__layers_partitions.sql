-- Schema version 5 (issue 22): the district at a year's scale.
--
-- 1. The growing tables (window_rows, windows, alerts, rejects) and the rollups are
--    partitioned by month (native range partitioning, UTC month bounds; rollup_daily by local
--    date). `partitioned` lists them with the `[retention]` key that bounds each; the receiver
--    creates months ahead (`zhian_ensure_month`) and drops whole months past retention
--    (`zhian_drop_before`), never row by row.
-- 2. Each window keeps the site labels it was first counted under (district, street,
--    community, compound): a re-issue replaces its share under the same labels, and a compound
--    moved to another community moves from the windows it closed after the move.
-- 3. Rollups per hour and per local day for each layer (compound, community, street, district)
--    x kind x action, maintained in the batch's transaction: a rev that comes into force
--    subtracts its predecessor's rows and adds its own. Views `counts_by_layer` and
--    `counts_hourly_by_layer` read them; `counts_by_layer_raw` and `counts_hourly_by_layer_raw`
--    compute the same from raw rows (the recount the tests and the benchmark compare with).

CREATE TABLE partitioned (
    parent  text    PRIMARY KEY,
    -- The `[retention]` key that bounds it: `window_rows` (raw) or `rollups`.
    keep    text    NOT NULL CHECK (keep IN ('window_rows', 'rollups')),
    -- Partition key is a `date` (else `timestamptz`, bounds at UTC midnight of the 1st).
    by_date boolean NOT NULL
);
INSERT INTO partitioned (parent, keep, by_date) VALUES
    ('window_rows', 'window_rows', false),
    ('windows', 'window_rows', false),
    ('alerts', 'window_rows', false),
    ('rejects', 'window_rows', false),
    ('rollup_hourly', 'rollups', false),
    ('rollup_daily', 'rollups', true);

-- Create the month holding `month` for every partitioned table, if missing; the raw tables
-- (keep = 'window_rows') only when `month` is not before `raw_from` (a month older than the raw
-- rows' retention gets its rollup partitions only: a rollup's local date can fall in the month
-- before its window's). Returns how many partitions it created. Serialised by an advisory lock
-- (two receivers may ask at once). Each partition is created on its own and then attached:
-- ATTACH PARTITION takes SHARE UPDATE EXCLUSIVE on the parent, which does not wait for (or
-- block) the batches writing to it, where CREATE TABLE ... PARTITION OF takes ACCESS EXCLUSIVE
-- and deadlocked with batches holding the parents in another order (a break-it run).
CREATE FUNCTION zhian_ensure_month(month date, raw_from date) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    p    record;
    lo   date := date_trunc('month', month)::date;
    hi   date := (date_trunc('month', month) + interval '1 month')::date;
    nm   text;
    made int := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('zhian_partitions'));
    FOR p IN SELECT parent, by_date, keep FROM partitioned ORDER BY parent LOOP
        CONTINUE WHEN p.keep = 'window_rows' AND lo < date_trunc('month', raw_from)::date;
        nm := p.parent || '_p' || to_char(lo, 'YYYYMM');
        IF to_regclass(quote_ident(nm)) IS NULL THEN
            -- Rollup rows are updated in place batch after batch: room on each page keeps
            -- those updates HOT (no index entry per update).
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)%s',
                           nm, p.parent,
                           CASE WHEN p.keep = 'rollups' THEN ' WITH (fillfactor = 70)' ELSE '' END);
            IF p.by_date THEN
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               p.parent, nm, lo, hi);
            ELSE
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               p.parent, nm, (lo::timestamp AT TIME ZONE 'UTC'),
                               (hi::timestamp AT TIME ZONE 'UTC'));
            END IF;
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;

-- Drop every month of the tables kept by `keep_key` that ends at or before `cutoff`. Returns the
-- dropped partitions' names.
CREATE FUNCTION zhian_drop_before(keep_key text, cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('zhian_partitions'));
    FOR r IN
        SELECT c.relname
        FROM partitioned p
        JOIN pg_inherits i ON i.inhparent = p.parent::regclass
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE p.keep = keep_key AND c.relname ~ '_p[0-9]{6}$'
        ORDER BY c.relname
    LOOP
        IF (to_date(right(r.relname, 6), 'YYYYMM') + interval '1 month')::timestamp
               AT TIME ZONE 'UTC' <= cutoff THEN
            EXECUTE format('DROP TABLE %I', r.relname);
            RETURN NEXT r.relname;
        END IF;
    END LOOP;
END $$;

-- The tables as they were, out of the way (their constraint names are taken over).
DROP VIEW counts_daily;
DROP VIEW counts_hourly;
DROP VIEW window_counts;
ALTER TABLE window_rows RENAME TO window_rows_v4;
ALTER TABLE window_rows_v4 RENAME CONSTRAINT window_rows_pkey TO window_rows_v4_pkey;
DROP INDEX window_rows_start;
ALTER TABLE windows RENAME TO windows_v4;
ALTER TABLE windows_v4 RENAME CONSTRAINT windows_pkey TO windows_v4_pkey;
ALTER TABLE alerts RENAME TO alerts_v4;
ALTER TABLE alerts_v4 RENAME CONSTRAINT alerts_pkey TO alerts_v4_pkey;
ALTER TABLE rejects RENAME TO rejects_v4;
ALTER TABLE rejects_v4 RENAME CONSTRAINT rejects_pkey TO rejects_v4_pkey;
ALTER TABLE rejects_v4 ALTER COLUMN seq DROP DEFAULT;
ALTER SEQUENCE rejects_seq_seq OWNED BY NONE;

-- The rev in force per window, and the labels its rows are counted under.
CREATE TABLE windows (
    gateway      text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_secs  int         NOT NULL,
    rev          int         NOT NULL,
    updated      timestamptz NOT NULL DEFAULT now(),
    -- The rev this one replaced (NULL: the window's first rev in force).
    replaced_rev int,
    district     text        NOT NULL DEFAULT '',
    street       text        NOT NULL DEFAULT '',
    community    text        NOT NULL DEFAULT '',
    compound     text        NOT NULL DEFAULT '',
    PRIMARY KEY (gateway, window_start, window_secs)
) PARTITION BY RANGE (window_start);

CREATE TABLE window_rows (
    gateway      text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_secs  int         NOT NULL,
    kind         text        NOT NULL,
    device       text        NOT NULL,
    action       text        NOT NULL,
    result       text        NOT NULL,
    n            bigint      NOT NULL
) PARTITION BY RANGE (window_start);
-- A window's rows are found (and replaced) by the window; they are distinct by (kind, device,
-- action, result) because the receiver sums a rev's rows before it writes them, so no unique
-- index over all seven columns is kept (it was most of a row's bytes and insert time).
CREATE INDEX window_rows_window ON window_rows (gateway, window_start, window_secs);

-- An alert's `ts` is the gateway's and never changes on redelivery: part of the key.
CREATE TABLE alerts (
    gateway  text        NOT NULL,
    kind     text        NOT NULL,
    device   text        NOT NULL,
    action   text        NOT NULL,
    id       text        NOT NULL,
    ts       timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, kind, device, id, ts)
) PARTITION BY RANGE (ts);
-- Recent alerts first (dashboards).
CREATE INDEX alerts_ts ON alerts (ts);

CREATE TABLE rejects (
    seq      bigint      NOT NULL DEFAULT nextval('rejects_seq_seq'),
    topic    text        NOT NULL,
    reason   text        NOT NULL,
    detail   text        NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seq, received)
) PARTITION BY RANGE (received);
ALTER SEQUENCE rejects_seq_seq OWNED BY rejects.seq;

-- Rollups: `parent` is the layer above's name ('' for the district layer); `name` of a compound
-- with no `site.compound` is its gateway id; a missing label is ''.
CREATE TABLE rollup_hourly (
    layer  text        NOT NULL CHECK (layer IN ('compound', 'community', 'street', 'district')),
    name   text        NOT NULL,
    parent text        NOT NULL,
    hour   timestamptz NOT NULL,
    kind   text        NOT NULL,
    action text        NOT NULL,
    n      bigint      NOT NULL,
    PRIMARY KEY (layer, name, parent, hour, kind, action)
) PARTITION BY RANGE (hour);
-- The drill-down: a layer's members under one parent.
CREATE INDEX rollup_hourly_parent ON rollup_hourly (layer, parent, hour);

CREATE TABLE rollup_daily (
    layer  text   NOT NULL CHECK (layer IN ('compound', 'community', 'street', 'district')),
    name   text   NOT NULL,
    parent text   NOT NULL,
    day    date   NOT NULL,
    kind   text   NOT NULL,
    action text   NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (layer, name, parent, day, kind, action)
) PARTITION BY RANGE (day);
CREATE INDEX rollup_daily_parent ON rollup_daily (layer, parent, day);

-- A split rev's labels travel with its parts until it is complete.
ALTER TABLE summary_parts ADD COLUMN site jsonb;

-- Months for what is already kept, and around today.
SELECT zhian_ensure_month(m::date, '1970-01-01') FROM (
    SELECT date_trunc('month', window_start) + o * interval '1 month' AS m
      FROM (SELECT DISTINCT date_trunc('month', window_start) AS window_start FROM windows_v4
            UNION SELECT DISTINCT date_trunc('month', window_start) FROM window_rows_v4) w,
           generate_series(-1, 1) o
    UNION SELECT date_trunc('month', ts) FROM alerts_v4
    UNION SELECT date_trunc('month', received) FROM rejects_v4
    UNION SELECT date_trunc('month', now()) + o * interval '1 month' FROM generate_series(-1, 2) o
) months;

INSERT INTO windows (gateway, window_start, window_secs, rev, updated, district, street,
                     community, compound)
SELECT w.gateway, w.window_start, w.window_secs, w.rev, w.updated,
       coalesce(g.site ->> 'district', ''), coalesce(g.site ->> 'street', ''),
       coalesce(g.site ->> 'community', ''),
       coalesce(nullif(g.site ->> 'compound', ''), w.gateway)
FROM windows_v4 w LEFT JOIN gateways g USING (gateway);
INSERT INTO window_rows SELECT * FROM window_rows_v4;
INSERT INTO alerts SELECT * FROM alerts_v4;
INSERT INTO rejects (seq, topic, reason, detail, received)
    SELECT seq, topic, reason, detail, received FROM rejects_v4;
DROP TABLE window_rows_v4, windows_v4, alerts_v4, rejects_v4;

-- Views for analysts and dashboards (contract: "District receiver", "The five layers").
CREATE VIEW window_counts AS
    SELECT r.gateway, r.window_start, r.window_secs, w.rev,
           r.kind, r.device, r.action, r.result, r.n
    FROM window_rows r
    JOIN windows w USING (gateway, window_start, window_secs);

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

-- Every raw row under each of its window's four layers.
CREATE VIEW window_layer_rows AS
    SELECT l.layer, l.name, l.parent, r.window_start, r.kind, r.action, r.n
    FROM window_rows r
    JOIN windows w USING (gateway, window_start, window_secs)
    CROSS JOIN LATERAL (VALUES ('compound', w.compound, w.community),
                               ('community', w.community, w.street),
                               ('street', w.street, w.district),
                               ('district', w.district, '')) AS l(layer, name, parent);

-- `parent` is '' for the district layer (and for a missing label), so `parent = $x` reaches
-- the (layer, parent, ...) indexes through the views.
CREATE VIEW counts_by_layer AS
    SELECT layer, name, parent, day, kind, action, n
    FROM rollup_daily WHERE n <> 0;

CREATE VIEW counts_hourly_by_layer AS
    SELECT layer, name, parent, hour, kind, action, n
    FROM rollup_hourly WHERE n <> 0;

-- The district's local date now (`settings.timezone`), for dashboards' "today".
CREATE FUNCTION district_today() RETURNS date LANGUAGE sql STABLE AS $$
    SELECT (now() AT TIME ZONE (SELECT value FROM settings WHERE key = 'timezone'))::date
$$;

-- The same two from raw rows (plain views: a scan of every raw row on each read).
CREATE VIEW counts_by_layer_raw AS
    SELECT layer, name, parent,
           (window_start AT TIME ZONE (SELECT value FROM settings WHERE key = 'timezone'))::date AS day,
           kind, action, sum(n)::bigint AS n
    FROM window_layer_rows
    GROUP BY 1, 2, 3, 4, 5, 6 HAVING sum(n) <> 0;

CREATE VIEW counts_hourly_by_layer_raw AS
    SELECT layer, name, parent,
           date_trunc('hour', window_start, (SELECT value FROM settings WHERE key = 'timezone')) AS hour,
           kind, action, sum(n)::bigint AS n
    FROM window_layer_rows
    GROUP BY 1, 2, 3, 4, 5, 6 HAVING sum(n) <> 0;

-- The rollups of what was kept before this version (statistics first: without them the
-- planner sorted millions of rows through temp files; measured by the year bench's fill).
ANALYZE windows, window_rows;
INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
    SELECT layer, name, parent, hour, kind, action, n FROM counts_hourly_by_layer_raw;
INSERT INTO rollup_daily (layer, name, parent, day, kind, action, n)
    SELECT layer, name, parent, day, kind, action, n FROM counts_by_layer_raw;
