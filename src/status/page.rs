//! The HTML page: server-rendered from a [`StatusOut`] snapshot, Chinese first (`?lang=en`
//! English), inline CSS and an inline SVG chart, nothing from the internet; readable at 390 px.

use super::*;

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Labels, Chinese first.
pub(super) fn t(en: bool, key: &str) -> &'static str {
    let (zh, e) = match key {
        "title" => ("智安小区网关", "Smart-compound gateway"),
        "today" => ("今日统计", "Today"),
        "people" => ("人员进出", "People"),
        "vehicles" => ("车辆进出", "Vehicles"),
        "camera" => ("摄像头事件", "Camera incidents"),
        "entry_p" => ("进入", "Entries"),
        "exit_p" => ("离开", "Exits"),
        "entry_v" => ("驶入", "Vehicles in"),
        "exit_v" => ("驶出", "Vehicles out"),
        "none" => ("无", "none"),
        "hourly" => ("近24小时（每小时）", "Last 24 hours (hourly)"),
        "devices" => ("设备", "Devices"),
        "name" => ("名称", "Name"),
        "kind" => ("类型", "Kind"),
        "source" => ("接入", "Source"),
        "state" => ("状态", "State"),
        "online" => ("在线", "Online"),
        "offline" => ("离线", "Offline"),
        "last_seen" => ("最后上报", "Last seen"),
        "last_error" => ("最近错误", "Last error"),
        "values" => ("状态值", "Values"),
        "never" => ("从未", "never"),
        "upstream" => ("上级平台", "District platform"),
        "link" => ("连接", "Link"),
        "connected" => ("已连接", "Connected"),
        "disconnected" => ("未连接", "Disconnected"),
        "pending" => ("待发送汇总", "Pending summaries"),
        "pending_alerts" => ("待发送告警", "Pending alerts"),
        "oldest" => ("最早待发送窗口", "Oldest pending window"),
        "store" => ("本地存储", "Local store"),
        "attention" => ("需要处理", "Needs attention"),
        "site_problem" => ("现场代理订阅异常：", "Site broker subscription problem:"),
        "parked" => (
            "区级代理多次拒收、已搁置在本机的消息：",
            "Messages the district broker kept refusing, parked on the box:",
        ),
        "site_link" => ("现场代理连接需要处理：", "Site broker link needs action:"),
        "district_link" => ("区级平台连接需要处理：", "District link needs action:"),
        "paused" => (
            "数据接收已暂停，设备消息在现场代理中等待",
            "Intake paused: device messages wait in the site broker",
        ),
        "disk_full" => ("磁盘已满", "disk full"),
        "disk_error" => ("磁盘写入失败", "disk write failing"),
        "clock_untrusted" => ("网关时钟不可信", "gateway clock not trusted"),
        "clock_back" => (
            "网关时钟被调慢，窗口按单调时钟继续计时，差值：",
            "Gateway clock stepped back; windows keep the monotonic pace, off by",
        ),
        "clock_ahead" => (
            "网关时钟向前跳变，设备时间未证实，窗口按单调时钟计时，差值：",
            "Gateway clock jumped ahead, not confirmed by devices; windows keep the monotonic pace, off by",
        ),
        "since" => ("自", "since"),
        "quarantined" => (
            "存储文件损坏，已移至一旁并启用新存储：",
            "Damaged store file moved aside, fresh store started:",
        ),
        "dropped" => ("存储空间不足，已丢弃：", "Dropped for lack of space:"),
        "dedup_dropped" => ("去重记录", "dedup keys"),
        "raw_dropped" => ("原始事件", "raw events"),
        "alerts" => ("最近告警", "Recent alerts"),
        "rejects" => ("最近拒收", "Recent rejects"),
        "care" => ("独居老人关怀", "Care watch (residents living alone)"),
        "flat" => ("房号", "Flat"),
        "last_pass" => ("最近通行", "Last passed a door"),
        "care_state" => ("状态", "State"),
        "care_ok" => ("正常", "OK"),
        "care_silent" => ("超时未出现，请上门查看", "Silent: please check on them"),
        "care_never" => ("关注以来未出现", "not seen since the watch began"),
        "care_key_lost" => (
            "关怀密钥已丢失，无法匹配，请重新登记",
            "care key lost: cannot be matched, relist",
        ),
        "keys_lost_day" => (
            "密钥目录丢失了密钥：当日去重人数无法跨越丢失前后关联同一人（日报按密钥分别计数并标注），日期：",
            "The key dir lost keys: the day's distinct counts cannot link people across the loss (the daily message counts per key and says so), day:",
        ),
        "keys_lost_care" => (
            "关怀密钥丢失：以下按化名登记的住户再也无法匹配（不会误报未出现），请用新密钥重新登记：",
            "Care key lost: these residents listed by pseudonym can never be matched (no false silent notice); relist them with the new key:",
        ),
        "time" => ("时间", "Time"),
        "device" => ("设备", "Device"),
        "type" => ("类型", "Type"),
        "topic" => ("主题", "Topic"),
        "reason" => ("原因", "Reason"),
        "updated" => ("更新于", "Updated"),
        "other_lang" => ("English", "中文"),
        "access" => ("门禁", "Access"),
        "links" => ("连接", "Links"),
        "site_broker" => ("现场代理（设备）", "Site broker (devices)"),
        "district_broker" => ("区级平台", "District platform"),
        "connecting" => ("正在连接", "connecting"),
        "unreachable" => ("无法连接", "unreachable"),
        "closed" => ("连接中断", "connection lost"),
        "refused" => ("拒绝登录（用户名/密码或权限）", "refused (credentials or ACL)"),
        "tls" => ("TLS 证书问题", "TLS certificate problem"),
        "identity_taken" => ("客户端ID被另一台设备占用", "client id taken by another client"),
        "fix_refused" => ("请检查用户名和密码", "check the username and password"),
        "fix_tls" => (
            "请检查 ca_file、client_cert、client_key",
            "check ca_file, client_cert, client_key",
        ),
        "fix_identity_taken" => (
            "两台网关用了同一份配置？请为每台设置不同的 gateway.id",
            "two boxes from one config? give each its own gateway.id",
        ),
        "site_problem_zh" => (
            "现场代理未按 QoS 1 授予订阅（重启时可能丢消息）：请允许本客户端使用 QoS 1",
            "",
        ),
        "for" => ("已持续", "for"),
        "attempts" => ("次重试", "attempts"),
        "today_n" => ("今日", "Today"),
        "offline_for" => ("离线", "offline for"),
        "ago" => ("前", "ago"),
        "undelivered" => ("未送达", "not delivered yet"),
        "state_ok" => ("运行正常", "All is well"),
        "state_attention" => ("需要关注", "Needs attention"),
        "state_broken" => ("故障：数据未在采集", "Broken: nothing is being collected"),
        "devices_offline" => ("台设备离线", "devices offline"),
        "poll_failed" => ("通信失败", "polls failing"),
        "backlog" => ("待发送积压", "backlog"),
        "vehicle" => ("车辆", "Vehicle"),
        "camera_k" => ("摄像头", "Camera"),
        "clock_skew" => ("设备时钟超前", "device clock ahead"),
        "clock_skew_note" => (
            "（事件按网关接收时间计数）",
            "(its events count at the gateway's receive time)",
        ),
        "forgotten" => ("已遗忘的设备", "Devices forgotten"),
        "forgotten_bound" => (
            "达到上限（health.max_devices）后最久未上报的",
            "longest silent at health.max_devices",
        ),
        "forgotten_unmapped" => ("接入映射变更后不再对应的", "no longer mapped by a source"),
        "forgotten_installer" => ("安装人员手动遗忘的", "forgotten by the installer"),
        _ => ("?", "?"),
    };
    if en {
        e
    } else {
        zh
    }
}

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
        Kind::Access => t(en, "access"),
        Kind::Vehicle => t(en, "vehicle"),
        Kind::Camera => t(en, "camera_k"),
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
        None => t(en, "never").to_string(),
    }
}

