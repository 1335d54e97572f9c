#!/usr/bin/env bash
# The box build (`--no-default-features --features box`: what the .deb and the ARM builds ship)
# holds no database client: not in its dependency tree, not in its binary, and its `district`
# command says so. Usage: check-box.sh BINARY (a box build, unstripped).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: check-box.sh BINARY}
tree=$(cargo tree --locked --no-default-features --features box -p zhian-gateway --edges normal,build --prefix none --format '{p}' | awk '{print $1}' | sort -u)
bad=$(printf '%s\n' "$tree" | grep -E '^(tokio-postgres|tokio-postgres-rustls|postgres-protocol|postgres-types|refinery|refinery-core)$' || true)
if [ -n "$bad" ]; then
  echo "check-box.sh: the box build's tree holds a database client:"
  echo "$bad"
  exit 1
fi
# Symbol and panic-location strings of a crate stay in an unstripped binary that links it.
if grep -a -q -E 'tokio_postgres|tokio-postgres-0\.|refinery_core' "$bin"; then
  echo "check-box.sh: $bin links a database client"
  exit 1
fi
out=$("$bin" district --config /dev/null 2>&1 || true)
printf '%s\n' "$out" | grep -q "this build has no district receiver" || {
  echo "check-box.sh: $bin district did not refuse: $out"
  exit 1
}
echo "box build: $(printf '%s\n' "$tree" | wc -l) crates in its tree, no database client in the tree or in $bin"
