//! The district dashboards (`contrib/grafana/district/*.json`, docs/district-dashboard.md)
//! against the real schema. Each dashboard parses; every panel has a unique id, its own place on
//! the 24-column grid and the data source `${DS}`; no query names a raw table or a plain view
//! over raw rows (a year of raw rows is tens of millions: dashboards read the rollups and the
//! latest-state views); and every template variable query and every panel query, with the
//! variables and Grafana's PostgreSQL macros substituted as Grafana does, runs read-only against
//! migrations/district/V1.. applied in order on a real PostgreSQL holding a little sample data,
//! and returns rows. A failure names the file, the panel or variable, and the server's error.

use crate::common;
use common::pg::{Postgres, FIELD_SEP};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// Raw tables and the plain views over them: every read scans raw rows.
const RAW: &[&str] = &[
    "window_rows",
    "window_counts",
    "windows",
    "counts_hourly",
    "counts_daily",
    "window_layer_rows",
    "counts_by_layer_raw",
    "counts_hourly_by_layer_raw",
];

const PG_TYPE: &str = "grafana-postgresql-datasource";
const DS_UID: &str = "${DS}";

/// Each query runs in a read-only transaction: a dashboard writes nothing.
const READ_ONLY: &str = "-c default_transaction_read_only=on -c statement_timeout=20s";

/// What the sample holds: three labelled compounds over two streets and one gateway with no
/// site labels, rollups for the last 48 hours and the next one (today and yesterday, local
/// time, even across a midnight during the test), gateways online, offline and silent, an
/// alert, an open care notice, a receiver, a daily count and a reject.
/// The rollups are built the way the receiver keeps them: each compound's counts under its four
/// layers, `parent` '' for the district, a missing label ''.
const SAMPLE: &str = r#"
INSERT INTO gateways (gateway, site, status, status_at, last_heartbeat, epoch) VALUES
    ('gw-a1', '{"district": "富阳区", "street": "富春街道", "community": "春江社区", "compound": "江滨小区"}',
     'online', now(), now(), 1),
    ('gw-a2', '{"district": "富阳区", "street": "富春街道", "community": "春江社区", "compound": "金桥小区"}',
     'offline', now() - interval '2 hours', now() - interval '2 hours', 5),
    ('gw-b1', '{"district": "富阳区", "street": "银湖街道", "community": "银湖社区", "compound": "湖畔小区"}',
     'online', now() - interval '1 day', now() - interval '20 minutes', 2),
    ('gw-x', NULL, NULL, NULL, NULL, NULL);
WITH facts (district, street, community, compound, kind, action, n) AS (VALUES
        ('富阳区', '富春街道', '春江社区', '江滨小区', 'access', 'entry', 40),
        ('富阳区', '富春街道', '春江社区', '江滨小区', 'vehicle', 'in', 7),
        ('富阳区', '富春街道', '春江社区', '金桥小区', 'access', 'entry', 12),
        ('富阳区', '银湖街道', '银湖社区', '湖畔小区', 'access', 'exit', 5),
        ('', '', '', 'gw-x', 'access', 'entry', 2)),
    hours (hour) AS (
        SELECT date_trunc('hour', now(), (SELECT value FROM settings WHERE key = 'timezone'))
               - o * interval '1 hour'
        FROM generate_series(-1, 47) o)
INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
SELECT l.layer, l.name, l.parent, h.hour, f.kind, f.action, sum(f.n)
FROM facts f CROSS JOIN hours h
CROSS JOIN LATERAL (VALUES ('compound', f.compound, f.community),
                           ('community', f.community, f.street),
                           ('street', f.street, f.district),
                           ('district', f.district, '')) AS l (layer, name, parent)
GROUP BY 1, 2, 3, 4, 5, 6;
INSERT INTO rollup_daily (layer, name, parent, day, kind, action, n)
SELECT layer, name, parent,
       (hour AT TIME ZONE (SELECT value FROM settings WHERE key = 'timezone'))::date,
       kind, action, sum(n)
FROM rollup_hourly GROUP BY 1, 2, 3, 4, 5, 6;
INSERT INTO alerts (gateway, kind, device, action, id, ts) VALUES
    ('gw-a1', 'camera', 'cam-2', 'fire_lane_blocked', 'cam-2-17', now() - interval '3 hours');
INSERT INTO care_notices (gateway, alias, state, last_seen, silent_secs) VALUES
    ('gw-a1', 'r-3f9c', 'silent', now() - interval '30 hours', 108000);