pub(super) fn chart(s: &StatusOut, en: bool) -> String {
    let (w, h, pad) = (720.0f64, 200.0f64, 28.0f64);
    let max = s
        .hourly
        .iter()
        .map(|b| b.access + b.vehicle + b.camera)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bw = (w - pad) / 24.0;
    let mut out = format!(
        "<svg data-chart=\"hourly\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"none\">",
        h + 20.0,
        t(en, "hourly")
    );
    out.push_str(&format!(
        "<line x1=\"{pad}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" class=\"axis\"/><text x=\"0\" y=\"12\" class=\"lbl\">{}</text>",
        max as u64
    ));
    for (i, b) in s.hourly.iter().enumerate() {
        let x = pad + i as f64 * bw + 2.0;
        let mut y = h;
        for (n, class) in [(b.access, "a"), (b.vehicle, "v"), (b.camera, "c")] {
            if n == 0 {
                continue;
            }
            let bh = (n as f64 / max) * (h - 16.0);
            y -= bh;
            out.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" class=\"{class}\"><title>{n}</title></rect>",
                bw - 4.0
            ));
        }
        if i % 3 == 0 {
            out.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{}\" class=\"lbl\">{}</text>",
                h + 16.0,
                local(b.start_ms, s.tz_secs, false)
            ));
        }
    }
    out.push_str("</svg>");
    out
}

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
    let mut h = String::with_capacity(16 * 1024);
    h.push_str(&format!(
        "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <title>{title} · {name}</title><style>{css}</style></head><body>",
        lang = if en { "en" } else { "zh-CN" },
        title = t(en, "title"),
        name = esc(&name),
        css = CSS,
    ));
    h.push_str(&format!(
        "<header><h1>{} <small>{}</small></h1><p>{}{} · v{} · {} {}</p><a class=\"lang\" href=\"?lang={}\">{}</a></header>",
        esc(&name),
        t(en, "title"),
        if site.is_empty() { String::new() } else { format!("{} · ", esc(&site.join(" "))) },
        esc(&s.gateway.id),
        s.version,
        t(en, "updated"),
        local_rfc(&Some(s.now.clone()), s.tz_secs, en),
        if en { "zh" } else { "en" },
        t(en, "other_lang"),
    ));
    // What needs attention: paused intake, quarantined store files, drops under pressure.
    let mut alarms: Vec<String> = Vec::new();
    if s.intake.paused {
        alarms.push(format!(
            "<li data-intake-paused=\"{}\"><b>{}</b> ({}) {} {} · {}</li>",
            s.intake.reason.unwrap_or(""),
            t(en, "paused"),
            t(en, s.intake.reason.unwrap_or("disk_error")),
            t(en, "since"),
            local_rfc(&s.intake.since, s.tz_secs, en),
            if en {
                esc(s.intake.detail.as_deref().unwrap_or(""))
            } else {
                String::new()
            },
        ));
    }
    if s.clock_offset_ms.abs() > crate::core::clock::STEP_MS {
        alarms.push(format!(
            "<li data-clock-step=\"{}\"><b>{}</b> {} s</li>",
            s.clock_offset_ms,
            t(
                en,
                if s.clock_offset_ms > 0 {
                    "clock_back"
                } else {
                    "clock_ahead"
                }
            ),
            s.clock_offset_ms.abs() / 1000
        ));
    }
    if let Some(p) = &s.site_problem {
        alarms.push(format!(
            "<li data-site-problem><b>{}</b> {}</li>",
            t(en, "site_problem"),
            if en {
                esc(p)
            } else {
                t(en, "site_problem_zh").to_string()
            }
        ));
    }
    for (link, p) in &s.link_problems {
        alarms.push(format!(
            "<li data-link-problem=\"{link}\" data-reason=\"{}\"><b>{}</b> {}</li>",
            p.reason,
            t(
                en,
                if *link == "site" {
                    "site_link"
                } else {
                    "district_link"
                }
            ),
            if en {
                esc(&p.detail)
            } else {
                format!(
                    "{}：{}",
                    t(en, p.reason),
                    t(en, &format!("fix_{}", p.reason))
                )
            }
        ));
    }
    for q in &s.store.quarantined {
        alarms.push(format!(
            "<li data-quarantined=\"{}\"><b>{}</b> {} ({:.1} MiB){}</li>",
            esc(&q.file),
            t(en, "quarantined"),
            esc(&q.file),
            q.bytes as f64 / 1048576.0,
            q.reason
                .as_ref()
                .filter(|_| en)
                .map(|r| format!(" · {}", esc(r)))
                .unwrap_or_default(),
        ));
    }
    for k in &s.keys_lost {
        alarms.push(if k.kind == "care" {
            format!(
                "<li data-keys-lost=\"{}\"><b>{}</b> {}</li>",
                esc(&k.key),
                t(en, "keys_lost_care"),
                esc(&k.unmatched.join(" "))
            )
        } else {
            format!(
                "<li data-keys-lost=\"{}\"><b>{}</b> {} · {} {}</li>",
                esc(&k.key),
                t(en, "keys_lost_day"),
                esc(k.date.as_deref().unwrap_or("")),
                t(en, "since"),
                local_rfc(&Some(k.detected.clone()), s.tz_secs, en),
            )
        });
    }
    if s.upstream.parked > 0 {
        alarms.push(format!(
            "<li data-parked=\"{}\"><b>{}</b> {}</li>",
            s.upstream.parked,
            t(en, "parked"),
            s.upstream.parked
        ));
    }
    let d = &s.store.dropped;
    if d.summaries + d.alerts + d.dedup_keys + d.raw_events > 0 {
        alarms.push(format!(
            "<li data-dropped=\"{}\"><b>{}</b> {} {} · {} {} · {} {} · {} {}</li>",
            d.summaries + d.alerts,
            t(en, "dropped"),
            t(en, "pending"),
            d.summaries,
            t(en, "pending_alerts"),
            d.alerts,
            t(en, "dedup_dropped"),
            d.dedup_keys,
            t(en, "raw_dropped"),
            d.raw_events,
        ));
    }
    // The overall state first: broken when nothing is being collected, attention when
    // something needs a look, ok otherwise; with the first reason.
    let site_down = s.links.get("site").filter(|l| !l.connected);
    let offline = s.devices.iter().filter(|d| !d.online).count();
    let district_down = s.links.get("district").filter(|l| !l.connected);
    let (state, first) = if s.intake.paused {
        ("broken", t(en, "paused").to_string())
    } else if let Some(l) = site_down {
        (
            // A moment's reconnect is worth a look; longer, nothing is being collected.
            if l.for_secs >= 10 {
                "broken"
            } else {
                "attention"
            },
            format!(
                "{}：{} {} {}",
                t(en, "site_broker"),
                t(en, l.reason.unwrap_or("closed")),
                t(en, "for"),
                age(l.for_secs, en)
            ),
        )
    } else if !alarms.is_empty() {
        ("attention", t(en, "attention").to_string())
    } else if let Some(l) = district_down.filter(|l| l.for_secs >= 10) {
        (
            "attention",
            format!(
                "{}：{} {} {}",
                t(en, "district_broker"),
                t(en, l.reason.unwrap_or("closed")),
                t(en, "for"),
                age(l.for_secs, en)
            ),
        )
    } else if offline > 0 {
        (
            "attention",
            format!("{offline} {}", t(en, "devices_offline")),
        )
    } else {
        ("ok", String::new())
    };
    h.push_str(&format!(
        "<div class=\"banner {state}\" data-state=\"{state}\"><b>{}</b> {}</div>",
        t(en, &format!("state_{state}")),
        esc(&first)
    ));
    if !alarms.is_empty() {
        h.push_str(&format!(
            "<section class=\"alarm\"><h2>{}</h2><ul>{}</ul></section>",
            t(en, "attention"),
            alarms.join("")
        ));
    }
    // Both links: connected or not, for how long, why not.
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"cards\">",
        t(en, "links")
    ));
    for (key, label) in [("site", "site_broker"), ("district", "district_broker")] {
        let Some(l) = s.links.get(key) else { continue };
        let why = if l.connected {
            String::new()
        } else {
            let mut w = format!(" · {}", t(en, l.reason.unwrap_or("closed")));
            if l.attempts > 0 {
                w.push_str(&format!(" · {} {}", l.attempts, t(en, "attempts")));
            }
            if en {
                if let Some(e) = &l.error {
                    w.push_str(&format!(" · {}", esc(e)));
                }
            }
            w
        };
        h.push_str(&format!(
            "<div class=\"card\" data-link=\"{key}\" data-connected=\"{}\"><h3>{}</h3><div class=\"small\"><b class=\"{}\">{}</b><span>{} {}</span></div><p class=\"muted\">{}{}</p></div>",
            l.connected,
            t(en, label),
            if l.connected { "ok" } else { "bad" },
            t(en, if l.connected { "connected" } else { "disconnected" }),
            t(en, "for"),
            age(l.for_secs, en),
            esc(&l.url),
            why,
        ));
    }
    h.push_str("</div></section>");
    // Today.
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"cards\">",
        t(en, "today")
    ));
    for (kind, group, entry, exit) in [
        ("access", "people", "entry_p", "exit_p"),
        ("vehicle", "vehicles", "entry_v", "exit_v"),
    ] {
        let m = s.today.get(kind).cloned().unwrap_or_default();
        h.push_str(&format!("<div class=\"card\"><h3>{}</h3>", t(en, group)));
        for (action, label) in [("entry", entry), ("exit", exit)] {
            h.push_str(&format!(
                "<div class=\"big\"><span>{}</span><b data-count=\"{kind}:{action}\">{}</b></div>",
                t(en, label),
                m.get(action).copied().unwrap_or(0)
            ));
        }
        for (action, n) in m.iter().filter(|(a, _)| *a != "entry" && *a != "exit") {
            h.push_str(&format!(
                "<div class=\"small\"><span>{}</span><b data-count=\"{kind}:{}\">{n}</b></div>",
                esc(&action_label(en, action)),
                esc(action)
            ));
        }
        h.push_str("</div>");
    }
    h.push_str(&format!("<div class=\"card\"><h3>{}</h3>", t(en, "camera")));
    let cam = s.today.get("camera").cloned().unwrap_or_default();
    if cam.is_empty() {
        h.push_str(&format!("<p class=\"muted\">{}</p>", t(en, "none")));
    }
    for (action, n) in &cam {
        h.push_str(&format!(
            "<div class=\"small\"><span>{}</span><b data-count=\"camera:{}\">{n}</b></div>",
            esc(&action_label(en, action)),
            esc(action)
        ));
    }
    h.push_str("</div></div></section>");
    // Chart.
    h.push_str(&format!(
        "<section><h2>{}</h2>{}<p class=\"legend\"><i class=\"a\"></i>{} <i class=\"v\"></i>{} <i class=\"c\"></i>{}</p></section>",
        t(en, "hourly"),
        chart(s, en),
        t(en, "access"),
        t(en, "vehicle"),
        t(en, "camera_k")
    ));
    // Devices: offline first (the list comes sorted), with ages and today's counts.
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"scroll\"><table class=\"dev\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th class=\"wide\">{}</th><th>{}</th><th class=\"wide\">{}</th></tr>",
        t(en, "devices"),
        t(en, "name"),
        t(en, "state"),
        t(en, "last_seen"),
        t(en, "today_n"),
        t(en, "kind"),
        t(en, "last_error"),
        t(en, "values")
    ));
    for d in &s.devices {
        let states: Vec<String> = d
            .states
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), esc(&v.to_string())))
            .collect();
        let seen = match d.last_seen_secs_ago {
            Some(a) if en => format!("{} {}", age(a, en), t(en, "ago")),
            Some(a) => format!("{}{}", age(a, en), t(en, "ago")),
            None => t(en, "never").to_string(),
        };
        let err = match (&d.last_error, d.source) {
            (None, _) => String::new(),
            (Some(e), "mqtt") => reject_label(en, e),
            (Some(e), _) if en => esc(e),
            (Some(_), _) => t(en, "poll_failed").to_string(),
        };
        let skew = match d.clock_ahead_secs.filter(|_| d.clock_skew) {
            Some(a) => format!(
                " <span class=\"bad\" data-clock-skew=\"{a}\" title=\"{}\">{} {}</span>",
                t(en, "clock_skew_note"),
                t(en, "clock_skew"),
                age(a, en)
            ),
            None => String::new(),
        };
        h.push_str(&format!(
            "<tr data-device=\"{name}\" data-online=\"{online}\"><td>{name}{skew}</td><td class=\"{cls}\">{state}</td><td>{seen}</td><td data-today=\"{today}\">{today}</td><td class=\"wide\">{kind} · {src}</td><td>{err}</td><td class=\"wide\">{states}</td></tr>",
            name = esc(&d.name),
            online = d.online,
            kind = kind_label(en, d.kind),
            src = if d.source == "mqtt" { "MQTT" } else { "Modbus" },
            cls = if d.online { "ok" } else { "bad" },
            state = t(en, if d.online { "online" } else { "offline" }),
            today = d.today,
            states = states.join(" "),
        ));
    }
    h.push_str("</table></div>");
    let f = &s.counters.devices_forgotten;
    let n = |k: &str| f.get(k).copied().unwrap_or(0);
    if f.values().any(|v| *v > 0) {
        h.push_str(&format!(
            "<p class=\"small muted\" data-forgotten-bound=\"{}\" data-forgotten-unmapped=\"{}\" data-forgotten-installer=\"{}\">{}：{} {}，{} {}，{} {}</p>",
            n("bound"),
            n("unmapped"),
            n("installer"),
            t(en, "forgotten"),
            t(en, "forgotten_bound"),
            n("bound"),
            t(en, "forgotten_unmapped"),
            n("unmapped"),
            t(en, "forgotten_installer"),
            n("installer"),
        ));
    }
    h.push_str("</section>");
    // Upstream.
    let u = &s.upstream;
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"cards\"><div class=\"card\"><div class=\"small\"><span>{}</span><b data-upstream=\"{}\" class=\"{}\">{}</b></div>\
         <div class=\"small\"><span>{}</span><b data-pending-summaries=\"{}\">{}</b></div>\
         <div class=\"small\"><span>{}</span><b>{}</b></div>\
         <div class=\"small\"><span>{}</span><b>{}</b></div>\
         <div class=\"small\"><span>{}</span><b>{:.1} MiB</b></div></div></div></section>",
        t(en, "upstream"),
        t(en, "link"),
        if u.connected { "connected" } else { "disconnected" },
        if u.connected { "ok" } else { "bad" },
        t(en, if u.connected { "connected" } else { "disconnected" }),
        t(en, "pending"),
        u.pending_summaries,
        u.pending_summaries,
        t(en, "pending_alerts"),
        u.pending_alerts,
        t(en, "oldest"),
        u.oldest_pending_secs
            .map(|a| if en { format!("{} {}", age(a, en), t(en, "ago")) } else { format!("{}{}", age(a, en), t(en, "ago")) })
            .unwrap_or_else(|| "—".into()),
        t(en, "store"),
        s.store.bytes as f64 / 1048576.0,
    ));
    // Alerts and rejects.
    h.push_str(&format!(
        "<section><h2>{}</h2><table><tr><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(en, "alerts"),
        t(en, "time"),
        t(en, "device"),
        t(en, "type")
    ));
    // Alerts leave oldest first, so the newest `pending_alerts` ones are the undelivered.
    let undelivered = s.upstream.pending_alerts as usize;
    for (i, a) in s.recent_alerts.iter().take(20).enumerate() {
        let pending = i < undelivered;
        h.push_str(&format!(
            "<tr data-alert=\"{}\" data-pending=\"{pending}\"><td>{}</td><td>{}</td><td>{}{}</td></tr>",
            esc(&a.action),
            local_rfc(&Some(a.at.clone()), s.tz_secs, en),
            esc(&a.device),
            esc(&action_label(en, &a.action)),
            if pending { format!(" <b class=\"bad\">{}</b>", t(en, "undelivered")) } else { String::new() }
        ));
    }
    h.push_str("</table></section>");
    if !s.care.is_empty() {
        h.push_str(&format!(
            "<section data-care><h2>{}</h2><table><tr><th>{}</th><th>{}</th><th>{}</th></tr>",
            t(en, "care"),
            t(en, "flat"),
            t(en, "last_pass"),
            t(en, "care_state")
        ));
        // Silent residents first.
        let mut list: Vec<&super::report::CareOut> = s.care.iter().collect();
        list.sort_by_key(|c| !c.silent);
        for c in list {
            let last = match (&c.last_seen, c.silent_for_secs) {
                (Some(_), Some(secs)) => {
                    format!("{} {}", age(secs, en), if en { "ago" } else { "前" })
                }
                _ => t(en, "care_never").to_string(),
            };
            h.push_str(&format!(
                "<tr data-care-alias=\"{}\"{}{}><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.alias),
                if c.silent { " class=\"bad\"" } else { "" },
                c.unmatched
                    .map(|u| format!(" data-unmatched=\"{u}\""))
                    .unwrap_or_default(),
                esc(&c.alias),
                last,
                if c.unmatched.is_some() {
                    format!("<b class=\"bad\">{}</b>", t(en, "care_key_lost"))
                } else if c.silent {
                    format!("<b class=\"bad\">{}</b>", t(en, "care_silent"))
                } else {
                    t(en, "care_ok").to_string()
                }
            ));
        }
        h.push_str("</table></section>");
    }
    h.push_str(&format!(
        "<section><h2>{}</h2><table><tr><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(en, "rejects"),
        t(en, "time"),
        t(en, "topic"),
        t(en, "reason")
    ));
    for r in s.recent_rejects.iter().take(20) {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            local_rfc(&Some(r.at.clone()), s.tz_secs, en),
            esc(&r.topic),
            match &r.detail {
                Some(d) => format!(
                    "{}<br><small>{}</small>",
                    reject_label(en, r.reason),
                    esc(d)
                ),
                None => reject_label(en, r.reason),
            }
        ));
    }
    h.push_str("</table></section></body></html>");
    h
}

