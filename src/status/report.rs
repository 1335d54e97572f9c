//! The one snapshot behind the page and `/api/status`: what the daemon knows now, read from the
//! shared counters, the device list (`crate::health`) and the store, on a blocking thread.

use super::*;

// ---------------------------------------------------------------------------------------------
// The data behind the page and /api/status
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
pub(super) struct GatewayOut {
    pub(super) id: String,
    pub(super) district: Option<String>,
    pub(super) street: Option<String>,
    pub(super) community: Option<String>,
    pub(super) compound: Option<String>,
}

#[derive(Serialize)]
pub(super) struct HourOut {
    pub(super) start: String,
    #[serde(skip)]
    pub(super) start_ms: i64,
    pub(super) access: u64,
    pub(super) vehicle: u64,
    pub(super) camera: u64,
}

#[derive(Serialize)]
pub(super) struct DeviceOut {
    pub(super) kind: Kind,
    pub(super) name: String,
    pub(super) source: &'static str,
    pub(super) online: bool,
    pub(super) last_seen: Option<String>,
    /// Seconds since it was last seen.
    pub(super) last_seen_secs_ago: Option<i64>,
    /// Since when it has been offline (None while online or never seen).
    pub(super) offline_since: Option<String>,
    /// Its expected cadence (`[health]`, MQTT devices), seconds.
    pub(super) silence_secs: Option<i64>,
    /// Events counted today (local day, site time zone) from this device.
    pub(super) today: u64,
    pub(super) last_error: Option<String>,
    /// Modbus: counter readings dropped as misreads (glitch rule) since start.
    pub(super) glitches: u64,
    pub(super) states: serde_json::Map<String, serde_json::Value>,
    /// Its latest event was stamped more than `aggregate.max_future_skew` ahead of the trusted
    /// gateway clock and counted at receipt (MQTT).
    pub(super) clock_skew: bool,
    /// How far ahead, seconds, while flagged.
    pub(super) clock_ahead_secs: Option<i64>,
}

#[derive(Serialize)]
pub(super) struct LinkOut {
    pub(super) url: String,
    pub(super) connected: bool,
    pub(super) since: String,
    /// Seconds in this state.
    pub(super) for_secs: i64,
    /// Why not connected: `connecting`, `unreachable`, `closed`, `refused`, `tls`,
    /// `identity_taken`.
    pub(super) reason: Option<&'static str>,
    /// The last error as the MQTT client reported it.
    pub(super) error: Option<String>,
    /// Failed attempts since it went down.
    pub(super) attempts: u64,
}

#[derive(Serialize)]
pub(super) struct UpstreamOut {
    pub(super) connected: bool,
    /// The district connection epoch in use (0 before the first connection).
    pub(super) epoch: u64,
    pub(super) pending_summaries: u64,
    pub(super) pending_alerts: u64,
    /// Messages the district broker kept refusing: kept on the box, not sent again.
    pub(super) parked: u64,
    pub(super) oldest_pending_window: Option<String>,
    /// Age of the oldest pending window's start, seconds.
    pub(super) oldest_pending_secs: Option<i64>,
    /// The district broker's packet limit as learned from it (it closed the connection on a
    /// larger message; summaries are split under it), bytes; null while none was learned.
    pub(super) learned_max_packet: Option<u64>,
}

#[derive(Serialize)]
pub(super) struct StoreOut {
    pub(super) bytes: u64,
    /// `store.max_size`: the data dir stays within it.
    pub(super) max_bytes: u64,
    pub(super) raw_events: u64,
    pub(super) dedup_keys: u64,
    /// Dropped under disk pressure since the store was created (contract: "Disk pressure").
    pub(super) dropped: DroppedOut,
    /// Damaged store files moved aside (in the data dir until an operator removes them).
    pub(super) quarantined: Vec<crate::store::damage::Quarantined>,
    /// A store read that failed for this snapshot (e.g. while the writer reopens it).
    pub(super) error: Option<String>,
}

#[derive(Serialize, Default)]
pub(super) struct DroppedOut {
    pub(super) summaries: u64,
    pub(super) alerts: u64,
    pub(super) dedup_keys: u64,
    pub(super) raw_events: u64,
}

