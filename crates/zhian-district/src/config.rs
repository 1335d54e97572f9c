//! `district.toml`: the receiver's config (contract: "District receiver"), loaded like the
//! gateway's (defaults < file < `ZHIAN_<SECTION>__<KEY>`), validated before anything connects,
//! every problem naming its key (exit 78).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zhian_common::config::{
    check_backoff, check_client_id, check_file, from_config_error, problem, strip_key_suffix,
    BrokerUrl, Dur, Problem, Secret,
};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistrictConfig {
    pub district: Db,
    pub mqtt: Broker,
    pub status: Status,
    pub retention: Retention,
}

/// `[retention]` (contract: "The five layers"): how long the partitioned tables keep their
/// months. The receiver drops a month's partitions once the whole month is older than this
/// (checked at start and every `every`); nothing is deleted row by row. A window or alert older
/// than the oldest kept month is a reject (`outside_retention`): its rows could not be
/// subtracted again by a re-issue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// Raw rows: `window_rows`, `windows`, `alerts`, `rejects`.
    pub window_rows: Dur,
    /// `rollup_hourly` and `rollup_daily` (what `counts_by_layer` and
    /// `counts_hourly_by_layer` read). At least `window_rows`: rollups outlive raw rows.
    pub rollups: Dur,
    /// How often the receiver creates months ahead and drops old ones.
    pub every: Dur,
    /// Months created ahead of the current one (a window further ahead than the last is a
    /// reject: a gateway clock far ahead).
    pub months_ahead: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            window_rows: Dur::secs(400 * 86_400),
            rollups: Dur::secs(3_652 * 86_400),
            every: Dur::secs(3_600),
            months_ahead: 2,
        }
    }
}

impl Retention {
    /// The window times kept at `now_ms`: from the start of the UTC month holding
    /// `now - window_rows` up to the end of the last month created ahead.
    pub fn horizon(&self, now_ms: i64) -> crate::batch::Horizon {
        let oldest = now_ms.saturating_sub(self.window_rows.as_millis_u64() as i64);
        let (y, m) = crate::partitions::month_of(oldest);
        let (ny, nm) = crate::partitions::month_of(now_ms);
        let (ay, am) = crate::partitions::add_months(ny, nm, self.months_ahead as i32 + 1);
        crate::batch::Horizon {
            min_ms: crate::partitions::month_start_ms(y, m),
            max_ms: crate::partitions::month_start_ms(ay, am),
        }
    }
}

/// `[status]`: the receiver's operations surface (contract: "Receiver operations").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Status {
    /// Serve `/healthz` and `/metrics`.
    pub enabled: bool,
    /// `host:port`; keep it on loopback or a management network (no auth: what it shows is
    /// counts and states, no subject or secret).
    pub listen: String,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            enabled: true,
            listen: "127.0.0.1:9180".into(),
        }
    }
}

/// `[district]`: the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Db {
    /// `postgres://user@host:5432/db` (libpq URL; `?sslmode=require` with `ca_file` for TLS).
    pub database_url: String,
    /// The database password: here, in `password_file`, as the systemd credential
    /// `district.password`, or `ZHIAN_DISTRICT__PASSWORD`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// The database server's CA (PEM): connect over TLS and check its certificate.
    pub ca_file: Option<PathBuf>,
    /// A gateway with no heartbeat for this long is `silent` in `gateway_state`.
    pub silent_after: Dur,
    /// Messages per database transaction at most.
    pub batch_max: u32,
    /// How long a batch waits for more messages after its first.
    pub linger: Dur,
    /// How often this receiver writes its row in the `receivers` roll-call (and refreshes the
    /// gateway counts in `/metrics`).
    pub rollcall_every: Dur,
    /// A receiver of the group whose roll-call row is older than this is stale: gone, with its
    /// broker session perhaps holding its share of the messages (WARN, metric).
    pub stale_after: Dur,
    /// A batch still writing after this long makes `/healthz` answer 503 `database: stuck`
    /// (a lock held elsewhere, a hung server): no statement has failed, but nothing commits.
    pub stuck_after: Dur,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            database_url: String::new(),
            password: None,
            password_file: None,
            ca_file: None,
            silent_after: Dur::secs(180),
            batch_max: 1000,
            linger: Dur::millis(20),
            rollcall_every: Dur::secs(15),
            stale_after: Dur::secs(120),
            stuck_after: Dur::secs(30),
        }
    }
}

