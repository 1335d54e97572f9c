//! The HTML page: server-rendered from a [`StatusOut`] snapshot, Chinese first (`?lang=en`
//! English), inline CSS and an inline SVG chart, nothing from the internet; readable at 390 px.
//! Templates are maud's `html!` (compile-time checked, every value escaped), one function per
//! section; labels are one typed table ([`L`]).

pub(super) use super::labels::{t, tk, L};
use super::*;
use maud::{html, Markup, PreEscaped};

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

/// An age in words: "5 s", "3 min", "2 h", "4 d" (en) or "5 秒", "3 分钟", "2 小时", "4 天".
pub(super) fn age(secs: i64, en: bool) -> String {
    let secs = secs.max(0);
    let (n, zh, e) = if secs < 60 {
        (secs, "秒", "s")
    } else if secs < 3600 {
        (secs / 60, "分钟", "min")
    } else if secs < 86_400 {
        (secs / 3600, "小时", "h")
    } else {
        (secs / 86_400, "天", "d")
    };
    if en {
        format!("{n} {e}")
    } else {
        format!("{n} {zh}")
    }
}

/// A reject reason (`too_late`, ...) in the page's language.
pub(super) fn reject_label(en: bool, reason: &str) -> String {
    let zh = match reason {
        "invalid_json" => "不是有效的 JSON",
        "invalid_topic" => "主题格式不对",
        "invalid_ts" => "时间戳无效",
        "invalid_id" => "事件编号无效",
        "invalid_action" => "动作无效",
        "invalid_result" => "结果无效",
        "invalid_subject" => "人员/车牌字段无效",
        "topic_mismatch" => "内容与主题不符",
        "too_late" => "太迟（窗口已关闭太久）",
        "too_far_future" => "时间超前太多",
        "too_large" => "消息过大",
        "unmapped" => "无法映射",
        _ => return reason.replace('_', " "),
    };
    if en {
        reason.replace('_', " ")
    } else {
        zh.to_string()
    }
}

pub(super) fn kind_label(en: bool, k: Kind) -> &'static str {
    match k {
        Kind::Access => t(en, L::Access),
        Kind::Vehicle => t(en, L::Vehicle),
        Kind::Camera => t(en, L::CameraK),
    }
}

pub(super) fn action_label(en: bool, action: &str) -> String {
    let zh = match action {
        "stranger" => "陌生人",
        "loitering" => "徘徊",
        "high_altitude_throw" => "高空抛物",
        "fire_lane_blocked" => "消防通道占用",
        "intrusion" => "闯入",
        "entry" => "进入",
        "exit" => "离开",
        _ => return action.to_string(),
    };
    if en {
        action.replace('_', " ")
    } else {
        zh.to_string()
    }
}

/// Local wall time `HH:MM` (or with the date when `date`).
pub(super) fn local(ms: i64, tz: i32, date: bool) -> String {
    let s = rfc3339_utc(ms + i64::from(tz) * 1000);
    // "YYYY-MM-DDTHH:MM:SS[.mmm]Z"
    if date {
        format!("{} {}", &s[5..10], &s[11..16])
    } else {
        s[11..16].to_string()
    }
}

pub(super) fn local_rfc(rfc: &Option<String>, tz: i32, en: bool) -> String {
    match rfc.as_deref().and_then(|r| {
        time::OffsetDateTime::parse(r, &time::format_description::well_known::Rfc3339).ok()
    }) {
        Some(t) => local((t.unix_timestamp_nanos() / 1_000_000) as i64, tz, true),
        None => t(en, L::Never).to_string(),
    }
}

