//! The heartbeat (`{prefix}/{gateway}/heartbeat`): the box's health as `zhian-proto`'s
//! `Heartbeat`, published on the current connection.

use super::*;

impl Forwarder {
    pub(super) fn heartbeat(&self, c: &mut Conn) {
        let overview = self
            .store
            .overview()
            .unwrap_or_else(|_| crate::store::Overview {
                file_bytes: self.store.file_bytes(),
                ..Default::default()
            });
        let mut quarantined = crate::store::damage::quarantined(self.store.data_dir());
        if let Some(q) = self.stats.quarantined.lock().expect("lock").as_ref() {
            for f in quarantined.iter_mut().filter(|f| f.file == q.file) {
                f.reason = q.reason.clone();
            }
        }
        let now = now_ms();
        let devices = crate::health::devices(&self.stats, now);
        let online = devices.iter().filter(|d| d.online).count();
        let total = devices.len();
        let hb = proto::Heartbeat {
            schema: proto::HeartbeatV1,
            gateway: self.cfg.gateway.id.clone(),
            epoch: Some(c.epoch),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.stats.started.elapsed().as_secs(),
            devices: proto::DeviceCounts {
                online: online as u64,
                offline: (total - online) as u64,
            },
            pending_summaries: overview.pending_summaries,
            pending_alerts: overview.pending_alerts,
            parked: overview.parked,
            oldest_pending_window: overview.oldest_pending_window_ms.map(proto::Timestamp),
            store_bytes: overview.file_bytes,
            counters: self.stats.counters().into(),
            dropped: proto::Dropped {
                summaries: overview.dropped_summaries,
                alerts: overview.dropped_alerts,
                dedup_keys: overview.dropped_dedup_keys,
                raw_events: overview.evicted_events,
            },
            intake_paused: self.stats.paused().map(|p| proto::Paused {
                reason: p.reason.as_str().to_string(),
                detail: p.detail,
                since_ms: p.since_ms,
            }),
            store_quarantined: quarantined
                .into_iter()
                .map(|q| proto::Quarantined {
                    file: q.file,
                    bytes: q.bytes,
                    reason: q.reason,
                })
                .collect(),
            link_problems: self
                .stats
                .link_problems()
                .into_iter()
                .map(|(link, p)| {
                    (
                        link.to_string(),
                        proto::Problem {
                            reason: p.reason.to_string(),
                            detail: p.detail,
                        },
                    )
                })
                .collect(),
            modbus: self
                .stats
                .modbus()
                .into_iter()
                .map(|(name, h)| proto::ModbusDevice {
                    name,
                    kind: h.kind.as_str().to_string(),
                    online: h.online,
                    polls: h.polls,
                    errors: h.errors,
                    last_error: h.last_error,
                    last_seen: h.last_seen_ms.map(proto::Timestamp),
                    counted: h.counted,
                    glitches: h.glitches,
                    states: h
                        .states
                        .into_iter()
                        .map(|(k, v)| (k, v.to_json()))
                        .collect(),
                })
                .collect(),
        };
        let payload = hb.to_bytes();
        if c.client
            .try_publish(
                self.topic(proto::Leaf::Heartbeat),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .is_ok()
        {
            c.record_sent(Sent::Other, Instant::now());
        }
    }
}
