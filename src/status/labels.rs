//! The page's labels, Chinese first: one typed table ([`L`]); [`t`] for a label the code
//! names, [`tk`] for a value that arrives as a string.

/// Every label on the page, Chinese first: one typed table (a label the code names and the
/// table lacks does not compile). `key` is its name in `data-` attributes and for the values
/// that arrive as strings (pause reasons, link reasons, states): [`tk`].
macro_rules! labels {
    ($($v:ident = $key:literal => ($zh:expr, $en:expr $(,)?),)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(super) enum L { $($v,)* }

        impl L {
            /// Every label (the tests walk it).
            #[cfg(test)]
            pub(super) const ALL: &'static [L] = &[$(L::$v,)*];

            /// Its key (the tests check it finds the label again).
            #[cfg(test)]
            pub(super) fn key(self) -> &'static str {
                match self { $(L::$v => $key,)* }
            }

            /// Its text in Chinese, or English when `en`.
            pub(super) fn text(self, en: bool) -> &'static str {
                match self { $(L::$v => if en { $en } else { $zh },)* }
            }

            /// The label named `key`, if there is one.
            pub(super) fn from_key(key: &str) -> Option<L> {
                match key { $($key => Some(L::$v),)* _ => None }
            }
        }
    };
}

labels! {
    Title = "title" => ("智安小区网关", "Smart-compound gateway"),
    Today = "today" => ("今日统计", "Today"),
    People = "people" => ("人员进出", "People"),
    Vehicles = "vehicles" => ("车辆进出", "Vehicles"),
    Camera = "camera" => ("摄像头事件", "Camera incidents"),
    EntryP = "entry_p" => ("进入", "Entries"),
    ExitP = "exit_p" => ("离开", "Exits"),
    EntryV = "entry_v" => ("驶入", "Vehicles in"),
    ExitV = "exit_v" => ("驶出", "Vehicles out"),
    None = "none" => ("无", "none"),
    Hourly = "hourly" => ("近24小时（每小时）", "Last 24 hours (hourly)"),
    Devices = "devices" => ("设备", "Devices"),
    Name = "name" => ("名称", "Name"),
    Kind = "kind" => ("类型", "Kind"),
    Source = "source" => ("接入", "Source"),
    State = "state" => ("状态", "State"),
    Online = "online" => ("在线", "Online"),
    Offline = "offline" => ("离线", "Offline"),
    LastSeen = "last_seen" => ("最后上报", "Last seen"),
    LastError = "last_error" => ("最近错误", "Last error"),
    Values = "values" => ("状态值", "Values"),
    Never = "never" => ("从未", "never"),
    Upstream = "upstream" => ("上级平台", "District platform"),
    Link = "link" => ("连接", "Link"),
    Connected = "connected" => ("已连接", "Connected"),
    Disconnected = "disconnected" => ("未连接", "Disconnected"),
    Pending = "pending" => ("待发送汇总", "Pending summaries"),
    PendingAlerts = "pending_alerts" => ("待发送告警", "Pending alerts"),
    Oldest = "oldest" => ("最早待发送窗口", "Oldest pending window"),
    Store = "store" => ("本地存储", "Local store"),
    Attention = "attention" => ("需要处理", "Needs attention"),
    SiteProblem = "site_problem" => ("现场代理订阅异常：", "Site broker subscription problem:"),
    Parked = "parked" => ("区级代理多次拒收、已搁置在本机的消息：",
            "Messages the district broker kept refusing, parked on the box:"),
    SiteLink = "site_link" => ("现场代理连接需要处理：", "Site broker link needs action:"),
    DistrictLink = "district_link" => ("区级平台连接需要处理：", "District link needs action:"),
    Paused = "paused" => ("数据接收已暂停，设备消息在现场代理中等待",
            "Intake paused: device messages wait in the site broker"),
    DiskFull = "disk_full" => ("磁盘已满", "disk full"),
    DiskError = "disk_error" => ("磁盘写入失败", "disk write failing"),
    ClockUntrusted = "clock_untrusted" => ("网关时钟不可信", "gateway clock not trusted"),
    ClockBack = "clock_back" => ("网关时钟被调慢，窗口按单调时钟继续计时，差值：",
            "Gateway clock stepped back; windows keep the monotonic pace, off by"),
    ClockAhead = "clock_ahead" => ("网关时钟向前跳变，设备时间未证实，窗口按单调时钟计时，差值：",
            "Gateway clock jumped ahead, not confirmed by devices; windows keep the monotonic pace, off by"),
    Since = "since" => ("自", "since"),
    Quarantined = "quarantined" => ("存储文件损坏，已移至一旁并启用新存储：",
            "Damaged store file moved aside, fresh store started:"),
    Dropped = "dropped" => ("存储空间不足，已丢弃：", "Dropped for lack of space:"),
    DedupDropped = "dedup_dropped" => ("去重记录", "dedup keys"),
    RawDropped = "raw_dropped" => ("原始事件", "raw events"),
    Alerts = "alerts" => ("最近告警", "Recent alerts"),
    Rejects = "rejects" => ("最近拒收", "Recent rejects"),
    Care = "care" => ("独居老人关怀", "Care watch (residents living alone)"),
    Flat = "flat" => ("房号", "Flat"),
    LastPass = "last_pass" => ("最近通行", "Last passed a door"),
    CareState = "care_state" => ("状态", "State"),
    CareOk = "care_ok" => ("正常", "OK"),
    CareSilent = "care_silent" => ("超时未出现，请上门查看", "Silent: please check on them"),
    CareNever = "care_never" => ("关注以来未出现", "not seen since the watch began"),
    CareKeyLost = "care_key_lost" => (
        "关怀密钥已丢失，无法匹配，请重新登记",
        "care key lost: cannot be matched, relist",
    ),
    KeysLostDay = "keys_lost_day" => (
        "密钥目录丢失了密钥：当日去重人数无法跨越丢失前后关联同一人（日报按密钥分别计数并标注），日期：",
        "The key dir lost keys: the day's distinct counts cannot link people across the loss (the daily message counts per key and says so), day:",
    ),
    KeysLostPresence = "keys_lost_presence" => (
        "车辆在场密钥丢失：丢失前在场的车辆改按数量保留，出场时逐辆扣减；请盘点后执行 zhian-gateway occupancy set --count 实数",
        "Presence key lost: the vehicles inside before it are kept as a count, each of their exits takes one off; count the garage and run zhian-gateway occupancy set --count N",
    ),
    KeysLostCare = "keys_lost_care" => (
        "关怀密钥丢失：以下按化名登记的住户再也无法匹配（不会误报未出现），请用新密钥重新登记：",
        "Care key lost: these residents listed by pseudonym can never be matched (no false silent notice); relist them with the new key:",
    ),
    Occupancy = "occupancy" => ("实有车辆", "Vehicles inside"),
    OccInside = "occ_inside" => ("在场车辆", "Inside"),
    OccCapacity = "occ_capacity" => ("车位总数", "Spaces"),
    OccFree = "occ_free" => ("空余车位", "Free"),
    OccLong = "occ_long" => ("长时间停放", "Long stays"),
    OccPlate = "occ_plate" => ("车牌（部分隐藏）", "Plate (masked)"),
    OccEntry = "occ_entry" => ("入场时间", "Entered"),
    OccGate = "occ_gate" => ("入口", "Gate"),
    OccMissed = "occ_missed" => ("超期未出场（视为漏记出场）", "Past max stay (missed exits)"),
    OccUnmatched = "occ_unmatched" => ("无入场记录的出场", "Exits without an entry"),
    OccStocktake = "occ_stocktake" => ("最近盘点", "Last stocktake"),
    OccHelp = "occ_help" => (
        "在场车辆由出入口车牌识别的入场、出场计算（同一车辆以最新一次识别为准，重复识别不重复计数）。出场漏拍的车辆会一直计为在场，超过最长停放时间后按漏记出场移除；人工盘点后可用 zhian-gateway occupancy set --count 数量 校正。车牌只显示前两位和后两位。",
        "Vehicles inside come from the gates' plate reads (each vehicle's newest read counts; a read twice counts once). A vehicle whose exit was not read stays inside until the longest stay, then counts as a missed exit; after counting on site, correct it with zhian-gateway occupancy set --count N. Plates show their first two and last two characters only.",
    ),
    Config = "config" => ("配置", "Configuration"),
    ConfigSource = "config_source" => ("来源", "Source"),
    ConfigFile = "config_file" => ("本机配置文件", "this box's file"),
    ConfigFleet = "config_fleet" => ("区级下发", "from the district"),
    ConfigSerial = "config_serial" => ("版本号", "Serial"),
    ConfigProbation = "config_probation" => ("试运行中（异常将自动回退）", "on probation (rolled back on a fault)"),
    ConfigApplied = "config_applied" => ("已生效", "in force"),
    ConfigKeys = "config_keys" => ("下发的配置项", "Keys from the district"),
    ConfigRolledBack = "config_rolled_back" => ("已自动回退的版本", "Rolled back"),
    ConfigRejected = "config_rejected" => ("已拒绝的版本", "Refused"),
    ConfigTrust = "config_trust" => ("信任的区级密钥", "Trusted district key"),
    ConfigProblem = "config_problem" => ("区级下发的配置未生效，按本机配置文件运行", "The district's change is not in force; running on this box's file"),
    Time = "time" => ("时间", "Time"),
    Device = "device" => ("设备", "Device"),
    Type = "type" => ("类型", "Type"),
    Topic = "topic" => ("主题", "Topic"),
    Reason = "reason" => ("原因", "Reason"),
    Updated = "updated" => ("更新于", "Updated"),
    OtherLang = "other_lang" => ("English", "中文"),
    Access = "access" => ("门禁", "Access"),
    Links = "links" => ("连接", "Links"),
    SiteBroker = "site_broker" => ("现场代理（设备）", "Site broker (devices)"),
    DistrictBroker = "district_broker" => ("区级平台", "District platform"),
    Connecting = "connecting" => ("正在连接", "connecting"),
    Unreachable = "unreachable" => ("无法连接", "unreachable"),
    Closed = "closed" => ("连接中断", "connection lost"),
    Refused = "refused" => ("拒绝登录（用户名/密码或权限）", "refused (credentials or ACL)"),
    Tls = "tls" => ("TLS 证书问题", "TLS certificate problem"),
    IdentityTaken = "identity_taken" => ("客户端ID被另一台设备占用", "client id taken by another client"),
    FixRefused = "fix_refused" => ("请检查用户名和密码", "check the username and password"),
    FixTls = "fix_tls" => ("请检查 ca_file、client_cert、client_key",
            "check ca_file, client_cert, client_key"),
    FixIdentityTaken = "fix_identity_taken" => ("两台网关用了同一份配置？请为每台设置不同的 gateway.id",
            "two boxes from one config? give each its own gateway.id"),
    SiteProblemZh = "site_problem_zh" => ("现场代理未按 QoS 1 授予订阅（重启时可能丢消息）：请允许本客户端使用 QoS 1",
            ""),
    For = "for" => ("已持续", "for"),
    Attempts = "attempts" => ("次重试", "attempts"),
    TodayN = "today_n" => ("今日", "Today"),
    OfflineFor = "offline_for" => ("离线", "offline for"),
    Ago = "ago" => ("前", "ago"),
    Undelivered = "undelivered" => ("未送达", "not delivered yet"),
    StateOk = "state_ok" => ("运行正常", "All is well"),
    StateAttention = "state_attention" => ("需要关注", "Needs attention"),
    StateBroken = "state_broken" => ("故障：数据未在采集", "Broken: nothing is being collected"),
    DevicesOffline = "devices_offline" => ("台设备离线", "devices offline"),
    PollFailed = "poll_failed" => ("通信失败", "polls failing"),
    Backlog = "backlog" => ("待发送积压", "backlog"),
    Vehicle = "vehicle" => ("车辆", "Vehicle"),
    CameraK = "camera_k" => ("摄像头", "Camera"),
    ClockSkew = "clock_skew" => ("设备时钟超前", "device clock ahead"),
    ClockSkewNote = "clock_skew_note" => ("（事件按网关接收时间计数）",
            "(its events count at the gateway's receive time)"),
    Forgotten = "forgotten" => ("已遗忘的设备", "Devices forgotten"),
    ForgottenBound = "forgotten_bound" => ("达到上限（health.max_devices）后最久未上报的",
            "longest silent at health.max_devices"),
    ForgottenUnmapped = "forgotten_unmapped" => ("接入映射变更后不再对应的", "no longer mapped by a source"),
    ForgottenInstaller = "forgotten_installer" => ("安装人员手动遗忘的", "forgotten by the installer"),
}