/// One bar of the chart: y, height, count, class.
type Bar = (f64, f64, u64, &'static str);

/// The hourly chart: an inline SVG of stacked bars (access, vehicles, camera) per hour.
pub(super) fn chart(s: &StatusOut, en: bool) -> Markup {
    let (w, h, pad) = (720.0f64, 200.0f64, 28.0f64);
    let max = s
        .hourly
        .iter()
        .map(|b| b.access + b.vehicle + b.camera)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bw = (w - pad) / 24.0;
    let f1 = |v: f64| format!("{v:.1}");
    // Per hour: its x, and its stacked bars bottom up.
    let hours: Vec<(f64, Vec<Bar>)> = s
        .hourly
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let x = pad + i as f64 * bw + 2.0;
            let mut y = h;
            let mut bars = Vec::new();
            for (n, class) in [(b.access, "a"), (b.vehicle, "v"), (b.camera, "c")] {
                if n > 0 {
                    let bh = (n as f64 / max) * (h - 16.0);
                    y -= bh;
                    bars.push((y, bh, n, class));
                }
            }
            (x, bars)
        })
        .collect();
    html! {
        svg data-chart="hourly" viewBox=(format!("0 0 {w} {}", h + 20.0)) role="img"
            aria-label=(t(en, L::Hourly)) preserveAspectRatio="none" {
            line x1=(pad) y1=(h) x2=(w) y2=(h) class="axis" {}
            text x="0" y="12" class="lbl" { (max as u64) }
            @for (i, (x, bars)) in hours.iter().enumerate() {
                @for (y, bh, n, class) in bars {
                    rect x=(f1(*x)) y=(f1(*y)) width=(f1(bw - 4.0)) height=(f1(*bh)) class=(class) {
                        title { (n) }
                    }
                }
                @if i % 3 == 0 {
                    text x=(f1(*x)) y=(h + 16.0) class="lbl" { (local(s.hourly[i].start_ms, s.tz_secs, false)) }
                }
            }
        }
    }
}

/// "5 min ago" (en) or "5 分钟前".
fn ago(secs: i64, en: bool) -> String {
    if en {
        format!("{} {}", age(secs, en), t(en, L::Ago))
    } else {
        format!("{}{}", age(secs, en), t(en, L::Ago))
    }
}

/// The overall state (`broken`, `attention`, `ok`) and its first reason: broken when nothing is
/// being collected, attention when something needs a look.
fn overall(s: &StatusOut, en: bool, alarms: bool) -> (&'static str, String) {
    let site_down = s
        .links
        .get(&crate::link::Link::Site)
        .filter(|l| !l.connected);
    let offline = s.devices.iter().filter(|d| !d.online).count();
    let district_down = s
        .links
        .get(&crate::link::Link::District)
        .filter(|l| !l.connected);
    let down = |label: L, l: &super::report::LinkOut| {
        format!(
            "{}：{} {} {}",
            t(en, label),
            tk(en, l.reason.unwrap_or("closed")),
            t(en, L::For),
            age(l.for_secs, en)
        )
    };
    if s.intake.paused {
        ("broken", t(en, L::Paused).to_string())
    } else if let Some(l) = site_down {
        // A moment's reconnect is worth a look; longer, nothing is being collected.
        let state = if l.for_secs >= 10 {
            "broken"
        } else {
            "attention"
        };
        (state, down(L::SiteBroker, l))
    } else if alarms {
        ("attention", t(en, L::Attention).to_string())
    } else if let Some(l) = district_down.filter(|l| l.for_secs >= 10) {
        ("attention", down(L::DistrictBroker, l))
    } else if offline > 0 {
        (
            "attention",
            format!("{offline} {}", t(en, L::DevicesOffline)),
        )
    } else {
        ("ok", String::new())
    }
}

