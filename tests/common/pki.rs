//! Test PKI made with the `openssl` command: CAs and leaf certificates (P-256), optionally
//! signed under libfaketime so a certificate can be already expired.

use std::path::Path;
use std::process::{Command, Stdio};

fn openssl(pki: &Path, args: &[&str], faketime: Option<&str>) {
    let mut cmd = match faketime {
        Some(at) => {
            let mut c = Command::new("faketime");
            c.arg("-f").arg(at).arg("openssl");
            c
        }
        None => Command::new("openssl"),
    };
    let ok = cmd
        .current_dir(pki)
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl (and faketime)")
        .success();
    assert!(ok, "openssl {args:?}");
}

/// A CA in `pki/{name}.pem` and `pki/{name}.key`, valid for a day from now.
pub fn make_ca(pki: &Path, name: &str) {
    make_ca_with(pki, name, None, 1);
}

/// A CA valid for `days` from the time `faketime` gives (e.g. `"-3d"`), or now.
pub fn make_ca_with(pki: &Path, name: &str, faketime: Option<&str>, days: u32) {
    let (key, pem, subj, days) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={name}"),
        days.to_string(),
    );
    openssl(
        pki,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            &days,
            "-subj",
            &subj,
            "-keyout",
            &key,
            "-out",
            &pem,
        ],
        faketime,
    );
}

/// An end-entity certificate for 127.0.0.1 signed by the CA `ca`, in `pki/{name}.pem` and
/// `pki/{name}.key`, valid for a day.
pub fn make_leaf(pki: &Path, name: &str, ca: &str) {
    make_leaf_with(pki, name, ca, "IP:127.0.0.1", None);
}

/// As [`make_leaf`] for the subject alternative names `san` (e.g. `"DNS:district.example"`),
/// signed at the time `faketime` gives (e.g. `"-3d"`: expired two days ago), or now.
pub fn make_leaf_with(pki: &Path, name: &str, ca: &str, san: &str, faketime: Option<&str>) {
    let (key, pem, csr, ext) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    std::fs::write(
        pki.join(&ext),
        format!("basicConstraints=CA:FALSE\nsubjectAltName={san}\n"),
    )
    .unwrap();
    openssl(
        pki,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
        None,
    );
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
        faketime,
    );
}