pub(super) const CSS: &str = "body{font-family:system-ui,-apple-system,'PingFang SC','Noto Sans CJK SC','Microsoft YaHei',sans-serif;margin:0;background:#f4f6f8;color:#1d2329}\
header{background:#0b5394;color:#fff;padding:12px 16px;position:relative}header h1{margin:0;font-size:1.4em}header small{font-weight:normal;opacity:.8;font-size:.6em}\
header p{margin:4px 0 0;opacity:.85;font-size:.9em}.lang{position:absolute;right:16px;top:14px;color:#fff}\
section{background:#fff;margin:12px;padding:12px 16px;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}h2{font-size:1.1em;margin:0 0 8px}\
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{flex:1 1 220px;border:1px solid #e3e7eb;border-radius:6px;padding:8px 12px}.card h3{margin:0 0 6px;font-size:1em;color:#555}\
.big{display:flex;justify-content:space-between;font-size:1.3em;margin:2px 0}.small{display:flex;justify-content:space-between;margin:2px 0}\
table{width:100%;border-collapse:collapse;font-size:.92em}th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eee}\
.alarm{border:2px solid #c5221f;padding:0 .8em}.ok{color:#137333;font-weight:bold}.bad{color:#c5221f;font-weight:bold}.muted{color:#888}\
svg{width:100%;height:auto;max-height:260px}.axis{stroke:#999}.lbl{font-size:11px;fill:#666}rect.a,.legend i.a{fill:#1a73e8;background:#1a73e8}\
rect.v,.legend i.v{fill:#f29900;background:#f29900}rect.c,.legend i.c{fill:#d93025;background:#d93025}.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}\
.banner{margin:12px;padding:10px 16px;border-radius:8px;font-size:1.05em}.banner.ok{background:#e6f4ea;color:#137333}\
.banner.attention{background:#fef7e0;color:#8a5a00;border:1px solid #f29900}.banner.broken{background:#fce8e6;color:#a50e0e;border:2px solid #c5221f}\
.scroll{overflow-x:auto}\
@media(max-width:600px){section,.banner{margin:8px;padding:8px}table{font-size:.85em}.wide{display:none}.lbl{font-size:26px}.cards{gap:8px}.card{flex-basis:100%}header .lang{position:static;display:inline-block;margin-top:4px}}";
