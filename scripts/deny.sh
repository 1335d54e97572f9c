#!/usr/bin/env bash
# Supply chain: cargo-deny over the dependency tree (deny.toml): licenses, banned crates,
# sources (crates.io only), and RustSec advisories. Installs cargo-deny 0.20.2 from crates.io when
# missing (about 2 min on 2 cores). Advisories: the live database when GitHub answers, else the
# snapshot in supply-chain/ (offline; supply-chain/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
deny=$(command -v cargo-deny || true)
if [ -z "$deny" ]; then
  root=${CARGO_DENY_ROOT:-$HOME/.cargo}
  if [ ! -x "$root/bin/cargo-deny" ]; then
    echo "deny.sh: installing cargo-deny 0.20.2 into $root"
    cargo install --locked --quiet cargo-deny --version 0.20.2 --root "$root"
  fi
  deny=$root/bin/cargo-deny
fi
"$deny" --log-level error check bans licenses sources
if timeout 10 git ls-remote https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  "$deny" --log-level error check advisories
  echo "deny.sh: advisories checked against the live RustSec database"
else
  # cargo-deny finds a database under db-path in a directory named after its URL's hash.
  db=target/advisory-dbs
  rm -rf "$db" && mkdir -p "$db"
  git clone -q -b snapshot supply-chain/rustsec-advisory-db.bundle "$db/advisory-db-3157b0e258782691"
  sed 's|^\[advisories\]$|[advisories]\ndb-path = "target/advisory-dbs"|' deny.toml > target/deny-offline.toml
  "$deny" --log-level error --offline --config target/deny-offline.toml check advisories
  echo "deny.sh: advisories checked offline against supply-chain/rustsec-advisory-db.bundle ($(git -C "$db/advisory-db-3157b0e258782691" log -1 --format=%cs))"
fi