INSERT INTO receivers (client_id, grp, host, version, started, last_seen) VALUES
    ('zhian-district-1', 'zhian', 'recv1', '0.1.0', now() - interval '1 day', now());
INSERT INTO daily (gateway, date, tz, rev, access_subjects, vehicles, counts) VALUES
    ('gw-a1', current_date - 1, 'Asia/Shanghai', 0, 31, 6, '{}');
INSERT INTO rejects (topic, reason, detail) VALUES
    ('zhian/district/gw-a1/summary', 'not_json', 'expected value at line 1 column 1');
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `*.json` under contrib/grafana/district/, parsed (a file that does not parse fails).
fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("contrib/grafana/district");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {name}: {e}"));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{name} is not valid JSON: {e}"));
            (name, json)
        })
        .collect()
}

/// migrations/district/V<n>__*.sql, by n.
fn migrations() -> Vec<PathBuf> {
    let dir = repo().join("migrations/district");
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let (version, _) = name.strip_prefix('V')?.split_once("__")?;
            name.ends_with(".sql")
                .then(|| version.parse().ok())
                .flatten()
                .map(|v| (v, p))
        })
        .collect();
    found.sort();
    assert!(found.len() >= 5, "migrations in {}", dir.display());
    found.into_iter().map(|(_, p)| p).collect()
}

/// A JSON array's items (none when it is not one).
fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The panels, and those inside collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in items(&d["panels"]) {
        out.push(p);
        for inner in items(&p["panels"]) {
            out.push(inner);
        }
    }
    out
}

fn variables(d: &Value) -> &[Value] {
    items(&d["templating"]["list"])
}

fn title(p: &Value) -> String {
    format!(
        "panel {} {:?}",
        p["id"],
        p["title"].as_str().unwrap_or("(no title)")
    )
}

/// A query variable's SQL: a string, or `{"rawSql": ...}` / `{"query": ...}` (newer editors).
fn variable_sql(v: &Value) -> Option<&str> {
    let q = &v["query"];
    q.as_str()
        .or_else(|| q["rawSql"].as_str())
        .or_else(|| q["query"].as_str())
}

/// The raw tables and plain views `sql` names (whole words: `counts_hourly_by_layer` is not
/// `counts_hourly`).
fn raw_names(sql: &str) -> BTreeSet<&'static str> {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter_map(|word| {
            RAW.iter()
                .find(|raw| raw.eq_ignore_ascii_case(word))
                .copied()
        })
        .collect()
}

fn is_ds(ds: &Value) -> bool {
    ds["type"] == PG_TYPE && ds["uid"] == DS_UID
}

/// What can be checked without a database: ids, grid, data sources, raw names.
fn static_problems(file: &str, d: &Value, uids: &mut BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    let mut say = |what: String| bad.push(format!("{file}: {what}"));
    match d["uid"].as_str() {
        Some(uid) if !uid.is_empty() => {
            if !uids.insert(uid.to_string()) {
                say(format!("uid {uid:?} is another dashboard's too"));
            }
        }
        _ => say("no uid".into()),
    }
    let vars = variables(d);
    if !vars
        .iter()
        .any(|v| v["name"] == "DS" && v["type"] == "datasource" && v["query"] == PG_TYPE)
    {
        say(format!(
            "no template variable DS of type datasource, query {PG_TYPE:?}"
        ));
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let name = v["name"].as_str().unwrap_or("?");
        if !is_ds(&v["datasource"]) {
            say(format!(
                "variable {name}: datasource is not {{type {PG_TYPE}, uid {DS_UID}}}"
            ));
        }
        match variable_sql(v) {
            None => say(format!("variable {name}: no query")),
            Some(sql) => {
                for raw in raw_names(sql) {
                    say(format!(
                        "variable {name}: reads {raw} (raw rows; read the rollups)"
                    ));
                }
            }
        }
    }
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels(d) {
        let t = title(p);
        match p["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            Some(id) => say(format!("{t}: id {id} is another panel's too")),
            None => say(format!("{t}: no numeric id")),
        }
        let g = &p["gridPos"];
        let pos = ["x", "y", "w", "h"].map(|k| g[k].as_u64());
        if let [Some(x), Some(y), Some(w), Some(h)] = pos {
            if w == 0 || h == 0 || x + w > 24 {
                say(format!("{t}: gridPos {g} is off the 24-column grid"));
            }
            for (other, [ox, oy, ow, oh]) in &boxes {
                if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                    say(format!("{t}: gridPos overlaps {other}"));
                }
            }
            boxes.push((t.clone(), [x, y, w, h]));
        } else {
            say(format!("{t}: no gridPos x, y, w, h"));
        }
        if p["type"] == "row" {
            continue;
        }
        if !is_ds(&p["datasource"]) {
            say(format!(
                "{t}: datasource is not {{type {PG_TYPE}, uid {DS_UID}}}"
            ));
        }
        let targets = items(&p["targets"]);
        if targets.is_empty() {
            say(format!("{t}: no targets"));
        }
        for target in targets {
            let r = target["refId"].as_str().unwrap_or("?");
            if !target["datasource"].is_null() && !is_ds(&target["datasource"]) {
                say(format!("{t} target {r}: datasource is not {DS_UID}"));
            }
            if !matches!(target["format"].as_str(), Some("table" | "time_series")) {
                say(format!(
                    "{t} target {r}: format is not table or time_series"
                ));
            }
            match target["rawSql"].as_str() {
                Some(sql) if !sql.trim().is_empty() => {
                    for raw in raw_names(sql) {
                        say(format!(
                            "{t} target {r}: reads {raw} (raw rows; read the rollups)"
                        ));
                    }
                }
                _ => say(format!("{t} target {r}: no rawSql")),
            }
        }
    }
    bad
}