/// `[mqtt]`: the district broker (the keys of the gateway's `[upstream]`, plus `group`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub url: String,
    pub topic_prefix: String,
    /// One per receiver: its persistent session.
    pub client_id: String,
    /// Shared subscription group: `$share/{group}/{prefix}/+/#`; receivers of one group split
    /// the messages.
    pub group: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive: Dur,
    pub reconnect_min: Dur,
    pub reconnect_max: Dur,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            url: "mqtt://127.0.0.1:1883".into(),
            topic_prefix: "zhian/district".into(),
            client_id: "zhian-district-1".into(),
            group: "zhian-district".into(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Dur::secs(30),
            reconnect_min: Dur::millis(500),
            reconnect_max: Dur::secs(30),
        }
    }
}

impl DistrictConfig {
    /// The shared subscription filter.
    pub fn filter(&self) -> String {
        format!("$share/{}/{}/+/#", self.mqtt.group, self.mqtt.topic_prefix)
    }

    /// The effective config as TOML, secrets redacted (the database URL's password in any
    /// of libpq's forms: `user:pw@`, `?password=`, `password=` in key/value form).
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.district.database_url = redact_conninfo(&shown.district.database_url);
        let text =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        zhian_common::logfmt::redact_url(&text)
    }
}

/// A libpq URL or key/value string with every password value replaced by `***`.
pub fn redact_conninfo(s: &str) -> String {
    // A URL: everything between the scheme and its last '@' is userinfo, whatever it holds
    // (a quote or a space in a password must not end the redaction).
    let s = match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(at)) if at > i + 3 => {
            let userinfo = &s[i + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}:***{}", &s[..i + 3 + c], &s[at..]),
                None => s.to_string(),
            }
        }
        _ => zhian_common::logfmt::redact_url(s),
    };
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    while let Some(i) = lower[at..].find("password") {
        let key_end = at + i + "password".len();
        out.push_str(&s[at..key_end]);
        let after = &s[key_end..];
        let trimmed = after.trim_start();
        match trimmed.strip_prefix('=') {
            Some(v) => {
                out.push_str("=***");
                let v_start = s.len() - v.len();
                let v = v.trim_start();
                let v_start = v_start + (s.len() - v_start - v.len());
                let len = if let Some(q) = v.strip_prefix('\'') {
                    q.find('\'').map_or(v.len(), |j| j + 2)
                } else {
                    v.find(|c: char| c == '&' || c.is_whitespace())
                        .unwrap_or(v.len())
                };
                at = v_start + len;
            }
            None => at = key_end,
        }
    }
    out.push_str(&s[at..]);
    out
}

/// Whether the file at `path` is a receiver config (it has a `[district]` table).
pub fn is_district_config(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("district"))
}

/// Load and validate `path` with the process environment.
pub fn load(path: &Path) -> Result<DistrictConfig, Vec<Problem>> {
    if !path.exists() {
        return Err(vec![problem(
            "config",
            format!(
                "file {} does not exist (give the right --config PATH)",
                path.display()
            ),
        )]);
    }
    let env: config::Map<String, String> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("ZHIAN_DISTRICT__")
                || k.starts_with("ZHIAN_MQTT__")
                || k.starts_with("ZHIAN_STATUS__")
        })
        .collect();
    let raw = config::Config::builder()
        .add_source(config::File::from(path.to_path_buf()).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("ZHIAN")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        )
        .build()
        .map_err(|e| vec![from_config_error(e)])?;
    let mut cfg: DistrictConfig = serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        vec![problem(
            if path == "." { "config".into() } else { path },
            strip_key_suffix(&e.into_inner().to_string()),
        )]
    })?;
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut p = Vec::new();
    for (section, slot, file) in [
        (
            "district",
            &mut cfg.district.password,
            cfg.district.password_file.clone(),
        ),
        (
            "mqtt",
            &mut cfg.mqtt.password,
            cfg.mqtt.password_file.clone(),
        ),
    ] {
        if let Err(e) =
            zhian_common::config::fill_secret(section, slot, file.as_ref(), creds.as_deref())
        {
            p.push(e);
        }
    }
    p.extend(validate(&cfg));
    if p.is_empty() {
        Ok(cfg)
    } else {
        Err(p)
    }
}

