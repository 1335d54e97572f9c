//! What the daemon will need at start, checked before it starts (contract: "CLI",
//! `check-config`): the data dir is absolute, exists or can be created, and is writable; every
//! file a key names is readable; all as the user running the check. `sudo -u zhian
//! zhian-gateway check-config` therefore answers for the service user.

use crate::config::{problem, Config, Problem};
use std::path::Path;

/// Problems with the data dir and the files the config names, one per key.
pub fn check_start_needs(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    check_data_dir(&c.gateway.data_dir, &mut p);
    if (c.privacy.subjects != crate::config::SubjectMode::Drop || !c.care.residents.is_empty())
        && c.gateway.data_dir.is_absolute()
        && c.privacy.key_dir.as_ref().is_none_or(|k| k.is_absolute())
    {
        let keys = c.privacy.key_dir(&c.gateway.data_dir);
        if resolves_inside(&keys, &c.gateway.data_dir) {
            p.push(problem(
                "privacy.key_dir",
                format!(
                    "{} is inside gateway.data_dir once symlinks are followed: a backup of the data dir would hold the keys",
                    keys.display()
                ),
            ));
        } else {
            check_dir_writable("privacy.key_dir", &keys, &mut p);
        }
    }
    let files = [
        ("mqtt.ca_file", c.mqtt.ca_file.as_deref()),
        ("mqtt.client_cert", c.mqtt.client_cert.as_deref()),
        ("mqtt.client_key", c.mqtt.client_key.as_deref()),
        ("upstream.ca_file", c.upstream.ca_file.as_deref()),
        ("upstream.client_cert", c.upstream.client_cert.as_deref()),
        ("upstream.client_key", c.upstream.client_key.as_deref()),
    ];
    if let Some(trust) = &c.fleet.trust {
        if let Err(e) = zhian_common::fleet_key::Trust::load(trust) {
            p.push(problem("fleet.trust", format!("{e} (as {})", whoami())));
        }
    }
    for (key, path) in files {
        if let Some(path) = path {
            match std::fs::read(path) {
                Err(e) => p.push(problem(
                    key,
                    format!("cannot read {} as {}: {e}", path.display(), whoami()),
                )),
                Ok(bytes) => {
                    if let Err(why) = pem_holds(key, &bytes) {
                        p.push(problem(key, format!("{}: {why}", path.display())));
                    }
                }
            }
        }
    }
    p
}

/// Whether a PEM file holds what its key needs: certificates for `ca_file` and `client_cert`,
/// a private key for `client_key` (the daemon would otherwise fail at its first TLS connect).
fn pem_holds(key: &str, bytes: &[u8]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if key.ends_with("client_key") {
        PrivateKeyDer::from_pem_slice(bytes)
            .map(|_| ())
            .map_err(|e| format!("no PEM private key in it ({e:?})"))
    } else {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates ({e:?})"))?;
        if certs.is_empty() {
            Err("no PEM certificate in it".into())
        } else {
            Ok(())
        }
    }
}

fn check_data_dir(dir: &Path, p: &mut Vec<Problem>) {
    if dir.as_os_str().is_empty() {
        return; // reported by validate()
    }
    if !dir.is_absolute() {
        p.push(problem(
            "gateway.data_dir",
            format!(
                "{} is relative: give an absolute path (the service's working directory is /)",
                dir.display()
            ),
        ));
        return;
    }
    // An existing store file must be writable too (a restore or a run as root leaves it
    // root-owned; the daemon would then retry opening it for ever).
    let store_file = dir.join(crate::store::FILE_NAME);
    if store_file.exists() {
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(&store_file) {
            p.push(problem(
                "gateway.data_dir",
                format!(
                    "cannot write the store file {} as {}: {e} (chown it to the service user)",
                    store_file.display(),
                    whoami()
                ),
            ));
        }
    }
    check_dir_writable("gateway.data_dir", dir, p);
}