/// A template variable's current value(s): the first option, or all of them for a multi-value
/// or include-All variable (the way "All" is sent).
struct Var {
    values: Vec<String>,
    multi: bool,
}

struct Ctx {
    from: OffsetDateTime,
    to: OffsetDateTime,
    vars: BTreeMap<String, Var>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A variable's value as Grafana's SQL data sources interpolate it: a single value with its
/// quotes doubled (the query supplies the outer quotes), several quoted and comma-joined.
fn format_var(name: &str, v: &Var, format: Option<&str>) -> Result<String, String> {
    let quoted = || {
        v.values
            .iter()
            .map(|s| quote(s))
            .collect::<Vec<_>>()
            .join(",")
    };
    match format {
        None if v.multi => Ok(quoted()),
        None => Ok(v
            .values
            .first()
            .cloned()
            .unwrap_or_default()
            .replace('\'', "''")),
        Some("sqlstring") => Ok(quoted()),
        Some("raw" | "csv") => Ok(v.values.join(",")),
        Some(other) => Err(format!(
            "${{{name}:{other}}}: a format this test does not substitute (add it here)"
        )),
    }
}

fn word_len(s: &str) -> usize {
    s.bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count()
}

/// `$name`, `${name}`, `${name:format}`, `[[name]]`, `[[name:format]]` of the known variables
/// (anything else is left for the macros, then reported).
fn substitute_variables(sql: &str, vars: &BTreeMap<String, Var>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = sql;
    loop {
        let Some(i) = rest.find(['$', '[']) else {
            out.push_str(rest);
            return Ok(out);
        };
        out.push_str(&rest[..i]);
        let at = &rest[i..];
        // (name, format, length of the reference)
        let found = if let Some(inner) = at.strip_prefix("${") {
            inner.find('}').map(|end| {
                let (name, format) = match inner[..end].split_once(':') {
                    Some((n, f)) => (n, Some(f)),
                    None => (&inner[..end], None),
                };
                (name, format, end + 3)
            })
        } else if let Some(inner) = at.strip_prefix("[[") {
            inner.find("]]").map(|end| {
                let (name, format) = match inner[..end].split_once(':') {
                    Some((n, f)) => (n, Some(f)),
                    None => (&inner[..end], None),
                };
                (name, format, end + 4)
            })
        } else if let Some(inner) = at.strip_prefix('$') {
            let n = word_len(inner);
            (n > 0).then(|| (&inner[..n], None, n + 1))
        } else {
            None
        };
        match found.and_then(|(name, format, len)| vars.get(name).map(|v| (name, v, format, len))) {
            Some((name, v, format, len)) => {
                out.push_str(&format_var(name, v, format)?);
                rest = &at[len..];
            }
            None => {
                out.push_str(&at[..1]);
                rest = &at[1..];
            }
        }
    }
}

/// The arguments of a macro call at the start of `s` (`(a, b)`), and the call's length.
fn macro_args(s: &str) -> Result<(Vec<String>, usize), String> {
    let (mut depth, mut quoted, mut arg, mut args) = (0, false, String::new(), Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    if !arg.trim().is_empty() || !args.is_empty() {
                        args.push(arg.trim().to_string());
                    }
                    return Ok((args, i + 1));
                }
            }
            ',' if !quoted && depth == 1 => {
                args.push(arg.trim().to_string());
                arg.clear();
                continue;
            }
            _ => {}
        }
        arg.push(c);
    }
    Err(format!("unclosed macro call {s:?}"))
}