/// Intake: paused while the store cannot be written (nothing is acknowledged meanwhile).
#[derive(Serialize)]
pub(super) struct IntakeOut {
    pub(super) paused: bool,
    pub(super) reason: Option<&'static str>,
    pub(super) detail: Option<String>,
    pub(super) since: Option<String>,
}

#[derive(Serialize)]
pub(super) struct AlertOut {
    pub(super) at: String,
    pub(super) kind: Kind,
    pub(super) device: String,
    pub(super) action: String,
    pub(super) id: String,
}

#[derive(Serialize)]
pub(super) struct CareOut {
    pub(super) alias: String,
    /// The last access event (`null`: none since the watch began).
    pub(super) last_seen: Option<String>,
    /// Seconds since the last access event (or since the watch began).
    pub(super) silent_for_secs: Option<i64>,
    /// A `silent` notice is out and the resident has not been seen since.
    pub(super) silent: bool,
    pub(super) silence_secs: i64,
    /// Why the resident cannot be matched: `care_key_lost` (listed by a pseudonym made with a
    /// care key the key dir lost: relist them); `null` while the watch can match them.
    pub(super) unmatched: Option<&'static str>,
}

/// A key the key dir lost while the daemon was stopped, while it still matters.
#[derive(Serialize)]
pub(super) struct KeyLostOut {
    /// The key's file name in `privacy.key_dir`.
    pub(super) key: String,
    /// `day` (a pseudonym key: the day's distinct counts span two keys), `care`, or `presence`
    /// (vehicles inside: the stays then known are kept as a count until a stocktake).
    pub(super) kind: &'static str,
    /// The local day whose distinct counts cannot link people across the loss.
    pub(super) date: Option<String>,
    /// When the start found it missing.
    pub(super) detected: String,
    /// Shown until (the day can no longer change); `null` for the care key, shown while
    /// `unmatched` residents are listed, and for the presence key, shown until a stocktake.
    pub(super) until: Option<String>,
    /// Care key: aliases of the residents to relist.
    pub(super) unmatched: Vec<String>,
}

#[derive(Serialize)]
pub(super) struct RejectOut {
    pub(super) at: String,
    pub(super) topic: String,
    pub(super) reason: &'static str,
    /// The rule that failed, for `unmapped` (source and field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) detail: Option<String>,
}

#[derive(Serialize)]
pub(super) struct StatusOut {
    pub(super) gateway: GatewayOut,
    pub(super) version: &'static str,
    pub(super) uptime_secs: u64,
    pub(super) now: String,
    /// kind -> action -> events since local midnight.
    pub(super) today: BTreeMap<&'static str, BTreeMap<String, u64>>,
    pub(super) hourly: Vec<HourOut>,
    pub(super) devices: Vec<DeviceOut>,
    pub(super) intake: IntakeOut,
    /// The store clock less the wall clock, ms (see `core::clock::StoreClock`): non-zero after
    /// a step of the wall clock, until it is caught up with or vouched for.
    pub(super) clock_offset_ms: i64,
    /// Both links: `site` (the device broker) and `district` (upstream), each connected or
    /// not, since when, why not.
    pub(super) links: BTreeMap<crate::link::Link, LinkOut>,
    /// What is wrong with the site broker's subscription (refused, or granted QoS 0).
    pub(super) site_problem: Option<String>,
    /// Per link (`site`, `district`): a connection failure that needs an operator (refused
    /// credentials, TLS, another client holding our client id).
    pub(super) link_problems: BTreeMap<crate::link::Link, crate::link::Problem>,
    pub(super) upstream: UpstreamOut,
    pub(super) store: StoreOut,
    pub(super) counters: crate::stats::CounterSnapshot,
    pub(super) recent_alerts: Vec<AlertOut>,
    pub(super) recent_rejects: Vec<RejectOut>,
    /// The care watch (独居老人关怀): aliases only, never a subject.
    pub(super) care: Vec<CareOut>,
    /// Keys the key dir lost while the daemon was stopped (README "Security and privacy"):
    /// each day whose distinct counts span two keys, until the day can no longer change, and
    /// the care key while residents listed by its pseudonyms are listed. Empty when none.
    pub(super) keys_lost: Vec<KeyLostOut>,
    /// Where the running config came from: the installer's file alone, or with the fleet's
    /// overlay (serial, probation or applied, the keys it sets), and the last change rolled
    /// back or refused (contract: "Fleet configuration").
    pub(super) config: crate::stats::ConfigView,
    /// Vehicles inside (contract: "Vehicles inside"); absent while `[occupancy]` is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) occupancy: Option<crate::stats::OccupancyView>,
    #[serde(skip)]
    pub(super) tz_secs: i32,
}

