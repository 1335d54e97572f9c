//! Loading: built-in defaults < TOML file < `ZHIAN_<SECTION>__<KEY>` environment; secrets from
//! files and systemd credentials; serde and `config` errors turned into [`Problem`]s that name
//! the key; `check-config`'s notes on example values and environment overrides.

use super::*;

/// Load the configuration from `path` (if it exists or was named explicitly) and the environment.
///
/// `explicit` says whether the path came from `--config`: a missing explicit file is an error,
/// a missing default file is not (defaults plus environment may be enough).
pub fn load(path: &Path, explicit: bool) -> Result<Config, Vec<Problem>> {
    load_with_env(path, explicit, None)
}

/// As [`load`], with the environment given as a map (tests) instead of read from the process.
pub fn load_with_env(
    path: &Path,
    explicit: bool,
    env: Option<config::Map<String, String>>,
) -> Result<Config, Vec<Problem>> {
    load_layers(path, explicit, env, None)
}

/// As [`load_with_env`], with a fleet fragment (TOML) between the file and the environment:
/// defaults < file < `overlay` < environment (contract: "Fleet configuration"; the installer's
/// environment stays the last word). What the fragment may set is `crate::fleet`'s to check.
pub fn load_layers(
    path: &Path,
    explicit: bool,
    env: Option<config::Map<String, String>>,
    overlay: Option<&str>,
) -> Result<Config, Vec<Problem>> {
    // Only ZHIAN_<SECTION>__<KEY> variables are config: another ZHIAN_* variable of the
    // environment (ZHIAN_BIN in a script, say) is not a key and must not fail the load.
    let env = env.unwrap_or_else(|| std::env::vars().collect());
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix("ZHIAN_")
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect();
    let file = if path.exists() {
        Some(config::File::from(path.to_path_buf()).format(config::FileFormat::Toml))
    } else if explicit || !env.contains_key("ZHIAN_GATEWAY__ID") {
        // Without the file, only an environment that gives at least gateway.id is a config.
        return Err(vec![problem(
            "config",
            format!(
                "file {} does not exist (give the right --config PATH)",
                path.display()
            ),
        )]);
    } else {
        None
    };
    let build = |env: config::Map<String, String>| {
        let mut builder = config::Config::builder();
        if let Some(f) = &file {
            builder = builder.add_source(f.clone());
        }
        if let Some(o) = overlay {
            builder = builder.add_source(config::File::from_str(o, config::FileFormat::Toml));
        }
        let environment = config::Environment::with_prefix("ZHIAN")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("mqtt.topics")
            .with_list_parse_key("alerts.actions")
            .source(Some(env));
        finish(builder.add_source(environment))
    };
    match build(env.clone()) {
        Ok(c) => Ok(c),
        Err(problems) if !env.is_empty() => {
            // Blame the environment, not the file, for what only the environment brings: a
            // typo such as ZHIAN_UPSTREAM__PASWORD.
            let file_alone = build(config::Map::new()).err().unwrap_or_default();
            Err(problems
                .into_iter()
                .map(|p| {
                    if file_alone.contains(&p) {
                        return p;
                    }
                    let var = env_var_for(&p.key, &env);
                    match var {
                        Some(var) => problem(
                            format!("{var} (environment)"),
                            format!("{}: {}", p.key, p.message),
                        ),
                        None => p,
                    }
                })
                .collect())
        }
        Err(problems) => Err(problems),
    }
}

/// The environment variable that sets `key` (`upstream.pasword` -> `ZHIAN_UPSTREAM__PASWORD`),
/// if one is set; for a key path naming only a section, the first variable of that section
/// whose key is unknown.
pub(crate) fn env_var_for(key: &str, env: &config::Map<String, String>) -> Option<String> {
    let exact = format!("ZHIAN_{}", key.replace('.', "__").to_ascii_uppercase());
    if env.contains_key(&exact) {
        return Some(exact);
    }
    let section = format!(
        "ZHIAN_{}__",
        key.split('.').next().unwrap_or("").to_ascii_uppercase()
    );
    let mut vars: Vec<&String> = env.keys().filter(|k| k.starts_with(&section)).collect();
    vars.sort();
    vars.first().map(|v| v.to_string())
}

