//! The receivers' roll-call: each receiver records itself in the `receivers` table; one gone
//! for good (its broker session holds its share of the messages) is seen by the others.

use super::*;

/// The receivers' roll-call (`receivers` table): this receiver's row written every
/// `district.rollcall_every`; receivers of the group whose row is older than
/// `district.stale_after` are stale (WARN once each, `zhian_district_receivers{state}`); the
/// gateway counts for `/metrics` are read at the same time.
pub(super) struct Rollcall {
    pub(super) every: Duration,
    pub(super) stale_after: Duration,
    pub(super) next: tokio::time::Instant,
    pub(super) client_id: String,
    pub(super) group: String,
    pub(super) host: String,
    pub(super) started: std::time::SystemTime,
    pub(super) warned: std::collections::BTreeSet<String>,
    /// The last roll-call's error, while it keeps failing.
    pub(super) failing: Option<String>,
}

impl Rollcall {
    pub(super) fn new(cfg: &DistrictConfig) -> Rollcall {
        Rollcall {
            every: cfg.district.rollcall_every.0,
            stale_after: cfg.district.stale_after.0,
            next: tokio::time::Instant::now(),
            client_id: cfg.mqtt.client_id.clone(),
            group: cfg.mqtt.group.clone(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            started: std::time::SystemTime::now(),
            warned: Default::default(),
            failing: None,
        }
    }

    pub(super) fn due(&self) -> bool {
        tokio::time::Instant::now() >= self.next
    }

    pub(super) fn until_due(&self) -> Duration {
        self.next
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1))
    }

    pub(super) async fn run(
        &mut self,
        c: &tokio_postgres::Client,
        ops: &Ops,
    ) -> Result<(), tokio_postgres::Error> {
        self.next = tokio::time::Instant::now() + self.every;
        c.execute(
            "INSERT INTO receivers (client_id, grp, host, version, started, last_seen)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (client_id) DO UPDATE SET grp = EXCLUDED.grp, host = EXCLUDED.host,
               version = EXCLUDED.version, started = EXCLUDED.started, last_seen = now(),
               stopped = NULL",
            &[
                &self.client_id,
                &self.group,
                &self.host,
                &env!("CARGO_PKG_VERSION"),
                &self.started,
            ],
        )
        .await?;
        let stale_secs = self.stale_after.as_secs_f64();
        let rows = c
            .query(
                "SELECT client_id, host, to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        last_seen < now() - make_interval(secs => $2)
                 FROM receivers WHERE grp = $1 ORDER BY client_id",
                &[&self.group, &stale_secs],
            )
            .await?;
        let (mut live, mut stale) = (0, 0);
        let mut now_stale = std::collections::BTreeSet::new();
        for r in &rows {
            let (id, host, last, is_stale): (String, String, String, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if !is_stale {
                live += 1;
                continue;
            }
            stale += 1;
            if !self.warned.contains(&id) {
                tracing::warn!(receiver = %id, %host, last_seen = %last, group = %self.group,
                    "a receiver of this group has been gone since last_seen: its broker session keeps queuing its share of the messages. Start a replacement with mqtt.client_id = {id:?} (it takes the session over and drains it), or expire the session on the broker (what it held is then lost); then DELETE its row from receivers (docs/district-operations.md)");
            }
            now_stale.insert(id);
        }
        for id in self.warned.difference(&now_stale) {
            tracing::info!(receiver = %id, "a receiver of this group is back (or its row was removed)");
        }
        self.warned = now_stale;
        ops.receivers_live.store(live, Relaxed);
        ops.receivers_stale.store(stale, Relaxed);
        let g = c
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'online'),
                        count(*) FILTER (WHERE status = 'offline'),
                        count(*) FILTER (WHERE silent)
                 FROM gateway_state",
                &[],
            )
            .await?;
        ops.set_gateways(
            [
                ("online", g.get(0)),
                ("offline", g.get(1)),
                ("silent", g.get(2)),
            ]
            .into_iter()
            .collect(),
        );
        Ok(())
    }

    /// A clean stop: the row says so (the broker session still holds this receiver's share
    /// until it comes back).
    pub(super) async fn stopped(&self, c: &tokio_postgres::Client) {
        let _ = c
            .execute(
                "UPDATE receivers SET stopped = now() WHERE client_id = $1",
                &[&self.client_id],
            )
            .await;
    }
}
