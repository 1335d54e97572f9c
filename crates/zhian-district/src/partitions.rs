//! Monthly partitions (schema V5): created ahead by the receiver, dropped whole past
//! `[retention]`. The month arithmetic is pure; [`Partitions`] runs the two SQL functions the
//! migration defines (`zhian_ensure_month`, `zhian_drop_before`), each serialised in the
//! database by an advisory lock, so several receivers may run them at once.

use crate::config::Retention;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The UTC (year, month 1-12) holding Unix ms `ms`.
pub fn month_of(ms: i64) -> (i32, u32) {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    (t.year(), u8::from(t.month()) as u32)
}

/// (year, month) plus `k` months (`k` may be negative).
pub fn add_months(y: i32, m: u32, k: i32) -> (i32, u32) {
    let i = y as i64 * 12 + (m as i64 - 1) + k as i64;
    (i.div_euclid(12) as i32, (i.rem_euclid(12) + 1) as u32)
}

/// Unix ms of the first instant of a UTC month.
pub fn month_start_ms(y: i32, m: u32) -> i64 {
    let month = time::Month::try_from(m as u8).unwrap_or(time::Month::January);
    time::Date::from_calendar_date(y, month, 1)
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1000)
        .unwrap_or(0)
}

/// The months a batch with window or alert times `times_ms` writes to: each time's month and
/// its neighbours (a daily rollup's local date can fall in the next or previous month).
pub fn months_for(times_ms: impl IntoIterator<Item = i64>) -> Vec<(i32, u32)> {
    let mut out: Vec<(i32, u32)> = times_ms
        .into_iter()
        .flat_map(|t| {
            let (y, m) = month_of(t);
            [-1, 0, 1].map(|k| add_months(y, m, k))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn date(y: i32, m: u32) -> String {
    format!("{y:04}-{m:02}-01")
}

/// What this receiver knows exists, and when it last ran the retention pass.
pub struct Partitions {
    ensured: HashSet<(i32, u32)>,
    last_pass: Option<Instant>,
}

impl Default for Partitions {
    fn default() -> Self {
        Self::new()
    }
}

impl Partitions {
    pub fn new() -> Self {
        Partitions {
            ensured: HashSet::new(),
            last_pass: None,
        }
    }

    /// Forget what exists (after a reconnect: another receiver, or an operator, may have
    /// dropped months).
    pub fn forget(&mut self) {
        self.ensured.clear();
    }

    /// Create the months these times need, if this receiver has not seen them yet; the raw
    /// tables only from the month holding `raw_from_ms` (the oldest kept), the rollups for
    /// every month asked.
    pub async fn ensure(
        &mut self,
        client: &tokio_postgres::Client,
        times_ms: impl IntoIterator<Item = i64>,
        raw_from_ms: i64,
    ) -> Result<(), tokio_postgres::Error> {
        let (ry, rm) = month_of(raw_from_ms);
        for (y, m) in months_for(times_ms) {
            if self.ensured.contains(&(y, m)) {
                continue;
            }
            let made: i32 = client
                .query_one(
                    "SELECT zhian_ensure_month($1::text::date, $2::text::date)",
                    &[&date(y, m), &date(ry, rm)],
                )
                .await?
                .get(0);
            if made > 0 {
                tracing::info!(month = %date(y, m), partitions = made, "created the month's partitions");
            }
            self.ensured.insert((y, m));
        }
        Ok(())
    }

    /// Whether the retention pass is due (at start, then every `retention.every`).
    pub fn due(&self, r: &Retention) -> bool {
        self.last_pass.is_none_or(|t| t.elapsed() >= r.every.0)
    }

    /// Months from the previous to `months_ahead` ahead; every month wholly older than its
    /// retention dropped. Returns the partitions dropped.
    pub async fn pass(
        &mut self,
        client: &tokio_postgres::Client,
        r: &Retention,
        now_ms: i64,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let (y, m) = month_of(now_ms);
        let ahead = (0..=r.months_ahead as i32).map(|k| {
            let (y, m) = add_months(y, m, k);
            month_start_ms(y, m)
        });
        self.ensure(client, ahead, r.horizon(now_ms).min_ms).await?;
        let mut dropped = Vec::new();
        for (key, keep) in [("window_rows", r.window_rows), ("rollups", r.rollups)] {
            let cutoff = std::time::UNIX_EPOCH
                + Duration::from_millis(
                    (now_ms.max(0) as u64).saturating_sub(keep.as_millis_u64()),
                );
            for row in client
                .query("SELECT zhian_drop_before($1, $2)", &[&key, &cutoff])
                .await?
            {
                dropped.push(row.get::<_, String>(0));
            }
        }
        if !dropped.is_empty() {
            tracing::info!(dropped = %dropped.join(","), "retention: dropped months past [retention]");
            // A month dropped may be asked for again (a late window inside the horizon's month
            // boundary): ask the database next time.
            self.forget();
        }
        self.last_pass = Some(Instant::now());
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_arithmetic() {
        assert_eq!(add_months(2026, 12, 1), (2027, 1));
        assert_eq!(add_months(2026, 1, -1), (2025, 12));
        assert_eq!(add_months(2026, 5, -25), (2024, 4));
        let ms = month_start_ms(2026, 12);
        assert_eq!(ms, 1_796_083_200_000);
        assert_eq!(month_of(ms), (2026, 12));
        assert_eq!(month_of(ms - 1), (2026, 11));
        assert_eq!(
            months_for([ms, ms + 1000]),
            vec![(2026, 11), (2026, 12), (2027, 1)]
        );
    }

    #[test]
    fn horizon_is_whole_months() {
        let r = Retention::default();
        let now = month_start_ms(2026, 12) + 3 * 86_400_000;
        let h = r.horizon(now);
        // 400 days before 2026-12-04 is 2025-10-30: October 2025 is the oldest month kept.
        assert_eq!(h.min_ms, month_start_ms(2025, 10));
        assert_eq!(h.max_ms, month_start_ms(2027, 3));
    }
}