/// The label `l`, Chinese unless `en`.
pub(super) fn t(en: bool, l: L) -> &'static str {
    l.text(en)
}

/// The label for a value that arrives as a string (a pause reason, a link's reason, a state):
/// its table entry, or the value itself when the table has none (never a bare "?"; the tests
/// check every value the gateway can produce has one).
pub(super) fn tk(en: bool, key: &str) -> String {
    L::from_key(key).map_or_else(|| key.to_string(), |l| l.text(en).to_string())
}

#[cfg(test)]
mod label_tests {
    use super::*;

    /// Every string value the gateway can put where a label is looked up by key has a label in
    /// both languages: pause reasons, link reasons and their fixes, the overall states.
    #[test]
    fn every_value_the_gateway_produces_has_a_label() {
        let mut keys: Vec<String> = crate::stats::PauseReason::ALL
            .iter()
            .map(|r| r.as_str().to_string())
            .collect();
        keys.extend(crate::link::DOWN_REASONS.iter().map(|r| r.to_string()));
        keys.extend(
            crate::link::PROBLEM_REASONS
                .iter()
                .map(|r| format!("fix_{r}")),
        );
        keys.extend(["ok", "attention", "broken"].map(|s| format!("state_{s}")));
        for k in &keys {
            let l = L::from_key(k).unwrap_or_else(|| panic!("no label for {k:?}"));
            assert!(!l.text(false).is_empty() && !l.text(true).is_empty(), "{k}");
            assert_ne!(tk(false, k), *k, "{k} shows its key");
        }
    }

    #[test]
    fn every_label_is_found_by_its_key() {
        for &l in L::ALL {
            assert_eq!(L::from_key(l.key()), Some(l));
            assert!(!l.text(false).is_empty(), "{:?} has no Chinese", l);
        }
    }
}