/// What serde cannot check.
pub fn validate(c: &DistrictConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let d = &c.district;
    if d.database_url.is_empty() {
        p.push(problem(
            "district.database_url",
            "required (postgres://user@host:5432/db)",
        ));
    } else if let Err(e) = d.database_url.parse::<tokio_postgres::Config>() {
        p.push(problem(
            "district.database_url",
            format!("not a PostgreSQL URL: {e}"),
        ));
    }
    check_file(&mut p, "district.ca_file", d.ca_file.as_deref());
    if d.batch_max == 0 || d.batch_max > 10_000 {
        p.push(problem("district.batch_max", "between 1 and 10000"));
    }
    if d.rollcall_every.0 < std::time::Duration::from_millis(100) {
        p.push(problem("district.rollcall_every", "at least 100ms"));
    }
    if d.stale_after.0 <= d.rollcall_every.0 * 2 {
        p.push(problem(
            "district.stale_after",
            "more than twice district.rollcall_every",
        ));
    }
    if d.stuck_after.0 < std::time::Duration::from_secs(1) {
        p.push(problem("district.stuck_after", "at least 1s"));
    }
    let r = &c.retention;
    if r.window_rows.0 < std::time::Duration::from_secs(31 * 86_400) {
        p.push(problem(
            "retention.window_rows",
            "at least 31d (partitions are months)",
        ));
    }
    if r.rollups.0 < r.window_rows.0 {
        p.push(problem(
            "retention.rollups",
            "at least retention.window_rows (rollups outlive raw rows)",
        ));
    }
    if r.every.0 < std::time::Duration::from_secs(1) {
        p.push(problem("retention.every", "at least 1s"));
    }
    if !(1..=24).contains(&r.months_ahead) {
        p.push(problem("retention.months_ahead", "between 1 and 24"));
    }
    if d.silent_after.0 < std::time::Duration::from_secs(10) {
        p.push(problem("district.silent_after", "at least 10s"));
    }
    let m = &c.mqtt;
    if let Err(e) = BrokerUrl::parse(&m.url) {
        p.push(problem("mqtt.url", e));
    }
    let prefix = &m.topic_prefix;
    if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.ends_with('/') {
        p.push(problem(
            "mqtt.topic_prefix",
            "must be non-empty, without wildcards or a trailing '/'",
        ));
    }
    check_client_id(&mut p, "mqtt.client_id", Some(&m.client_id));
    if m.group.is_empty()
        || !m
            .group
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    {
        p.push(problem("mqtt.group", "1 or more of [A-Za-z0-9_-]"));
    }
    check_backoff(&mut p, "mqtt", m.reconnect_min, m.reconnect_max);
    check_file(&mut p, "mqtt.ca_file", m.ca_file.as_deref());
    check_file(&mut p, "mqtt.client_cert", m.client_cert.as_deref());
    check_file(&mut p, "mqtt.client_key", m.client_key.as_deref());
    if m.client_cert.is_some() != m.client_key.is_some() {
        p.push(problem(
            "mqtt.client_key",
            "client_cert and client_key go together",
        ));
    }
    if c.status.enabled
        && std::net::ToSocketAddrs::to_socket_addrs(c.status.listen.as_str())
            .map_or(true, |mut a| a.next().is_none())
    {
        p.push(problem(
            "status.listen",
            format!(
                "{:?} is not host:port (e.g. \"127.0.0.1:9180\")",
                c.status.listen
            ),
        ));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::redact_conninfo;

    #[test]
    fn retention_problems_name_their_keys() {
        let mut c = super::DistrictConfig::default();
        c.district.database_url = "postgres://zhian@127.0.0.1/zhian".into();
        assert!(super::validate(&c).is_empty(), "{:?}", super::validate(&c));
        c.retention.window_rows = zhian_common::config::Dur::secs(10 * 86_400);
        c.retention.rollups = zhian_common::config::Dur::secs(5 * 86_400);
        c.retention.months_ahead = 0;
        let keys: Vec<String> = super::validate(&c).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "retention.window_rows",
                "retention.rollups",
                "retention.months_ahead"
            ]
        );
    }

    #[test]
    fn database_passwords_are_redacted_in_every_form() {
        for (given, secret) in [
            ("host=db user=zhian password=KvSecret dbname=x", "KvSecret"),
            (
                "postgresql://db:5432/x?user=zhian&password=QuerySecret",
                "QuerySecret",
            ),
            ("postgres://zhian:Pass%20Word\"Q@db:5432/x", "Pass%20Word"),
            (
                "host=db password = 'Quoted Secret' dbname=x",
                "Quoted Secret",
            ),
        ] {
            let r = redact_conninfo(given);
            assert!(!r.contains(secret), "{given} -> {r}");
        }
        assert_eq!(
            redact_conninfo("host=db password=KvSecret dbname=x"),
            "host=db password=*** dbname=x"
        );
    }
}
