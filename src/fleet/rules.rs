//! The fleet's decisions, pure (no I/O, no clock read: `now` is passed in): which keys a
//! fragment may set, what to do with an incoming change given what the box took before, and
//! whether a change on probation failed a health rule (contract: "Fleet configuration").

use super::FleetState;
use zhian_proto::ConfigPhase;

/// Keys a fragment may never set, wherever they appear: secrets (passwords, password files,
/// private keys) and file paths.
const FORBIDDEN_LEAVES: [&str; 10] = [
    "password",
    "password_file",
    "password_hash",
    "client_key",
    "client_cert",
    "ca_file",
    "data_dir",
    "key_dir",
    "path",
    "trust",
];

/// Whole keys and sections that stay with the installer: the box's identity and sessions
/// (`gateway.id`; the client ids and the upstream prefix, which a change could point at
/// another box's session or at a prefix the district does not read, and still pass
/// probation), whether the district link runs at all (without it there is no fleet link to
/// undo the change), privacy (the site's own decision), who the box trusts (`[fleet]`), and a
/// resident's card or face id.
const FORBIDDEN_KEYS: [&str; 8] = [
    "gateway.id",
    "mqtt.client_id",
    "upstream.client_id",
    "upstream.topic_prefix",
    "upstream.enabled",
    "privacy",
    "fleet",
    "care.residents[].subject",
];

/// The highest serial a change may carry: 2^53, the largest integer every JSON reader keeps
/// exactly (so no serial can be the last one: a box that took it could take no other).
pub const MAX_SERIAL: u64 = 1 << 53;

/// Whether the key path `p` (dotted, array elements as `[i]`) stays with the installer.
fn forbidden(p: &str) -> bool {
    let leaf = p.rsplit('.').next().unwrap_or(p);
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    // `care.residents[3].subject` -> `care.residents[].subject`.
    let generic: String = {
        let mut out = String::new();
        let mut skip = false;
        for c in p.chars() {
            match c {
                '[' => {
                    skip = true;
                    out.push('[');
                }
                ']' => {
                    skip = false;
                    out.push(']');
                }
                _ if skip => {}
                _ => out.push(c),
            }
        }
        out
    };
    FORBIDDEN_KEYS
        .iter()
        .any(|k| generic == *k || generic.starts_with(&format!("{k}.")))
        || FORBIDDEN_LEAVES.contains(&leaf)
        || leaf.ends_with("_file")
        || leaf.ends_with("_dir")
}

fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            if t.is_empty() && !prefix.is_empty() {
                out.push(prefix.to_string());
            }
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&p, v, out);
            }
        }
        toml::Value::Array(a) if a.iter().any(|x| x.is_table()) => {
            for (i, v) in a.iter().enumerate() {
                walk(&format!("{prefix}[{i}]"), v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// Every key path `fragment` sets, in file order (an array of tables by element:
/// `mqtt.sources[0].topic`). Errors: the fragment is not TOML.
pub fn key_paths(fragment: &str) -> Result<Vec<String>, String> {
    let t: toml::Table = fragment
        .parse()
        .map_err(|e: toml::de::Error| format!("fragment is not TOML: {}", e.message()))?;
    let mut out = Vec::new();
    walk("", &toml::Value::Table(t), &mut out);
    Ok(out)
}

/// The sections a fragment sets (`alerts`, `health`, ...), for the page and `check-config`:
/// a key path cut at its first array element.
pub fn overlay_keys(fragment: &str) -> Vec<String> {
    let mut keys: Vec<String> = key_paths(fragment)
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.split('[').next().unwrap_or(&p).to_string())
        .collect();
    keys.dedup();
    keys
}

/// Why a fragment is refused for the keys it sets (`None`: every key may come from the fleet).
pub fn refuse_keys(fragment: &str) -> Option<String> {
    let paths = match key_paths(fragment) {
        Ok(p) => p,
        Err(e) => return Some(e),
    };
    if paths.is_empty() {
        return None;
    }
    let bad: Vec<String> = paths.into_iter().filter(|p| forbidden(p)).collect();
    (!bad.is_empty()).then(|| {
        format!(
            "fragment sets {}: secrets, file paths, the box's identity and sessions, [privacy] and [fleet] stay with the installer",
            bad.join(", ")
        )
    })
}

/// What to do with a `config/set` the box received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The change this box already took or refused, delivered again (it is retained): nothing
    /// to do and nothing to report.
    Again,
    /// Refused before anything is applied: report `rejected` with this reason.
    Reject(String),
    /// Signature and serial pass: check the keys and the whole config next.
    Check,
}

/// Classify a change with `serial` and fragment digest `sha` whose signature check gave `sig`,
/// against what the box took before (`state`).
pub fn classify(state: &FleetState, serial: u64, sha: &str, sig: Result<(), String>) -> Verdict {
    let same = |s: u64, h: &str| s == serial && h == sha;
    let seen = state
        .trial
        .as_ref()
        .map(|t| &t.change)
        .into_iter()
        .chain(state.applied.as_ref())
        .any(|c| same(c.serial, &c.sha()))
        || [&state.rolled_back, &state.rejected]
            .into_iter()
            .flatten()
            .any(|o| same(o.serial, &o.sha));
    if seen {
        return Verdict::Again;
    }
    if let Err(e) = sig {
        return Verdict::Reject(e);
    }
    if serial > MAX_SERIAL {
        return Verdict::Reject(format!("serial {serial} is above 2^53"));
    }
    if serial <= state.last_serial {
        return Verdict::Reject(format!(
            "serial {serial} is not above {}, the last this box took (a replay, or push with --serial above it)",
            state.last_serial
        ));
    }
    Verdict::Check
}

/// One link as the probation rules see it.
#[derive(Debug, Clone)]
pub struct LinkFact {
    /// `site broker` or `district broker`.
    pub name: &'static str,
    pub url: String,
    pub connected: bool,
    /// Since when it has been in its current state (ms, wall clock).
    pub since_ms: i64,
    pub reason: Option<String>,
}

/// What the probation rules look at, read at `now_ms`.
#[derive(Debug, Clone)]
pub struct Health {
    pub now_ms: i64,
    /// When this probation (or this process, after a restart) began.
    pub since_ms: i64,
    /// `health.link_grace`, ms.
    pub grace_ms: i64,
    /// The links this config uses (site when `mqtt.enabled`, district when `upstream.enabled`).
    pub links: Vec<LinkFact>,
    /// Why intake is paused, if it is.
    pub paused: Option<String>,
    /// Core tasks that stopped.
    pub down: Vec<&'static str>,
}

/// The first health rule that fails, as the rollback's reason; `None` while all hold. A link
/// counts as down from the later of its going down and the probation's start, so a link that was
/// down before the change gets the whole grace too.
pub fn probation_failure(h: &Health) -> Option<String> {
    if !h.down.is_empty() {
        return Some(format!("task stopped: {}", h.down.join(", ")));
    }
    if let Some(p) = &h.paused {
        return Some(format!("intake paused: {p}"));
    }
    for l in &h.links {
        let down_for = h.now_ms - l.since_ms.max(h.since_ms);
        if !l.connected && down_for > h.grace_ms {
            return Some(format!(
                "{} {} down for {} s (health.link_grace {} s): {}",
                l.name,
                l.url,
                down_for / 1000,
                h.grace_ms / 1000,
                l.reason.as_deref().unwrap_or("not connected")
            ));
        }
    }
    None
}

/// The report to republish for `state` after a (re)connect, if any: its phase.
pub fn phase_of(state: &FleetState) -> Option<ConfigPhase> {
    state.report.as_ref().map(|r| r.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Change, Outcome, Trial};

    #[test]
    fn secrets_paths_identity_and_fleet_are_refused_and_the_rest_passes() {
        assert_eq!(
            refuse_keys("[alerts]\nactions = [\"loitering\"]\n[health]\ndefault = \"20m\"\n"),
            None
        );
        for (frag, key) in [
            ("[gateway]\nid = \"other\"\n", "gateway.id"),
            ("[gateway]\ndata_dir = \"/tmp\"\n", "gateway.data_dir"),
            ("[privacy]\nkey_dir = \"/tmp/k\"\n", "privacy.key_dir"),
            ("[upstream]\npassword = \"x\"\n", "upstream.password"),
            ("[mqtt]\npassword_file = \"/p\"\n", "mqtt.password_file"),
            (
                "[status]\npassword_hash = \"$argon2\"\n",
                "status.password_hash",
            ),
            (
                "[upstream]\nclient_key = \"/k.pem\"\n",
                "upstream.client_key",
            ),
            ("[fleet]\nprobation = \"1s\"\n", "fleet.probation"),
            (
                "[[care.residents]]\nalias = \"a\"\nsubject = \"card-1\"\n",
                "care.residents[0].subject",
            ),
            (
                "[[modbus.devices]]\nname = \"g\"\npath = \"/dev/ttyS0\"\n",
                "modbus.devices[0].path",
            ),
        ] {
            let why = refuse_keys(frag).unwrap_or_else(|| panic!("{frag} passed"));
            assert!(why.contains(key), "{why}");
        }
        assert!(refuse_keys("[alerts").unwrap().contains("not TOML"));
        // gateway labels are the district's to move; a vendor source's subject is a pointer.
        assert_eq!(refuse_keys("[gateway]\ncommunity = \"江滨社区\"\n"), None);
        assert_eq!(
            refuse_keys("[[mqtt.sources]]\ntopic = \"v/#\"\nsubject = \"/cardNo\"\n"),
            None
        );
        assert_eq!(refuse_keys("[upstream]\nheartbeat = \"30s\"\n"), None);
    }

    #[test]
    fn overlay_keys_name_what_the_fragment_sets() {
        assert_eq!(
            overlay_keys(
                "[alerts]\nactions = []\n[health]\ndefault = \"1m\"\nlink_grace = \"5s\"\n"
            ),
            ["alerts.actions", "health.default", "health.link_grace"]
        );
        assert_eq!(
            overlay_keys("[[mqtt.sources]]\nname = \"a\"\ntopic = \"x/#\"\n"),
            ["mqtt.sources"]
        );
    }

    fn change(serial: u64, fragment: &str) -> Change {
        Change {
            serial,
            fragment: fragment.into(),
            at_ms: 0,
        }
    }

    #[test]
    fn a_change_is_taken_once_refused_when_replayed_or_forged_and_quiet_when_redelivered() {
        let mut st = FleetState::default();
        let a = change(5, "[alerts]\nactions = []\n");
        assert_eq!(classify(&st, 5, &a.sha(), Ok(())), Verdict::Check);
        assert!(matches!(
            classify(&st, 5, &a.sha(), Err("bad signature".into())),
            Verdict::Reject(r) if r == "bad signature"
        ));
        st.trial = Some(Trial {
            change: a.clone(),
            starts: 0,
        });
        st.last_serial = 5;
        // The retained message again, even with its signature now judged: nothing to do.
        assert_eq!(classify(&st, 5, &a.sha(), Ok(())), Verdict::Again);
        // Same serial, other fragment: a replay.
        let b = change(5, "[alerts]\nactions = [\"x\"]\n");
        assert!(
            matches!(classify(&st, 5, &b.sha(), Ok(())), Verdict::Reject(r) if r.contains("not above 5"))
        );
        assert!(matches!(
            classify(&st, 4, &b.sha(), Ok(())),
            Verdict::Reject(_)
        ));
        assert_eq!(classify(&st, 6, &b.sha(), Ok(())), Verdict::Check);
        assert!(
            matches!(classify(&st, u64::MAX, &b.sha(), Ok(())), Verdict::Reject(r) if r.contains("2^53"))
        );
        assert_eq!(classify(&st, MAX_SERIAL, &b.sha(), Ok(())), Verdict::Check);
        st.rejected = Some(Outcome {
            serial: 6,
            reason: "r".into(),
            at_ms: 0,
            sha: b.sha(),
        });
        assert_eq!(
            classify(&st, 6, &b.sha(), Err("bad".into())),
            Verdict::Again
        );
    }

    fn health(links: Vec<LinkFact>) -> Health {
        Health {
            now_ms: 100_000,
            since_ms: 90_000,
            grace_ms: 5_000,
            links,
            paused: None,
            down: vec![],
        }
    }

    fn link(connected: bool, since_ms: i64) -> LinkFact {
        LinkFact {
            name: "site broker",
            url: "mqtt://127.0.0.1:1".into(),
            connected,
            since_ms,
            reason: Some("connection refused".into()),
        }
    }

    #[test]
    fn probation_fails_on_a_link_down_past_its_grace_a_pause_or_a_dead_task() {
        assert_eq!(probation_failure(&health(vec![link(true, 0)])), None);
        // Down since before the probation: the grace counts from its start (10 s > 5 s).
        let why = probation_failure(&health(vec![link(false, 0)])).unwrap();
        assert!(
            why.contains("site broker mqtt://127.0.0.1:1 down for 10 s"),
            "{why}"
        );
        // Down for 4 s only.
        assert_eq!(probation_failure(&health(vec![link(false, 96_000)])), None);
        let mut h = health(vec![]);
        h.paused = Some("disk full".into());
        assert!(probation_failure(&h)
            .unwrap()
            .contains("intake paused: disk full"));
        h.down = vec!["committer"];
        assert!(probation_failure(&h)
            .unwrap()
            .contains("task stopped: committer"));
    }
}