/// Whether `inner` is (or is under) `outer` once the existing part of each path has its
/// symlinks followed.
pub fn resolves_inside(inner: &Path, outer: &Path) -> bool {
    fn resolve(p: &Path) -> std::path::PathBuf {
        let mut existing = p;
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent;
                }
                _ => return p.to_path_buf(),
            }
        }
        let mut out = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
        for name in rest.into_iter().rev() {
            out.push(name);
        }
        out
    }
    resolve(inner).starts_with(resolve(outer))
}

/// The directory `key` names exists and is writable, or its nearest existing ancestor is (the
/// daemon creates the rest).
fn check_dir_writable(key: &str, dir: &Path, p: &mut Vec<Problem>) {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) => existing = parent,
            None => break,
        }
    }
    if !existing.is_dir() {
        p.push(problem(
            key,
            format!("{} is not a directory", existing.display()),
        ));
        return;
    }
    let probe = existing.join(format!(".zhian-check-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => p.push(problem(
            key,
            if existing == dir {
                format!("cannot write in {} as {}: {e}", dir.display(), whoami())
            } else {
                format!(
                    "{} does not exist and cannot be created: cannot write in {} as {}: {e}",
                    dir.display(),
                    existing.display(),
                    whoami()
                )
            },
        )),
    }
}

/// "user NAME (uid N)" for the messages.
fn whoami() -> String {
    // SAFETY: geteuid never fails; getpwuid returns a pointer into static storage or null.
    let uid = unsafe { libc::geteuid() };
    let name = unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() {
            None
        } else {
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_str()
                .ok()
                .map(str::to_string)
        }
    };
    match name {
        Some(n) => format!("user {n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_dir_reached_through_a_symlink_or_dots_is_inside() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&data, d.path().join("link")).unwrap();
        assert!(resolves_inside(&d.path().join("link/keys"), &data));
        assert!(resolves_inside(&data.join("keys"), &data));
        assert!(!resolves_inside(&d.path().join("data.keys"), &data));
        assert_eq!(
            crate::config::normalize_path(std::path::Path::new("/a/x/../data/./keys/")),
            std::path::PathBuf::from("/a/data/keys")
        );
        let mut c = Config::default();
        c.gateway.data_dir = data.clone();
        c.privacy.key_dir = Some(d.path().join("link/keys"));
        let p = check_start_needs(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "privacy.key_dir");
    }

    #[test]
    fn a_relative_or_unwritable_data_dir_and_an_unreadable_file_are_named() {
        let mut c = Config::default();
        c.gateway.data_dir = "data".into();
        c.upstream.ca_file = Some("/nonexistent/ca.pem".into());
        let p = check_start_needs(&c);
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["gateway.data_dir", "upstream.ca_file"], "{p:?}");
        let scratch = tempfile::tempdir().unwrap();
        c.gateway.data_dir = scratch.path().join("a/b");
        c.upstream.ca_file = None;
        assert!(check_start_needs(&c).is_empty());
        // A file where a directory should be.
        std::fs::write(scratch.path().join("f"), "").unwrap();
        c.gateway.data_dir = scratch.path().join("f/data");
        let p = check_start_needs(&c);
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["gateway.data_dir", "privacy.key_dir"], "{p:?}");
        // The key dir is checked on its own.
        c.gateway.data_dir = scratch.path().join("data");
        c.privacy.key_dir = Some(scratch.path().join("f/keys"));
        let p = check_start_needs(&c);
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["privacy.key_dir"], "{p:?}");
        c.privacy.key_dir = None;
        // A CA file that holds no certificate.
        std::fs::write(scratch.path().join("ca.pem"), "dummy").unwrap();
        c.gateway.data_dir = scratch.path().join("data");
        c.upstream.ca_file = Some(scratch.path().join("ca.pem"));
        let p = check_start_needs(&c);
        assert!(p[0].message.contains("no PEM certificate"), "{p:?}");
    }
}
