-- Schema version 6 (issue 23): the boxes' fleet configuration reports (contract: "Fleet
-- configuration"). A box publishes where each signed change stands on
-- `{prefix}/{gateway}/config/state` (retained, and republished at every connection it makes):
-- applying, probation, then one final state, applied, rejected or rolled_back.
--
-- Every report is kept once per (gateway, serial, state): a republished or redelivered report is
-- a no-op (the first to arrive stays). `at` is the box's time of the step, or the receiver's time
-- of receipt when the report has none. `gateways.config_serial` (since V3, shown in
-- `gateway_state`) is the highest serial a gateway reported `applied`, raised in the batch's
-- transaction and never lowered: a late report of an older serial, or a change rejected or
-- rolled back, leaves it as it is.

CREATE TABLE config_reports (
    gateway     text        NOT NULL,
    serial      bigint      NOT NULL CHECK (serial >= 0),
    state       text        NOT NULL
                CHECK (state IN ('applying', 'probation', 'applied', 'rejected', 'rolled_back')),
    reason      text,
    -- Hex SHA-256 of the config the box runs after this step (its file and the fragment in
    -- force): two boxes report the same hash only if they run the same config.
    config_hash text        NOT NULL,
    at          timestamptz NOT NULL,
    received    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, serial, state)
);

-- One row per (gateway, serial): where the change stands. A final state (applied, rejected,
-- rolled_back) wins over applying and probation whatever the order the reports arrived in (a
-- box's clock or a redelivery can put an earlier step after a later one), probation over
-- applying; then the latest `at`, then the latest received.
CREATE VIEW config_rollouts AS
    SELECT DISTINCT ON (gateway, serial) gateway, serial, state, reason, at, config_hash, received
    FROM config_reports
    ORDER BY gateway, serial,
             CASE state WHEN 'applying' THEN 0 WHEN 'probation' THEN 1 ELSE 2 END DESC,
             at DESC, received DESC, state;
