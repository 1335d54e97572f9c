//! `/metrics`: the Prometheus series derived from the shared counters and the store at scrape
//! time, in the classic text format scrapers and `promtool check metrics` read.

use super::*;

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples `x_total`.
/// Scrapers and `promtool check metrics` read the classic text format, where HELP and TYPE name
/// the sample (`x_total`) and there is no `# EOF`: rename counter families, drop the EOF line.
pub(super) fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Series derived from the shared counters and the store at scrape time.
pub(super) struct Metrics {
    pub(super) stats: Arc<Stats>,
    pub(super) store: Arc<Store>,
    /// `store.max_size`.
    pub(super) max_bytes: u64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The process's own figures from /proc (the `process_*` names the Prometheus client
/// libraries use, so stock dashboards work): resident and virtual memory (bytes), CPU
/// seconds, start time (Unix s), open file descriptors.
pub(super) fn process_figures() -> Option<(u64, u64, f64, f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let start_ticks: f64 = f.get(19)?.parse().ok()?;
    let vsize: u64 = f.get(20)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    Some((
        rss_pages * page,
        vsize,
        (utime + stime) / ticks,
        boot + start_ticks / ticks,
        fds,
    ))
}

pub(super) fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

pub(super) fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let c = s.counters();
        counter(
            &mut e,
            "zhian_events_received",
            "Device messages received",
            c.received,
        )?;
        counter(
            &mut e,
            "zhian_http_auth_failures",
            "Status page requests with wrong credentials",
            s.http_auth_failures.load(Relaxed),
        )?;
        counter(
            &mut e,
            "zhian_http_rate_limited",
            "Status page requests refused: too many failed logins from the address",
            s.http_rate_limited.load(Relaxed),
        )?;
        {
            let mut m = e.encode_descriptor(
                "zhian_events",
                "Device events by kind and committed outcome (accepted, duplicate, rejected)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for kind in Kind::ALL {
                for (outcome, v) in [
                    ("accepted", s.accepted_of(kind)),
                    ("duplicate", s.duplicate_of(kind)),
                    ("rejected", s.rejected_kind_of(Some(kind))),
                ] {
                    let labels = [("kind", kind.as_str()), ("outcome", outcome)];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
            let labels = [("kind", "unknown"), ("outcome", "rejected")];
            ConstCounter::new(s.rejected_kind_of(None)).encode(m.encode_family(&labels)?)?;
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_events_rejected",
                "Rejected device messages by reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in crate::core::event::Reject::ALL {
                let labels = [("reason", r.as_str())];
                ConstCounter::new(s.rejected_of(r)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_devices_forgotten",
                "Devices forgotten from the device table, by reason: bound (health.max_devices reached, the longest silent made room; its events still counted), unmapped (its [[mqtt.sources]] entry is gone or changed), installer (zhian-gateway devices forget)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for f in crate::stats::Forgotten::ALL {
                let labels = [("reason", f.as_str())];
                ConstCounter::new(s.forgotten_of(f)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_events_counted_at_receipt",
                "Accepted events stamped more than aggregate.max_future_skew ahead of the trusted gateway clock, counted at the gateway's receive time (their devices are flagged clock_skew)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for kind in Kind::ALL {
                let labels = [("kind", kind.as_str())];
                ConstCounter::new(s.counted_at_receipt_of(kind))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut e,
            "zhian_commits",
            "Store write transactions",
            c.commits,
        )?;
        gauge(
            &mut e,
            "zhian_outbox_pending",
            "Summaries and alerts waiting for the district broker's PUBACK",
            s.outbox_pending.load(Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "zhian_upstream_connected",
            "1 while connected to the district broker",
            i64::from(s.upstream_connected.load(Relaxed)),
        )?;
        gauge(
            &mut e,
            "zhian_clock_offset_seconds",
            "Store clock less wall clock, whole seconds: positive after a wall-clock step back, negative while a step forward is not believed (windows keep the monotonic pace)",
            s.clock_offset_ms.load(Relaxed) / 1000,
        )?;
        {
            let lost = s.keys_lost();
            gauge(
                &mut e,
                "zhian_keys_lost",
                "Keys the key dir lost while the daemon was stopped that still matter: days whose distinct counts span two keys (until the day can no longer change), the care key while residents listed by its pseudonyms are listed, the presence key until a stocktake",
                lost.len() as i64,
            )?;
            gauge(
                &mut e,
                "zhian_care_unmatched",
                "Care residents listed by a pseudonym of a lost care key: never matched again (no silent notice) until relisted",
                lost.iter().map(|k| k.unmatched.len()).sum::<usize>() as i64,
            )?;
        }
        if let Some(o) = s.occupancy() {
            gauge(
                &mut e,
                "zhian_vehicles_inside",
                "Vehicles inside the compound (实有车辆): the presence set plus the last stocktake's adjustment",
                o.inside as i64,
            )?;
            if let Some(free) = o.free {
                gauge(
                    &mut e,
                    "zhian_parking_free",
                    "Free parking spaces: occupancy.capacity less the vehicles inside, never below 0",
                    free as i64,
                )?;
            }
            gauge(
                &mut e,
                "zhian_vehicles_long_stay",
                "Vehicles inside for at least occupancy.long_stay",
                o.long_stay as i64,
            )?;
            gauge(
                &mut e,
                "zhian_vehicles_missed_exits",
                "Stays dropped past occupancy.max_stay (an exit the cameras did not read), since the store began",
                o.missed_exits as i64,
            )?;
        }
        {
            let c = s.config_view();
            gauge(
                &mut e,
                "zhian_config_serial",
                "The fleet serial the box runs (on probation or applied); 0 while it runs its own file alone",
                c.serial.unwrap_or(0) as i64,
            )?;
            gauge(
                &mut e,
                "zhian_config_probation",
                "1 while a fleet change is on probation (the box rolls it back itself on a failed health rule)",
                i64::from(c.state == Some("probation")),
            )?;
            gauge(
                &mut e,
                "zhian_config_rolled_back_serial",
                "The serial of the last fleet change this box rolled back (0: none); a change of value is a rollback",
                c.rolled_back.as_ref().map_or(0, |r| r.serial as i64),
            )?;
        }
        gauge(
            &mut e,
            "zhian_site_connected",
            "1 while connected to the site (device) broker",
            i64::from(s.site_connected.load(Relaxed)),
        )?;
        {
            let mut m = e.encode_descriptor(
                "zhian_build_info",
                "Version and target of this build (always 1)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            let labels = [
                ("version", env!("CARGO_PKG_VERSION")),
                ("target", env!("BUILD_TARGET_TRIPLE")),
            ];
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        gauge(
            &mut e,
            "zhian_outbox_parked",
            "Messages the district broker kept refusing, kept on the box and not sent again",
            s.outbox_parked.load(Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "zhian_upstream_max_packet_bytes",
            "The packet size summaries are sent under: upstream.max_packet_size, or the smaller limit learned from the district broker (it closed the connection on a larger message)",
            s.upstream_max_packet.load(Relaxed) as i64,
        )?;
        counter(
            &mut e,
            "zhian_upstream_published",
            "Summaries and alerts acknowledged by the district broker",
            s.upstream_published.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "zhian_store_bytes",
            "Size of the store file",
            s.store_bytes.load(Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "zhian_store_max_bytes",
            "store.max_size: the data dir stays within it",
            self.max_bytes as i64,
        )?;
        if let Ok(o) = self.store.overview() {
            {
                let mut m = e.encode_descriptor(
                    "zhian_outbox_pending_by_class",
                    "Upstream messages waiting for their PUBACK, by class",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                for (class, v) in [
                    ("alert", o.pending_alerts),
                    ("summary", o.pending_summaries),
                ] {
                    ConstGauge::new(v as i64).encode(m.encode_family(&[("class", class)])?)?;
                }
            }
            gauge(
                &mut e,
                "zhian_outbox_oldest_pending_seconds",
                "Age of the oldest window still waiting to be delivered upstream (0: none)",
                o.oldest_pending_window_ms
                    .map_or(0, |t| (now_ms() - t).max(0) / 1000),
            )?;
            let mut m = e.encode_descriptor(
                "zhian_dropped",
                "Dropped under disk pressure since the store was created (summaries and alerts: never delivered)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (what, v) in [
                ("summaries", o.dropped_summaries),
                ("alerts", o.dropped_alerts),
                ("dedup_keys", o.dropped_dedup_keys),
                ("raw_events", o.evicted_events),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&[("what", what)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_link_connected",
                "1 while the link is connected (site: the device broker; district: upstream)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (link, l) in s.links() {
                ConstGauge::new(i64::from(l.connected))
                    .encode(m.encode_family(&[("link", link.as_str())])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_link_down",
                "1 for the reason the link is down (connecting, unreachable, closed, refused, tls, identity_taken), 0 for the others",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (link, l) in s.links() {
                for reason in crate::link::DOWN_REASONS {
                    let v = i64::from(!l.connected && l.reason == Some(reason));
                    ConstGauge::new(v)
                        .encode(m.encode_family(&[("link", link.as_str()), ("reason", reason)])?)?;
                }
            }
        }
        if let Some((rss, vsize, cpu, start, fds)) = process_figures() {
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss as i64,
            )?;
            gauge(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize as i64,
            )?;
            gauge(
                &mut e,
                "process_open_fds",
                "Open file descriptors",
                fds as i64,
            )?;
            let g = prometheus_client::metrics::gauge::ConstGauge::new(start);
            let m = e.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, seconds",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
            let c = ConstCounter::new(cpu);
            let m = e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        {
            let problems = s.link_problems();
            let mut m = e.encode_descriptor(
                "zhian_link_problem",
                "1 while a link fails for a reason that needs an operator (refused, tls, identity_taken)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for link in crate::link::Link::ALL {
                for reason in crate::link::PROBLEM_REASONS {
                    let v = i64::from(problems.get(&link).is_some_and(|p| p.reason == reason));
                    ConstGauge::new(v)
                        .encode(m.encode_family(&[("link", link.as_str()), ("reason", reason)])?)?;
                }
            }
        }
        {
            let paused = s.paused();
            let mut m = e.encode_descriptor(
                "zhian_intake_paused",
                "1 while intake is paused for this reason (nothing acknowledged meanwhile)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for reason in crate::stats::PauseReason::ALL {
                let v = i64::from(paused.as_ref().is_some_and(|p| p.reason == reason));
                ConstGauge::new(v).encode(m.encode_family(&[("reason", reason.as_str())])?)?;
            }
        }
        let now = now_ms();
        let devices = crate::health::devices(s, now);
        {
            let mut m = e.encode_descriptor(
                "zhian_device_up",
                "1 if the device is online (MQTT: reported within its [health] cadence; Modbus: its last polls good)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for d in &devices {
                let labels = [
                    ("device", d.name.as_str()),
                    ("kind", d.kind.as_str()),
                    ("source", d.source),
                ];
                ConstGauge::new(i64::from(d.online)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_device_last_seen_timestamp_seconds",
                "When the device was last seen (an accepted event, a good poll), Unix seconds",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for d in &devices {
                let Some(t) = d.last_seen_ms else { continue };
                let labels = [
                    ("device", d.name.as_str()),
                    ("kind", d.kind.as_str()),
                    ("source", d.source),
                ];
                ConstGauge::new(t / 1000).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_device_clock_skew",
                "1 while the MQTT device's latest event was stamped more than aggregate.max_future_skew ahead of the trusted gateway clock (counted at receipt)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for d in devices.iter().filter(|d| d.source == "mqtt") {
                let labels = [("device", d.name.as_str()), ("kind", d.kind.as_str())];
                ConstGauge::new(i64::from(d.clock_skew)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_modbus_poll_errors",
                "Failed Modbus polls (timeouts, exceptions, transport errors) per device",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, h) in s.modbus() {
                let labels = [("device", name.as_str())];
                ConstCounter::new(h.errors).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_modbus_polls",
                "Successful Modbus polls per device",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, h) in s.modbus() {
                let labels = [("device", name.as_str())];
                ConstCounter::new(h.polls).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
