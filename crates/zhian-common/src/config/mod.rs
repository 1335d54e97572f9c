//! Config pieces both roles use: value types ([`Dur`], [`ByteSize`], [`Secret`],
//! [`BrokerUrl`], [`UtcOffset`]), the [`Problem`] that names its key, secrets from files and
//! systemd credentials ([`fill_secret`]), `config` crate errors turned into problems
//! ([`from_config_error`], never quoting a file that may hold secrets), and checks shared by
//! both configs' validation.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod values;
pub use values::*;

/// One configuration problem, tied to a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A problem with `key`. The message is cleaned of secrets (a URL's password, the value of a
/// `password = ...` line a syntax error quotes) and of control characters, since it is printed
/// and logged.
pub fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    let message = crate::logfmt::redact_secrets(&message.into());
    let message = message
        .split('\n')
        .map(crate::logfmt::escape_controls)
        .collect::<Vec<_>>()
        .join("\n");
    Problem {
        key: crate::logfmt::escape_controls(&key.into()),
        message,
    }
}

/// One section's secret: from its `password_file` (relative: in `creds`), or, when neither it
/// nor the value is given, from the credential `{section}.password` (`status.password_hash`
/// for the page). The file's first line is the secret.
pub fn fill_secret(
    section: &str,
    slot: &mut Option<Secret>,
    file: Option<&PathBuf>,
    creds: Option<&Path>,
) -> Result<(), Problem> {
    let (key, name) = if section == "status" {
        ("status.password_hash".to_string(), "password_hash")
    } else {
        (format!("{section}.password_file"), "password")
    };
    let path = match (file, &*slot) {
        (Some(_), Some(_)) => {
            return Err(problem(
                &key,
                format!("give {section}.password or {key}, not both"),
            ));
        }
        (Some(f), None) if f.is_absolute() => f.clone(),
        (Some(f), None) => match creds {
            Some(dir) => dir.join(f),
            None => {
                return Err(problem(
                    &key,
                    format!(
                        "{} is relative: give an absolute path, or run under systemd with LoadCredential (it sets $CREDENTIALS_DIRECTORY)",
                        f.display()
                    ),
                ));
            }
        },
        (None, None) => match creds.map(|d| d.join(format!("{section}.{name}"))) {
            Some(f) if f.is_file() => f,
            _ => return Ok(()),
        },
        (None, Some(_)) => return Ok(()),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if first.is_empty() {
                Err(problem(&key, format!("{} is empty", path.display())))
            } else {
                *slot = Some(Secret(first.to_string()));
                Ok(())
            }
        }
        Err(e) => Err(problem(
            &key,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

pub fn strip_key_suffix(msg: &str) -> String {
    // config's own messages sometimes end with " for key `x`"; the path is already in front.
    let msg = match msg.find(" for key `") {
        Some(i) => &msg[..i],
        None => msg,
    };
    enum_choices(msg).unwrap_or_else(|| msg.to_string())
}

/// The values each config enum takes, for errors that name a value it does not take.
pub const ENUM_CHOICES: &[(&str, &str)] = &[
    (
        "Parity",
        "\"N\", \"E\", \"O\" (or \"none\", \"even\", \"odd\")",
    ),
    ("Table", "\"holding\", \"input\", \"coil\", \"discrete\""),
    ("PointType", "\"u16\", \"u32\", \"i32\", \"f32\", \"bool\""),
    ("WordOrder", "\"big\", \"little\""),
    ("Role", "\"counter\", \"state\""),
    ("Kind", "\"access\", \"camera\", \"vehicle\""),
    ("SubjectMode", "\"hashed\", \"drop\", \"plain\""),
    ("KeyRotation", "\"daily\", \"never\""),
    ("OnDamage", "\"quarantine\", \"refuse\""),
];

/// `config` reports an unknown enum value as "enum Parity does not have variant constructor X":
/// say which values are allowed instead.
pub fn enum_choices(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("enum ")?;
    let (name, value) = rest.split_once(" does not have variant constructor ")?;
    let (_, choices) = ENUM_CHOICES.iter().find(|(n, _)| *n == name)?;
    Some(format!("{value:?} is not one of {choices}"))
}

pub fn from_config_error(e: config::ConfigError) -> Problem {
    match e {
        // A TOML syntax error quotes the file around the error, which may be a password in any
        // form (a multi-line string, an inline table): keep only the position and what was
        // expected, never the file's text.
        config::ConfigError::FileParse { uri, cause } => {
            let text = cause.to_string();
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with('|')
                        || t.split_once('|')
                            .is_some_and(|(n, _)| n.trim().chars().all(|c| c.is_ascii_digit())))
                })
                .collect();
            problem(
                "config",
                format!(
                    "cannot parse {}: {} (the file's text is not shown: it may hold secrets)",
                    uri.unwrap_or_default(),
                    kept.join(" ")
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            )
        }
        config::ConfigError::Foreign(cause) => problem("config", cause.to_string()),
        other => problem("config", other.to_string()),
    }
}

pub fn check_client_id(p: &mut Vec<Problem>, key: &str, id: Option<&str>) {
    if let Some(id) = id {
        if id.is_empty() || id.len() > 128 {
            p.push(problem(key, "must be 1-128 characters"));
        }
    }
}

pub fn check_backoff(p: &mut Vec<Problem>, section: &str, min: Dur, max: Dur) {
    if min.0 < Duration::from_millis(10) {
        p.push(problem(format!("{section}.reconnect_min"), "at least 10ms"));
    }
    if max < min {
        p.push(problem(
            format!("{section}.reconnect_max"),
            format!("must be at least {section}.reconnect_min"),
        ));
    }
}

pub fn check_file(p: &mut Vec<Problem>, key: &str, path: Option<&Path>) {
    if let Some(path) = path {
        if !path.is_file() {
            p.push(problem(
                key,
                format!("{} is not a readable file", path.display()),
            ));
        }
    }
}
