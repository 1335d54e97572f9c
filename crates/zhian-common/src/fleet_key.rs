//! The fleet key (contract: "Fleet configuration"): an Ed25519 key pair whose private half signs
//! configuration changes and diagnostic requests at the district, and whose public half a box
//! trusts (`[fleet] trust`). Ed25519 is `ring`'s (already in the tree through rustls: no new
//! crate).
//!
//! On disk, both in PEM so `openssl pkey` reads them:
//! - `fleet.key`: `-----BEGIN PRIVATE KEY-----`, PKCS#8 v1 (RFC 8410 §7, what
//!   `openssl genpkey -algorithm ed25519` writes; v2 is read too), mode 0600;
//! - `fleet.pub`: `-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo (RFC 8410). A trust file may
//!   hold several such blocks: a box accepts a signature by any of them (how a key is rotated
//!   without a visit, docs/fleet.md).
//!
//! Signatures travel as standard base64 with padding (64 bytes signed, 88 characters).

use base64::Engine as _;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use std::io::Write;
use std::path::{Path, PathBuf};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4): the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// File names `fleet keygen` writes.
pub const PRIVATE_FILE: &str = "fleet.key";
pub const PUBLIC_FILE: &str = "fleet.pub";

fn pem(label: &str, der: &[u8]) -> String {
    let b = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Every `label` block's DER in `text`, in order.
fn pem_blocks(text: &str, label: &str) -> Result<Vec<Vec<u8>>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let j = after
            .find(&end)
            .ok_or_else(|| format!("a {begin} block has no {end}"))?;
        let body: String = after[..j].split_whitespace().collect();
        out.push(
            B64.decode(body.as_bytes())
                .map_err(|e| format!("a {label} block is not base64: {e}"))?,
        );
        rest = &after[j + end.len()..];
    }
    Ok(out)
}

/// A private key that signs (`fleet push`, `fleet diag`).
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// Read `fleet.key`. Errors name the file and say what is wrong with it.
    pub fn load(path: &Path) -> Result<SigningKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let der = pem_blocks(&text, "PRIVATE KEY")
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_iter()
            .next()
            .ok_or_else(|| format!("{}: no PRIVATE KEY block", path.display()))?;
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(SigningKey)
            .map_err(|e| format!("{}: not an Ed25519 private key: {e}", path.display()))
    }

    /// The standard-base64 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> String {
        B64.encode(self.0.sign(msg).as_ref())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }
}

/// A public key a box trusts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The key as a `fleet.pub` PEM block.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem("PUBLIC KEY", &der)
    }

    /// A short name for logs and the page: the first 16 hex digits of the key's SHA-256.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// The keys of a trust file (`[fleet] trust`): one or more `PUBLIC KEY` blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust(pub Vec<PublicKey>);

impl Trust {
    /// Read a trust file. Errors name the file.
    pub fn load(path: &Path) -> Result<Trust, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Trust::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parse a trust file's text.
    pub fn parse(text: &str) -> Result<Trust, String> {
        let mut keys = Vec::new();
        for der in pem_blocks(text, "PUBLIC KEY")? {
            let raw = der
                .strip_prefix(&SPKI_PREFIX[..])
                .filter(|r| r.len() == 32)
                .ok_or("a PUBLIC KEY block is not an Ed25519 key (RFC 8410)")?;
            let mut k = [0u8; 32];
            k.copy_from_slice(raw);
            keys.push(PublicKey(k));
        }
        if keys.is_empty() {
            return Err("no PUBLIC KEY block (write it with `zhian-gateway fleet keygen`)".into());
        }
        Ok(Trust(keys))
    }