pub(super) fn snapshot(st: &AppState) -> Result<StatusOut, crate::store::StoreError> {
    let now = now_ms();
    let tz = st.cfg.site_offset_s();
    let tz_ms = i64::from(tz) * 1000;
    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;
    let midnight = (now + tz_ms).div_euclid(DAY) * DAY - tz_ms;
    let hour_now = (now + tz_ms).div_euclid(HOUR) * HOUR - tz_ms;
    let first_hour = hour_now - 23 * HOUR;
    let mut today: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    for k in [Kind::Access, Kind::Vehicle] {
        let m = today.entry(k.as_str()).or_default();
        m.insert("entry".into(), 0);
        m.insert("exit".into(), 0);
    }
    today.entry(Kind::Camera.as_str()).or_default();
    let mut hourly: Vec<HourOut> = (0..24)
        .map(|i| {
            let start_ms = first_hour + i * HOUR;
            HourOut {
                start: rfc3339_utc(start_ms),
                start_ms,
                access: 0,
                vehicle: 0,
                camera: 0,
            }
        })
        .collect();
    let mut store_error = None;
    let windows = st
        .store
        .windows_since(first_hour.min(midnight))
        .unwrap_or_else(|e| {
            store_error = Some(e.to_string());
            Vec::new()
        });
    let mut device_today: BTreeMap<(Kind, String), u64> = BTreeMap::new();
    for w in windows {
        for (k, n) in &w.counts {
            if w.start_ms >= midnight {
                *device_today.entry((k.kind, k.device.clone())).or_default() += n;
                *today
                    .entry(k.kind.as_str())
                    .or_default()
                    .entry(k.action.clone())
                    .or_default() += n;
            }
            if w.start_ms >= first_hour {
                let h = &mut hourly[((w.start_ms - first_hour) / HOUR).min(23) as usize];
                match k.kind {
                    Kind::Access => h.access += n,
                    Kind::Vehicle => h.vehicle += n,
                    Kind::Camera => h.camera += n,
                }
            }
        }
    }
    let devices: Vec<DeviceOut> = crate::health::devices(&st.stats, now)
        .into_iter()
        .map(|d| DeviceOut {
            today: device_today
                .get(&(d.kind, d.name.clone()))
                .copied()
                .unwrap_or(0),
            last_seen: d.last_seen_ms.map(rfc3339_utc),
            last_seen_secs_ago: d.last_seen_ms.map(|t| (now - t).max(0) / 1000),
            offline_since: d.offline_since_ms.map(rfc3339_utc),
            silence_secs: d.silence_ms.map(|ms| ms / 1000),
            states: d.states.into_iter().collect(),
            kind: d.kind,
            name: d.name,
            source: d.source,
            online: d.online,
            last_error: d.last_error,
            glitches: d.glitches,
            clock_skew: d.clock_skew,
            clock_ahead_secs: d.clock_ahead_ms.map(|ms| ms / 1000),
        })
        .collect();
    let o = st.store.overview().unwrap_or_else(|e| {
        store_error = Some(e.to_string());
        crate::store::Overview {
            file_bytes: st.store.file_bytes(),
            ..Default::default()
        }
    });
    let cfg = &st.cfg;
    let paused = st.stats.paused();
    let mut quarantined = crate::store::damage::quarantined(st.store.data_dir());
    if let Some(q) = st.stats.quarantined.lock().expect("lock").as_ref() {
        for f in quarantined.iter_mut().filter(|f| f.file == q.file) {
            f.reason = q.reason.clone();
        }
    }
    Ok(StatusOut {
        gateway: GatewayOut {
            id: cfg.gateway.id.clone(),
            district: cfg.gateway.district.clone(),
            street: cfg.gateway.street.clone(),
            community: cfg.gateway.community.clone(),
            compound: cfg.gateway.compound.clone(),
        },
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: st.stats.started.elapsed().as_secs(),
        now: rfc3339_utc(now),
        today,
        hourly,
        devices,
        intake: IntakeOut {
            paused: paused.is_some(),
            reason: paused.as_ref().map(|p| p.reason.as_str()),
            detail: paused.as_ref().map(|p| p.detail.clone()),
            since: paused.as_ref().map(|p| rfc3339_utc(p.since_ms)),
        },
        clock_offset_ms: st.stats.clock_offset_ms.load(Relaxed),
        links: st
            .stats
            .links()
            .into_iter()
            .map(|(k, l)| {
                (
                    k,
                    LinkOut {
                        since: rfc3339_utc(l.since_ms),
                        for_secs: (now - l.since_ms).max(0) / 1000,
                        url: l.url,
                        connected: l.connected,
                        reason: l.reason,
                        error: l.error,
                        attempts: l.attempts,
                    },
                )
            })
            .collect(),
        site_problem: st.stats.site_problem(),
        link_problems: st.stats.link_problems(),
        upstream: UpstreamOut {
            connected: st.stats.upstream_connected.load(Relaxed),
            epoch: st.stats.upstream_epoch.load(Relaxed),
            pending_summaries: o.pending_summaries,
            pending_alerts: o.pending_alerts,
            parked: o.parked,
            oldest_pending_window: o.oldest_pending_window_ms.map(rfc3339_utc),
            oldest_pending_secs: o.oldest_pending_window_ms.map(|t| (now - t).max(0) / 1000),
            learned_max_packet: Some(st.stats.upstream_learned_max_packet.load(Relaxed))
                .filter(|b| *b > 0),
        },
        store: StoreOut {
            bytes: o.file_bytes,
            max_bytes: cfg.store.max_size.0,
            raw_events: o.raw_events,
            dedup_keys: o.dedup_keys,
            dropped: DroppedOut {
                summaries: o.dropped_summaries,
                alerts: o.dropped_alerts,
                dedup_keys: o.dropped_dedup_keys,
                raw_events: o.evicted_events,
            },
            quarantined,
            error: store_error,
        },
        counters: st.stats.counters(),
        recent_alerts: st
            .stats
            .recent_alerts()
            .into_iter()
            .rev()
            .map(|a| AlertOut {
                at: rfc3339_utc(a.at_ms),
                kind: a.kind,
                device: a.device,
                action: a.action,
                id: a.id,
            })
            .collect(),
        care: st
            .stats
            .care()
            .into_iter()
            .map(|c| CareOut {
                alias: c.alias,
                last_seen: c.last_seen_ms.map(rfc3339_utc),
                silent_for_secs: c.last_seen_ms.map(|l| (now - l) / 1000),
                silent: c.silent,
                silence_secs: c.silence_ms / 1000,
                unmatched: c.key_lost.then_some("care_key_lost"),
            })
            .collect(),
        keys_lost: st
            .stats
            .keys_lost()
            .into_iter()
            .map(|k| KeyLostOut {
                kind: match k.key.as_str() {
                    crate::keys::CARE_KEY => "care",
                    crate::keys::PRESENCE_KEY => "presence",
                    _ => "day",
                },
                key: k.key,
                date: k.date,
                detected: rfc3339_utc(k.detected_ms),
                until: k.until_ms.map(rfc3339_utc),
                unmatched: k.unmatched,
            })
            .collect(),
        recent_rejects: st
            .stats
            .recent_rejects()
            .into_iter()
            .rev()
            .map(|r| RejectOut {
                at: rfc3339_utc(r.at_ms),
                topic: r.topic,
                reason: r.reason,
                detail: r.detail,
            })
            .collect(),
        config: st.stats.config_view(),
        occupancy: st.stats.occupancy(),
        tz_secs: tz,
    })
}

pub(super) async fn snapshot_blocking(st: AppState) -> Result<StatusOut, Response> {
    tokio::task::spawn_blocking(move || snapshot(&st))
        .await
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "snapshot task failed\n").into_response())?
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response())
}