/// `'5m'` (or `5m`) in seconds.
fn interval_secs(arg: &str) -> Result<i64, String> {
    let a = arg.trim_matches('\'');
    let split = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
    let n: i64 = a[..split].parse().map_err(|_| format!("interval {arg}"))?;
    let unit = match &a[split..] {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("interval {arg}: a unit this test does not know")),
    };
    Ok(n * unit)
}

/// Grafana's PostgreSQL macros, as its backend expands them (the time range in RFC 3339, UTC).
fn expand_macro(name: &str, args: Option<&[String]>, ctx: &Ctx) -> Result<String, String> {
    let ts = |t: OffsetDateTime| t.format(&Rfc3339).unwrap();
    let (from, to) = (ts(ctx.from), ts(ctx.to));
    Ok(match (name, args) {
        ("timeFilter", Some([col])) => format!("{col} BETWEEN '{from}' AND '{to}'"),
        ("timeFrom", Some([])) => format!("'{from}'"),
        ("timeTo", Some([])) => format!("'{to}'"),
        ("time", Some([col])) => format!("{col} AS \"time\""),
        ("timeEpoch", Some([col])) => format!("extract(epoch from {col}) AS \"time\""),
        ("timeGroup" | "timeGroupAlias", Some([col, interval, ..])) => {
            let s = interval_secs(interval)?;
            let alias = if name == "timeGroupAlias" {
                " AS \"time\""
            } else {
                ""
            };
            format!("floor(extract(epoch from {col})/{s})*{s}{alias}")
        }
        ("unixEpochFilter", Some([col])) => format!(
            "{col} >= {} AND {col} <= {}",
            ctx.from.unix_timestamp(),
            ctx.to.unix_timestamp()
        ),
        ("interval", None) => "1m".into(),
        ("interval_ms", None) => "60000".into(),
        ("from", None) => (ctx.from.unix_timestamp() * 1000).to_string(),
        ("to", None) => (ctx.to.unix_timestamp() * 1000).to_string(),
        _ => {
            return Err(format!(
                "$__{name}{}: a macro this test does not expand (add it here)",
                args.map(|a| format!("({})", a.join(", ")))
                    .unwrap_or_default()
            ))
        }
    })
}

fn expand_macros(sql: &str, ctx: &Ctx) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find("$__") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 3..];
        let n = word_len(after);
        let name = &after[..n];
        let mut tail = &after[n..];
        let args = if tail.starts_with('(') {
            let (args, len) = macro_args(tail)?;
            tail = &tail[len..];
            Some(args)
        } else {
            None
        };
        out.push_str(&expand_macro(name, args.as_deref(), ctx)?);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// The SQL Grafana would send: variables, then macros; any `$` left is a reference to nothing.
fn interpolate(sql: &str, ctx: &Ctx) -> Result<String, String> {
    let out = expand_macros(&substitute_variables(sql, &ctx.vars)?, ctx)?;
    match out.find('$') {
        Some(i) => Err(format!(
            "{:?} is no variable of this dashboard (or one that failed above)",
            out[i..].chars().take(24).collect::<String>()
        )),
        None => Ok(out),
    }
}

/// A result as (column names, rows).
fn parse_table(out: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = out.lines();
    let header = lines
        .next()
        .unwrap_or_default()
        .split(FIELD_SEP)
        .map(String::from)
        .collect();
    let rows = lines
        .map(|l| l.split(FIELD_SEP).map(String::from).collect())
        .collect();
    (header, rows)
}