/// What needs attention: paused intake, clock steps, link problems, quarantined store files,
/// parked messages, drops under pressure. One `li` each.
fn alarms(s: &StatusOut, en: bool) -> Vec<Markup> {
    let mut out = Vec::new();
    if s.intake.paused {
        out.push(html! {
            li data-intake-paused=(s.intake.reason.unwrap_or("")) {
                b { (t(en, L::Paused)) } " (" (tk(en, s.intake.reason.unwrap_or("disk_error"))) ") "
                (t(en, L::Since)) " " (local_rfc(&s.intake.since, s.tz_secs, en)) " · "
                @if en { (s.intake.detail.as_deref().unwrap_or("")) }
            }
        });
    }
    if s.clock_offset_ms.abs() > crate::core::clock::STEP_MS {
        let l = if s.clock_offset_ms > 0 {
            L::ClockBack
        } else {
            L::ClockAhead
        };
        out.push(html! {
            li data-clock-step=(s.clock_offset_ms) {
                b { (t(en, l)) } " " (s.clock_offset_ms.abs() / 1000) " s"
            }
        });
    }
    if let Some(p) = &s.site_problem {
        out.push(html! {
            li data-site-problem {
                b { (t(en, L::SiteProblem)) } " "
                @if en { (p) } @else { (t(en, L::SiteProblemZh)) }
            }
        });
    }
    for (link, p) in &s.link_problems {
        let l = if *link == crate::link::Link::Site {
            L::SiteLink
        } else {
            L::DistrictLink
        };
        out.push(html! {
            li data-link-problem=(link) data-reason=(p.reason) {
                b { (t(en, l)) } " "
                @if en { (p.detail) } @else {
                    (tk(en, p.reason)) "：" (tk(en, &format!("fix_{}", p.reason)))
                }
            }
        });
    }
    for q in &s.store.quarantined {
        out.push(html! {
            li data-quarantined=(q.file) {
                b { (t(en, L::Quarantined)) } " " (q.file) " (" (format!("{:.1}", q.bytes as f64 / 1048576.0)) " MiB)"
                @if let Some(r) = q.reason.as_ref().filter(|_| en) { " · " (r) }
            }
        });
    }
    for k in &s.keys_lost {
        out.push(if k.kind == "presence" {
            html! {
                li data-keys-lost=(k.key) {
                    b { (t(en, L::KeysLostPresence)) } " · "
                    (t(en, L::Since)) " " (local_rfc(&Some(k.detected.clone()), s.tz_secs, en))
                }
            }
        } else if k.kind == "care" {
            html! {
                li data-keys-lost=(k.key) {
                    b { (t(en, L::KeysLostCare)) } " " (k.unmatched.join(" "))
                }
            }
        } else {
            html! {
                li data-keys-lost=(k.key) {
                    b { (t(en, L::KeysLostDay)) } " " (k.date.as_deref().unwrap_or("")) " · "
                    (t(en, L::Since)) " " (local_rfc(&Some(k.detected.clone()), s.tz_secs, en))
                }
            }
        });
    }
    if s.upstream.parked > 0 {
        out.push(html! {
            li data-parked=(s.upstream.parked) {
                b { (t(en, L::Parked)) } " " (s.upstream.parked)
            }
        });
    }
    let d = &s.store.dropped;
    if d.summaries + d.alerts + d.dedup_keys + d.raw_events > 0 {
        out.push(html! {
            li data-dropped=(d.summaries + d.alerts) {
                b { (t(en, L::Dropped)) } " " (t(en, L::Pending)) " " (d.summaries)
                " · " (t(en, L::PendingAlerts)) " " (d.alerts)
                " · " (t(en, L::DedupDropped)) " " (d.dedup_keys)
                " · " (t(en, L::RawDropped)) " " (d.raw_events)
            }
        });
    }
    out
}

/// The page (maud templates below, one function per section; every value is escaped by maud).
pub(super) fn render(s: &StatusOut, en: bool, refresh: u64) -> String {
    let site: Vec<&str> = [&s.gateway.district, &s.gateway.street, &s.gateway.community]
        .into_iter()
        .filter_map(|x| x.as_deref())
        .collect();
    let name = s
        .gateway
        .compound
        .clone()
        .unwrap_or_else(|| s.gateway.id.clone());
    let alarms = alarms(s, en);
    let (state, first) = overall(s, en, !alarms.is_empty());
    let page = html! {
        (PreEscaped("<!doctype html>"))
        html lang=(if en { "en" } else { "zh-CN" }) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width,initial-scale=1";
                meta http-equiv="refresh" content=(refresh);
                title { (t(en, L::Title)) " · " (name) }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    h1 { (name) " " small { (t(en, L::Title)) } }
                    p {
                        @if !site.is_empty() { (site.join(" ")) " · " }
                        (s.gateway.id) " · v" (s.version) " · " (t(en, L::Updated)) " "
                        (local_rfc(&Some(s.now.clone()), s.tz_secs, en))
                    }
                    a class="lang" href=(format!("?lang={}", if en { "zh" } else { "en" })) { (t(en, L::OtherLang)) }
                }
                div class=(format!("banner {state}")) data-state=(state) {
                    b { (tk(en, &format!("state_{state}"))) } " " (first)
                }
                @if !alarms.is_empty() {
                    section class="alarm" {
                        h2 { (t(en, L::Attention)) }
                        ul { @for a in &alarms { (a) } }
                    }
                }
                (links(s, en))
                (today(s, en))
                @if let Some(o) = &s.occupancy { (occupancy(o, s.tz_secs, en)) }
                section {
                    h2 { (t(en, L::Hourly)) }
                    (chart(s, en))
                    p class="legend" {
                        i class="a" {} (t(en, L::Access)) " " i class="v" {} (t(en, L::Vehicle)) " "
                        i class="c" {} (t(en, L::CameraK))
                    }
                }
                (devices(s, en))
                (upstream(s, en))
                @if s.config.trust.is_some() || s.config.serial.is_some() || s.config.problem.is_some() { (config(s, en)) }
                (alerts(s, en))
                @if !s.care.is_empty() { (care(s, en)) }
                (rejects(s, en))
            }
        }
    };
    page.into_string()
}

