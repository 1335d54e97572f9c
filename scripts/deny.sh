#!/usr/bin/env bash
# Supply chain: cargo-deny over the dependency tree (deny.toml): licenses, banned crates,
# sources (crates.io only). Installs cargo-deny 0.20.2 from crates.io when missing (about 2 min
# on 2 cores). Advisories need the RustSec database from GitHub: checked only when it answers.
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
else
  echo "deny.sh: GitHub unreachable: advisories not checked (run \`cargo deny check advisories\` where it is)"
fi
