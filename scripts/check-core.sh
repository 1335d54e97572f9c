#!/usr/bin/env bash
# The pure crates (crates/zhian-core: the logic; crates/zhian-proto: the upstream wire format)
# have no tokio, redb, network or storage crate in their dependency trees: ARCHITECTURE.md's
# "the core is pure", enforced by the build, not by a sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
for crate in zhian-core zhian-proto; do
  tree=$(cargo tree --locked -p "$crate" --edges normal,build --prefix none --format '{p}')
  bad=$(printf '%s\n' "$tree" | awk '{print $1}' | grep -E '^(tokio|tokio-[a-z-]+|mio|redb|rumqttc|rumqttd|axum|hyper|tokio-modbus|tokio-serial|tokio-postgres|postgres-[a-z-]+|socket2|rustls)$' | sort -u || true)
  if [ -n "$bad" ]; then
    echo "check-core.sh: $crate's tree holds crates a pure crate must not use:"
    echo "$bad"
    exit 1
  fi
  echo "$crate: $(printf '%s\n' "$tree" | awk '{print $1}' | sort -u | wc -l) crates in its tree, none of tokio, redb or a network crate"
done
# Module floors inside the gateway crate (no cycles): config is the floor (it imports no module
# that reads a config), and stats (the shared counters) imports no module that reads stats.
floor() { # floor DIR_OR_FILE MODULES...
  local what=$1; shift
  local pat; pat=$(printf 'crate::%s\\b|' "$@"); pat=${pat%|}
  if grep -rnE "$pat" "$what" | grep -vE "^[^:]+:[0-9]+:\s*//"; then
    echo "check-core.sh: $what imports a module above it ($*)"
    exit 1
  fi
}
floor src/config store stats health committer forwarder ingest status district preflight
floor src/stats.rs health committer forwarder ingest status
echo "module floors: config imports no module above it; stats imports neither health nor a task"
# The receiver has no store of the box's: no redb, no embedded broker in its tree.
rtree=$(cargo tree --locked -p zhian-district --edges normal,build --prefix none --format '{p}' | awk '{print $1}' | sort -u)
if printf '%s\n' "$rtree" | grep -qE '^(redb|rumqttd|zhian-gateway)$'; then
  echo "check-core.sh: zhian-district's tree holds the box's store, broker or package"
  exit 1
fi
echo "zhian-district: $(printf '%s\n' "$rtree" | wc -l) crates in its tree, no redb, embedded broker or gateway package"