/// Both links: connected or not, for how long, why not.
fn links(s: &StatusOut, en: bool) -> Markup {
    html! {
        section {
            h2 { (t(en, L::Links)) }
            div class="cards" {
                @for (key, label) in [
                    (crate::link::Link::Site, L::SiteBroker),
                    (crate::link::Link::District, L::DistrictBroker),
                ] {
                    @if let Some(l) = s.links.get(&key) {
                        div class="card" data-link=(key) data-connected=(l.connected) {
                            h3 { (t(en, label)) }
                            div class="small" {
                                b class=(if l.connected { "ok" } else { "bad" }) {
                                    (t(en, if l.connected { L::Connected } else { L::Disconnected }))
                                }
                                span { (t(en, L::For)) " " (age(l.for_secs, en)) }
                            }
                            p class="muted" {
                                (l.url)
                                @if !l.connected {
                                    " · " (tk(en, l.reason.unwrap_or("closed")))
                                    @if l.attempts > 0 { " · " (l.attempts) " " (t(en, L::Attempts)) }
                                    @if en { @if let Some(e) = &l.error { " · " (e) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Today's counts: people and vehicles in and out, camera incidents.
fn today(s: &StatusOut, en: bool) -> Markup {
    let cam = s.today.get("camera").cloned().unwrap_or_default();
    html! {
        section {
            h2 { (t(en, L::Today)) }
            div class="cards" {
                @for (kind, group, entry, exit) in [
                    ("access", L::People, L::EntryP, L::ExitP),
                    ("vehicle", L::Vehicles, L::EntryV, L::ExitV),
                ] {
                    @let m = s.today.get(kind).cloned().unwrap_or_default();
                    div class="card" {
                        h3 { (t(en, group)) }
                        @for (action, label) in [("entry", entry), ("exit", exit)] {
                            div class="big" {
                                span { (t(en, label)) }
                                b data-count=(format!("{kind}:{action}")) { (m.get(action).copied().unwrap_or(0)) }
                            }
                        }
                        @for (action, n) in m.iter().filter(|(a, _)| *a != "entry" && *a != "exit") {
                            div class="small" {
                                span { (action_label(en, action)) }
                                b data-count=(format!("{kind}:{action}")) { (n) }
                            }
                        }
                    }
                }
                div class="card" {
                    h3 { (t(en, L::Camera)) }
                    @if cam.is_empty() { p class="muted" { (t(en, L::None)) } }
                    @for (action, n) in &cam {
                        div class="small" {
                            span { (action_label(en, action)) }
                            b data-count=(format!("camera:{action}")) { (n) }
                        }
                    }
                }
            }
        }
    }
}

/// Devices: offline first (the list comes sorted), with ages and today's counts; then how many
/// were forgotten and why.
fn devices(s: &StatusOut, en: bool) -> Markup {
    let f = &s.counters.devices_forgotten;
    let n = |k: &str| f.get(k).copied().unwrap_or(0);
    html! {
        section {
            h2 { (t(en, L::Devices)) }
            div class="scroll" {
                table class="dev" {
                    tr {
                        th { (t(en, L::Name)) } th { (t(en, L::State)) } th { (t(en, L::LastSeen)) }
                        th { (t(en, L::TodayN)) } th class="wide" { (t(en, L::Kind)) }
                        th { (t(en, L::LastError)) } th class="wide" { (t(en, L::Values)) }
                    }
                    @for d in &s.devices {
                        @let seen = match d.last_seen_secs_ago {
                            Some(a) => ago(a, en),
                            None => t(en, L::Never).to_string(),
                        };
                        @let err = match (&d.last_error, d.source) {
                            (None, _) => String::new(),
                            (Some(e), "mqtt") => reject_label(en, e),
                            (Some(e), _) if en => e.clone(),
                            (Some(_), _) => t(en, L::PollFailed).to_string(),
                        };
                        @let states: Vec<String> = d.states.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        tr data-device=(d.name) data-online=(d.online) {
                            td {
                                (d.name)
                                @if let Some(a) = d.clock_ahead_secs.filter(|_| d.clock_skew) {
                                    " "
                                    span class="bad" data-clock-skew=(a) title=(t(en, L::ClockSkewNote)) {
                                        (t(en, L::ClockSkew)) " " (age(a, en))
                                    }
                                }
                            }
                            td class=(if d.online { "ok" } else { "bad" }) {
                                (t(en, if d.online { L::Online } else { L::Offline }))
                            }
                            td { (seen) }
                            td data-today=(d.today) { (d.today) }
                            td class="wide" {
                                (kind_label(en, d.kind)) " · " (if d.source == "mqtt" { "MQTT" } else { "Modbus" })
                            }
                            td { (err) }
                            td class="wide" { (states.join(" ")) }
                        }
                    }
                }
            }
            @if f.values().any(|v| *v > 0) {
                p class="small muted" data-forgotten-bound=(n("bound"))
                    data-forgotten-unmapped=(n("unmapped")) data-forgotten-installer=(n("installer")) {
                    (t(en, L::Forgotten)) "：" (t(en, L::ForgottenBound)) " " (n("bound")) "，"
                    (t(en, L::ForgottenUnmapped)) " " (n("unmapped")) "，"
                    (t(en, L::ForgottenInstaller)) " " (n("installer"))
                }
            }
        }
    }
}

/// The district link, the backlog and the store's size.
fn upstream(s: &StatusOut, en: bool) -> Markup {
    let u = &s.upstream;
    html! {
        section {
            h2 { (t(en, L::Upstream)) }
            div class="cards" {
                div class="card" {
                    div class="small" {
                        span { (t(en, L::Link)) }
                        b data-upstream=(if u.connected { "connected" } else { "disconnected" })
                            class=(if u.connected { "ok" } else { "bad" }) {
                            (t(en, if u.connected { L::Connected } else { L::Disconnected }))
                        }
                    }
                    div class="small" {
                        span { (t(en, L::Pending)) }
                        b data-pending-summaries=(u.pending_summaries) { (u.pending_summaries) }
                    }
                    div class="small" { span { (t(en, L::PendingAlerts)) } b { (u.pending_alerts) } }
                    div class="small" {
                        span { (t(en, L::Oldest)) }
                        b { (u.oldest_pending_secs.map(|a| ago(a, en)).unwrap_or_else(|| "—".into())) }
                    }
                    div class="small" {
                        span { (t(en, L::Store)) }
                        b { (format!("{:.1}", s.store.bytes as f64 / 1048576.0)) " MiB" }
                    }
                }
            }
        }
    }
}

/// Vehicles inside: how many, free spaces, long stays (plate masked to two and two
/// characters), missed and unmatched exits, the last stocktake.
fn occupancy(o: &crate::stats::OccupancyView, tz: i32, en: bool) -> Markup {
    html! {
        section data-occupancy=(o.inside) {
            h2 { (t(en, L::Occupancy)) }
            div class="cards" {
                div class="card" {
                    div class="small" { span { (t(en, L::OccInside)) } b data-inside=(o.inside) { (o.inside) } }
                    @if let (Some(c), Some(f)) = (o.capacity, o.free) {
                        div class="small" { span { (t(en, L::OccCapacity)) } b { (c) } }
                        div class="small" {
                            span { (t(en, L::OccFree)) }
                            b data-free=(f) class=(if f == 0 { "bad" } else { "ok" }) { (f) }
                        }
                    }
                    div class="small" { span { (t(en, L::OccLong)) } b { (o.long_stay) } }
                    div class="small" { span { (t(en, L::OccMissed)) } b { (o.missed_exits) } }
                    div class="small" { span { (t(en, L::OccUnmatched)) } b { (o.unmatched_exits) } }
                    @if let (Some(n), Some(at)) = (o.stocktake_count, &o.stocktake_at) {
                        div class="small" {
                            span { (t(en, L::OccStocktake)) }
                            b { (n) } " · " (local_rfc(&Some(at.clone()), tz, en))
                        }
                    }
                }
            }
            p class="muted" { (t(en, L::OccHelp)) }
            @if !o.long_stays.is_empty() {
                table {
                    tr { th { (t(en, L::OccPlate)) } th { (t(en, L::OccEntry)) } th { (t(en, L::OccGate)) } }
                    @for l in o.long_stays.iter().take(50) {
                        tr {
                            td { (l.plate) }
                            td { (local_rfc(&Some(l.entry.clone()), tz, en)) }
                            td { (l.gate) }
                        }
                    }
                }
            }
        }
    }
}

/// Where the running config came from: the file, or the district's change (serial, probation
/// or in force, the keys it sets), and the last change rolled back or refused, with why.
fn config(s: &StatusOut, en: bool) -> Markup {
    let c = &s.config;
    let event = |l: L, e: &crate::stats::ConfigEvent, class: &'static str| {
        html! {
            div class="small" {
                span { (t(en, l)) }
                b class=(class) { (e.serial) } " " (e.reason) " · " (local_rfc(&Some(e.at.clone()), s.tz_secs, en))
            }
        }
    };
    html! {
        section data-config-source=(c.source) {
            h2 { (t(en, L::Config)) }
            div class="cards" {
                div class="card" {
                    div class="small" {
                        span { (t(en, L::ConfigSource)) }
                        b { (t(en, if c.source == "fleet" { L::ConfigFleet } else { L::ConfigFile })) }
                    }
                    @if let Some(n) = c.serial {
                        div class="small" {
                            span { (t(en, L::ConfigSerial)) }
                            b data-config-serial=(n) { (n) } " "
                            @if c.state == Some("probation") {
                                span class="warn" { (t(en, L::ConfigProbation)) }
                            } @else {
                                span class="ok" { (t(en, L::ConfigApplied)) }
                            }
                            @if let Some(since) = &c.since { " · " (local_rfc(&Some(since.clone()), s.tz_secs, en)) }
                        }
                        div class="small" { span { (t(en, L::ConfigKeys)) } b { (c.keys.join(", ")) } }
                    }
                    @if let Some(p) = &c.problem {
                        div class="small" { b class="bad" { (t(en, L::ConfigProblem)) } " " (p) }
                    }
                    @if let Some(e) = &c.rolled_back { (event(L::ConfigRolledBack, e, "bad")) }
                    @if let Some(e) = &c.rejected { (event(L::ConfigRejected, e, "warn")) }
                    @if let Some(k) = &c.trust {
                        div class="small" { span { (t(en, L::ConfigTrust)) } code { (k) } }
                    }
                }
            }
        }
    }
}

/// Recent alerts; alerts leave oldest first, so the newest `pending_alerts` are undelivered.
fn alerts(s: &StatusOut, en: bool) -> Markup {
    let undelivered = s.upstream.pending_alerts as usize;
    html! {
        section {
            h2 { (t(en, L::Alerts)) }
            table {
                tr { th { (t(en, L::Time)) } th { (t(en, L::Device)) } th { (t(en, L::Type)) } }
                @for (i, a) in s.recent_alerts.iter().take(20).enumerate() {
                    @let pending = i < undelivered;
                    tr data-alert=(a.action) data-pending=(pending) {
                        td { (local_rfc(&Some(a.at.clone()), s.tz_secs, en)) }
                        td { (a.device) }
                        td {
                            (action_label(en, &a.action))
                            @if pending { " " b class="bad" { (t(en, L::Undelivered)) } }
                        }
                    }
                }
            }
        }
    }
}

/// The care watch: silent residents first.
fn care(s: &StatusOut, en: bool) -> Markup {
    let mut list: Vec<&super::report::CareOut> = s.care.iter().collect();
    list.sort_by_key(|c| !c.silent);
    html! {
        section data-care {
            h2 { (t(en, L::Care)) }
            table {
                tr { th { (t(en, L::Flat)) } th { (t(en, L::LastPass)) } th { (t(en, L::CareState)) } }
                @for c in list {
                    tr data-care-alias=(c.alias) class=[c.silent.then_some("bad")] data-unmatched=[c.unmatched] {
                        td { (c.alias) }
                        td {
                            @match (&c.last_seen, c.silent_for_secs) {
                                (Some(_), Some(secs)) => { (age(secs, en)) " " (if en { "ago" } else { "前" }) }
                                _ => { (t(en, L::CareNever)) }
                            }
                        }
                        td {
                            @if c.unmatched.is_some() {
                                b class="bad" { (t(en, L::CareKeyLost)) }
                            } @else if c.silent {
                                b class="bad" { (t(en, L::CareSilent)) }
                            } @else { (t(en, L::CareOk)) }
                        }
                    }
                }
            }
        }
    }
}

/// Recent rejects, with the reason in the page's language.
fn rejects(s: &StatusOut, en: bool) -> Markup {
    html! {
        section {
            h2 { (t(en, L::Rejects)) }
            table {
                tr { th { (t(en, L::Time)) } th { (t(en, L::Topic)) } th { (t(en, L::Reason)) } }
                @for r in s.recent_rejects.iter().take(20) {
                    tr {
                        td { (local_rfc(&Some(r.at.clone()), s.tz_secs, en)) }
                        td { (r.topic) }
                        td {
                            (reject_label(en, r.reason))
                            @if let Some(d) = &r.detail { br; small { (d) } }
                        }
                    }
                }
            }
        }
    }
}

pub(super) const CSS: &str = "body{font-family:system-ui,-apple-system,'PingFang SC','Noto Sans CJK SC','Microsoft YaHei',sans-serif;margin:0;background:#f4f6f8;color:#1d2329}\
header{background:#0b5394;color:#fff;padding:12px 16px;position:relative}header h1{margin:0;font-size:1.4em}header small{font-weight:normal;opacity:.8;font-size:.6em}\
header p{margin:4px 0 0;opacity:.85;font-size:.9em}.lang{position:absolute;right:16px;top:14px;color:#fff}\
section{background:#fff;margin:12px;padding:12px 16px;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}h2{font-size:1.1em;margin:0 0 8px}\
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{flex:1 1 220px;border:1px solid #e3e7eb;border-radius:6px;padding:8px 12px}.card h3{margin:0 0 6px;font-size:1em;color:#555}\
.big{display:flex;justify-content:space-between;font-size:1.3em;margin:2px 0}.small{display:flex;justify-content:space-between;margin:2px 0}\
table{width:100%;border-collapse:collapse;font-size:.92em}th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eee}\
.alarm{border:2px solid #c5221f;padding:0 .8em}.ok{color:#137333;font-weight:bold}.bad{color:#c5221f;font-weight:bold}.muted{color:#888}.warn{color:#b06000;font-weight:bold}\
svg{width:100%;height:auto;max-height:260px}.axis{stroke:#999}.lbl{font-size:11px;fill:#666}rect.a,.legend i.a{fill:#1a73e8;background:#1a73e8}\
rect.v,.legend i.v{fill:#f29900;background:#f29900}rect.c,.legend i.c{fill:#d93025;background:#d93025}.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}\
.banner{margin:12px;padding:10px 16px;border-radius:8px;font-size:1.05em}.banner.ok{background:#e6f4ea;color:#137333}\
.banner.attention{background:#fef7e0;color:#8a5a00;border:1px solid #f29900}.banner.broken{background:#fce8e6;color:#a50e0e;border:2px solid #c5221f}\
.scroll{overflow-x:auto}\
@media(max-width:600px){section,.banner{margin:8px;padding:8px}table{font-size:.85em}.wide{display:none}.lbl{font-size:26px}.cards{gap:8px}.card{flex-basis:100%}header .lang{position:static;display:inline-block;margin-top:4px}}";