/// Defaults < `text` (TOML), no environment: the embedded demo site.
pub fn load_str(text: &str) -> Result<Config, Vec<Problem>> {
    finish(
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml)),
    )
}

pub(crate) fn finish(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
) -> Result<Config, Vec<Problem>> {
    let raw = builder.build().map_err(|e| vec![from_config_error(e)])?;
    let mut cfg: Config = serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        vec![problem(
            if path == "." { "config".into() } else { path },
            strip_key_suffix(&inner.to_string()),
        )]
    })?;
    // `data/.`, `a/../data`: one spelling per directory, so "is the key dir inside the data
    // dir" and the default key dir beside it are decided on the path meant.
    cfg.gateway.data_dir = normalize_path(&cfg.gateway.data_dir);
    cfg.privacy.key_dir = cfg.privacy.key_dir.as_deref().map(normalize_path);
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut problems = resolve_secrets(&mut cfg, creds.as_deref());
    problems.extend(validate(&cfg));
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(problems)
    }
}

/// `p` without `.` components and with `..` applied to what precedes it (lexically: a `..`
/// after a symlink is resolved against the link's name, which `start` checks on disk).
pub fn normalize_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() && !p.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Fill each password from its `password_file`, or from the systemd credential named
/// `{section}.password` (`status.password_hash` for the page) when neither is given.
/// A relative `password_file` is looked up in `creds` (`$CREDENTIALS_DIRECTORY`, set by systemd
/// for `LoadCredential=` / `LoadCredentialEncrypted=`). The file's first line is the secret.
pub(crate) fn resolve_secrets(c: &mut Config, creds: Option<&Path>) -> Vec<Problem> {
    let mut p = Vec::new();
    let slots: [(&str, &mut Option<Secret>, Option<&PathBuf>); 4] = [
        ("mqtt", &mut c.mqtt.password, c.mqtt.password_file.as_ref()),
        (
            "upstream",
            &mut c.upstream.password,
            c.upstream.password_file.as_ref(),
        ),
        (
            "broker",
            &mut c.broker.password,
            c.broker.password_file.as_ref(),
        ),
        ("status", &mut c.status.password_hash, None),
    ];
    for (section, slot, file) in slots {
        if let Err(e) = fill_secret(section, slot, file, creds) {
            p.push(e);
        }
    }
    p
}

/// The reference config's example values still in `c`, one note each (`check-config` prints
/// them; they are valid, but no real site uses them).
pub fn example_notes(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if c.gateway.id == "fy-fuchun-jiangbin-01" {
        out.push("gateway.id is the reference config's example: give each box its own (two boxes with one id take each other's connections)".to_string());
    }
    for (key, url) in [("mqtt.url", &c.mqtt.url), ("upstream.url", &c.upstream.url)] {
        if let Ok(u) = BrokerUrl::parse(url) {
            if u.host.ends_with(".example") || u.host.ends_with(".invalid") {
                out.push(format!(
                    "{key} {url} is an example host: put the real broker's"
                ));
            }
        }
    }
    for (i, d) in c.modbus.devices.iter().enumerate() {
        if d.example {
            out.push(format!("modbus.devices[{i}] ({}) is an example (example = true): checked, never polled; remove the flag once it describes a real device", d.name));
        }
    }
    out
}

/// Environment variables that look meant for the config but are not read: `ZHIAN_<SECTION>_<KEY>`
/// with one underscore where two are needed. One line each, for `check-config` and the log.
pub fn env_notes(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    const SECTIONS: [&str; 16] = [
        "GATEWAY",
        "BROKER",
        "MQTT",
        "DEDUP",
        "AGGREGATE",
        "STORE",
        "UPSTREAM",
        "STATUS",
        "PRIVACY",
        "ALERTS",
        "MODBUS",
        "CLOCK",
        "HEALTH",
        "CARE",
        "FLEET",
        "OCCUPANCY",
    ];
    let mut out: Vec<String> = env
        .into_iter()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix("ZHIAN_")?;
            if rest.contains("__") {
                return None;
            }
            let (section, key) = rest.split_once('_')?;
            SECTIONS.contains(&section).then(|| {
                format!(
                    "{k} is not read: config variables are ZHIAN_<SECTION>__<KEY>, two underscores (ZHIAN_{section}__{key}?)"
                )
            })
        })
        .collect();
    out.sort();
    out
}