    /// Whether `sig` (standard base64) is a signature of `msg` by one of the keys.
    pub fn verify(&self, msg: &[u8], sig: &str) -> Result<(), String> {
        let sig = B64
            .decode(sig.trim().as_bytes())
            .map_err(|_| "signature is not base64".to_string())?;
        let ok = self.0.iter().any(|k| {
            signature::UnparsedPublicKey::new(&signature::ED25519, &k.0)
                .verify(msg, &sig)
                .is_ok()
        });
        if ok {
            Ok(())
        } else {
            Err("signature does not verify with the trusted fleet key".into())
        }
    }
}

/// The DER prefix of an Ed25519 PKCS#8 v1 private key (RFC 8410 §7): the 32-byte seed follows.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The v1 form of ring's v2 document (`30 53 02 01 01 30 05 06 03 2b 65 70 04 22 04 20 <seed>
/// a1 23 03 21 00 <public>`): the same seed under the v1 header.
fn pkcs8_v1(v2: &[u8]) -> Option<Vec<u8>> {
    let at = v2.windows(4).position(|w| w == [0x04, 0x22, 0x04, 0x20])? + 4;
    let seed = v2.get(at..at + 32)?;
    let mut out = PKCS8_V1_PREFIX.to_vec();
    out.extend_from_slice(seed);
    Some(out)
}

/// Make a key pair: `dir/fleet.key` (0600, created new: an existing key is never overwritten)
/// and `dir/fleet.pub`. Returns both paths.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| format!("keygen: {e}"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| format!("keygen: {e}"))?;
    // ring writes PKCS#8 v2 (the public key inside), which OpenSSL 3.0 does not read: keep the
    // v1 form (RFC 8410 §7: the 32-byte seed alone), which both read.
    let v1 = pkcs8_v1(pkcs8.as_ref()).ok_or("keygen: unexpected PKCS#8 layout from ring")?;
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    let key = dir.join(PRIVATE_FILE);
    let publ = dir.join(PUBLIC_FILE);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "{} exists: a fleet key is never overwritten (move it away to make a new one)",
                key.display()
            ),
            _ => format!("{}: {e}", key.display()),
        })?;
    f.write_all(pem("PRIVATE KEY", &v1).as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", key.display()))?;
    std::fs::write(&publ, PublicKey(public).to_pem())
        .map_err(|e| format!("{}: {e}", publ.display()))?;
    Ok((key, publ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_the_key_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("fleet-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (k, p) = keygen(&dir).unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&k).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert!(keygen(&dir).unwrap_err().contains("never overwritten"));
        let key = SigningKey::load(&k).unwrap();
        let trust = Trust::load(&p).unwrap();
        // OpenSSL reads the private key and derives the same public key (when it is installed:
        // the CI image has it).
        if let Ok(out) = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&k)
            .output()
        {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                std::fs::read_to_string(&p).unwrap()
            );
        }
        assert_eq!(trust.0, vec![key.public()]);
        let sig = key.sign(b"serial 7");
        assert_eq!(trust.verify(b"serial 7", &sig), Ok(()));
        assert!(trust.verify(b"serial 8", &sig).is_err());
        assert!(trust.verify(b"serial 7", "not base64!").is_err());
        // A second key in the trust file: either signs.
        let other = dir.join("other");
        let (k2, p2) = keygen(&other).unwrap();
        let key2 = SigningKey::load(&k2).unwrap();
        assert!(trust.verify(b"x", &key2.sign(b"x")).is_err());
        let both = Trust::parse(
            &(std::fs::read_to_string(&p).unwrap() + &std::fs::read_to_string(&p2).unwrap()),
        )
        .unwrap();
        assert_eq!(both.verify(b"x", &key2.sign(b"x")), Ok(()));
        assert_eq!(both.verify(b"x", &key.sign(b"x")), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_trust_file_without_a_key_or_with_another_algorithm_is_refused() {
        assert!(Trust::parse("").unwrap_err().contains("no PUBLIC KEY"));
        let rsa_like = pem("PUBLIC KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(Trust::parse(&rsa_like)
            .unwrap_err()
            .contains("not an Ed25519"));
    }
}
