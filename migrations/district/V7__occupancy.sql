-- Schema version 7: vehicles inside (实有车辆; contract: "Vehicles inside"). Each box reports,
-- once per window on `{prefix}/{gateway}/occupancy`, the vehicles inside its compound at the
-- window's end, its parking capacity (when configured), the long stays and the missed exits.
--
-- `occupancy` keeps the latest report per gateway, with the site labels it came with (capped
-- and defaulted as for summaries: a missing label is '', a missing compound the gateway id).
-- The batch's upsert replaces a row only with a report that ranks above it: a later `at`, or
-- at the same `at` greater figures and labels (compared as one tuple, labels in byte order), so
-- a redelivered or late older report changes nothing and two receivers agree whatever order
-- the reports reach them in (the model is `batch::Occupancy::rank`). No history is kept.
--
-- `occupancy_by_layer` rolls the latest reports up by layer, named as in `counts_by_layer`
-- (V5): `parent` is the layer above's name, '' for the district and for a missing label.

CREATE TABLE occupancy (
    gateway      text        PRIMARY KEY,
    -- The window's end the report is for (the box's clock).
    at           timestamptz NOT NULL,
    inside       bigint      NOT NULL CHECK (inside >= 0),
    -- Parking spaces; NULL when the box has no `occupancy.capacity`.
    capacity     bigint      CHECK (capacity >= 0),
    long_stay    bigint      NOT NULL CHECK (long_stay >= 0),
    missed_exits bigint      NOT NULL CHECK (missed_exits >= 0),
    district     text        NOT NULL DEFAULT '',
    street       text        NOT NULL DEFAULT '',
    community    text        NOT NULL DEFAULT '',
    compound     text        NOT NULL,
    -- When this receiver took the report kept.
    received     timestamptz NOT NULL DEFAULT now()
);

-- Per layer and name: `inside`, `long_stay` and `missed_exits` summed over the gateways under
-- it; `capacity` the sum of the known capacities and `free` the sum over those gateways of
-- their free spaces, never below 0 for one gateway (a full compound does not hide another's
-- spaces), both NULL when no gateway under it has a capacity; `gateways` how many gateways
-- contribute; `at` the oldest of their latest reports (a box that stopped reporting shows).
CREATE VIEW occupancy_by_layer AS
    SELECT l.layer, l.name, l.parent,
           sum(o.inside)::bigint AS inside,
           sum(o.capacity)::bigint AS capacity,
           sum(greatest(o.capacity - o.inside, 0))
               FILTER (WHERE o.capacity IS NOT NULL)::bigint AS free,
           sum(o.long_stay)::bigint AS long_stay,
           sum(o.missed_exits)::bigint AS missed_exits,
           count(*) AS gateways,
           min(o.at) AS at
    FROM occupancy o
    CROSS JOIN LATERAL (VALUES ('compound', o.compound, o.community),
                               ('community', o.community, o.street),
                               ('street', o.street, o.district),
                               ('district', o.district, '')) AS l(layer, name, parent)
    GROUP BY l.layer, l.name, l.parent;