/// Each query variable, in order (a later one may use an earlier one), run against the sample;
/// its first option (all of them, when multi-value or include-All) is its value from then on.
fn evaluate_variables(file: &str, d: &Value, pg: &Postgres, ctx: &mut Ctx) -> Vec<String> {
    let mut bad = Vec::new();
    for v in variables(d) {
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let multi = v["multi"] == true || v["includeAll"] == true;
        let values: Vec<String> = match v["type"].as_str() {
            Some("datasource") => continue,
            Some("query") => {
                let Some(sql) = variable_sql(v) else { continue };
                let result = interpolate(sql, ctx).and_then(|q| {
                    pg.psql_table(&q, READ_ONLY)
                        .map_err(|e| format!("{e}\n    SQL: {q}"))
                });
                match result {
                    Ok(out) => {
                        let (header, rows) = parse_table(&out);
                        let col = header.iter().position(|h| h == "__value").unwrap_or(0);
                        rows.into_iter().map(|mut r| r.swap_remove(col)).collect()
                    }
                    Err(e) => {
                        bad.push(format!("{file}: variable {name}: {e}"));
                        continue;
                    }
                }
            }
            Some("custom") => v["query"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            Some("constant" | "textbox") => vec![v["query"].as_str().unwrap_or_default().into()],
            other => {
                bad.push(format!(
                    "{file}: variable {name}: type {other:?} not known to this test"
                ));
                continue;
            }
        };
        if values.is_empty() {
            bad.push(format!(
                "{file}: variable {name}: no options on the sample data"
            ));
            continue;
        }
        let values = if multi { values } else { values[..1].to_vec() };
        ctx.vars.insert(name, Var { values, multi });
    }
    bad
}

/// Every panel target, run read-only against the sample: it must run, return rows, and a
/// time series must have a `time` column.
fn run_panels(file: &str, d: &Value, pg: &Postgres, ctx: &Ctx) -> Vec<String> {
    let mut bad = Vec::new();
    for p in panels(d) {
        for target in items(&p["targets"]) {
            let Some(sql) = target["rawSql"].as_str() else {
                continue;
            };
            let what = format!(
                "{file}: {} target {}",
                title(p),
                target["refId"].as_str().unwrap_or("?")
            );
            let sql = match interpolate(sql, ctx) {
                Ok(s) => s,
                Err(e) => {
                    bad.push(format!("{what}: {e}"));
                    continue;
                }
            };
            match pg.psql_table(&sql, READ_ONLY) {
                Err(e) => bad.push(format!("{what}: {e}\n    SQL: {sql}")),
                Ok(out) => {
                    let (header, rows) = parse_table(&out);
                    if rows.is_empty() {
                        bad.push(format!(
                            "{what}: no rows on the sample data (a filter that never \
                             matches? or add sample rows in district_dashboard.rs)\n    SQL: {sql}"
                        ));
                    }
                    if target["format"] == "time_series" && !header.iter().any(|h| h == "time") {
                        bad.push(format!("{what}: format time_series without a time column"));
                    }
                }
            }
        }
    }
    bad
}

#[test]
fn every_district_dashboard_query_runs_against_the_schema() {
    let boards = dashboards();
    assert!(
        boards
            .iter()
            .any(|(_, d)| d["uid"] == "zhian-district-layers"),
        "contrib/grafana/district/ has no dashboard with uid zhian-district-layers"
    );
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    for (file, d) in &boards {
        problems.extend(static_problems(file, d, &mut uids));
    }

    let dir = tempfile::Builder::new()
        .prefix("zhian-e2e-dashboard-")
        .tempdir()
        .expect("create tempdir");
    let pg = Postgres::start(&dir.path().join("pg"), free_port());
    for m in migrations() {
        if let Err(e) = pg.psql_file(&m) {
            panic!("{}: {e}", m.display());
        }
    }
    if let Err(e) = pg.psql_table(SAMPLE, "") {
        panic!("the sample data: {e}");
    }

    let to = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut queries = 0;
    for (file, d) in &boards {
        let mut ctx = Ctx {
            from: to - Duration::days(7),
            to,
            vars: BTreeMap::new(),
        };
        problems.extend(evaluate_variables(file, d, &pg, &mut ctx));
        problems.extend(run_panels(file, d, &pg, &ctx));
        queries += variables(d).len() + panels(d).len();
        eprintln!(
            "{file}: {} panels; variables {}",
            panels(d).len(),
            ctx.vars
                .iter()
                .map(|(k, v)| format!("{k}={:?}", v.values))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) in contrib/grafana/district/ (docs/district-dashboard.md):\n{}",
        problems.len(),
        problems.join("\n")
    );
    eprintln!(
        "{} dashboards, {queries} panels and variables, every query ran",
        boards.len()
    );
}
