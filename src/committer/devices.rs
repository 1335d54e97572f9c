//! The committer and the device table: devices forgotten at the bound, when their source no
//! longer maps them, or at the installer's request (`zhian-gateway devices forget`).

use super::*;

impl Committer {
    /// Forget `keys` ("kind\0device") everywhere but in the store (the caller or the commit
    /// did that): the page, API, metrics and heartbeat, and the clock's evidence.
    pub(super) fn forgotten(&mut self, keys: &[String], why: Forgotten) {
        for key in keys {
            self.clock.forget(key);
            if let Some((kind, device)) = split_key(key) {
                self.stats.forget_device(kind, device, why);
            }
        }
    }

    /// Devices were forgotten at `health.max_devices`: counted, and one WARN per burst.
    pub(super) fn forgotten_at_bound(&mut self, keys: &[String]) {
        self.forgotten(keys, Forgotten::Bound);
        let news = self.bound_burst.is_none_or(|t| t.elapsed() >= BOUND_BURST);
        self.bound_burst = Some(Instant::now());
        let first = keys
            .first()
            .and_then(|k| split_key(k))
            .map(|(_, d)| crate::logfmt::Clean(d).to_string())
            .unwrap_or_default();
        if news {
            tracing::warn!(
                max_devices = self.stats.cadence().max_devices,
                forgotten = keys.len(),
                longest_silent = %first,
                total = self.stats.forgotten_of(Forgotten::Bound),
                "health.max_devices reached: the longest-silent devices are forgotten to make room; every event is still counted (raise it if the compound has more devices; zhian_devices_forgotten_total counts them)"
            );
        } else {
            tracing::debug!(forgotten = keys.len(), longest_silent = %first, "devices forgotten at health.max_devices");
        }
    }

    /// Forget the devices whose `[[mqtt.sources]]` entry is gone or changed (their stored mark
    /// names no configured source). A failed write is tried again on the next tick.
    pub(super) fn forget_unmapped(&mut self) {
        let gone: Vec<String> = self
            .writer
            .known_devices()
            .into_iter()
            .filter(|(_, _, mark)| !self.source_marks.still_maps(mark))
            .map(|(key, _, _)| key)
            .collect();
        if gone.is_empty() {
            self.unmapped_due = false;
            return;
        }
        match self.writer.forget_devices(&gone) {
            Ok(keys) => {
                self.unmapped_due = false;
                self.forgotten(&keys, Forgotten::Unmapped);
                tracing::info!(
                    forgotten = keys.len(),
                    "devices learned through a [[mqtt.sources]] entry that is gone or changed no longer map: forgotten (a real device among them comes back with its next event)"
                );
            }
            Err(e) => {
                self.unmapped_due = true;
                tracing::warn!(error = %e, "cannot forget the devices that no longer map yet; trying again");
            }
        }
    }

    /// The installer's requests in the data dir (`zhian-gateway devices forget|list`).
    pub(super) fn serve_requests(&mut self) {
        let dir = self.writer.store().data_dir().to_path_buf();
        for (path, req) in crate::devices::pending_requests(&dir) {
            let answer = match req {
                Err(e) => crate::devices::Answer {
                    op: crate::devices::Op::List,
                    error: Some(format!("unreadable request: {e}")),
                    devices: Vec::new(),
                },
                Ok(req) => self.request(req),
            };
            if let Err(e) = crate::devices::answer(&path, &answer) {
                tracing::warn!(request = %path.display(), error = %e, "cannot answer a devices request");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    pub(super) fn request(&mut self, req: crate::devices::Request) -> crate::devices::Answer {
        use crate::devices::{select, Answer, Op};
        if req.op == Op::Stocktake {
            let error = match (self.writer.occupancy_overview(0), req.count) {
                (None, _) => Some("vehicles inside are off: add an [occupancy] section".into()),
                (_, None) => Some("no count given".into()),
                (_, Some(n)) if n > crate::core::occupancy::MAX_COUNT => Some(format!(
                    "a count of {n} is not a garage's (at most {})",
                    crate::core::occupancy::MAX_COUNT
                )),
                (Some(_), Some(n)) => {
                    self.writer.record_stocktake(n, crate::clock::now_ms());
                    tracing::info!(
                        counted = n,
                        "vehicles inside: stocktake recorded (zhian-gateway occupancy set)"
                    );
                    None
                }
            };
            return Answer {
                op: req.op,
                error,
                devices: Vec::new(),
            };
        }
        let known = self.writer.known_devices();
        let picked = select(&known, &req.patterns, &self.source_marks);
        if req.op == Op::List {
            return Answer {
                op: req.op,
                error: None,
                devices: picked.into_iter().map(|(_, d)| d).collect(),
            };
        }
        let keys: Vec<String> = picked.iter().map(|(k, _)| k.clone()).collect();
        match self.writer.forget_devices(&keys) {
            Ok(done) => {
                self.forgotten(&done, Forgotten::Installer);
                tracing::info!(
                    forgotten = done.len(),
                    patterns = %crate::logfmt::Clean(&req.patterns.join(" ")),
                    "devices forgotten by the installer (zhian-gateway devices forget)"
                );
                Answer {
                    op: req.op,
                    error: None,
                    devices: picked.into_iter().map(|(_, d)| d).collect(),
                }
            }
            Err(e) => Answer {
                op: req.op,
                error: Some(format!("the store cannot be written now ({e}); try again")),
                devices: Vec::new(),
            },
        }
    }
}
