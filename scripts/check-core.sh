#!/usr/bin/env bash
# The pure core (crates/zhian-core) has no tokio, redb, network or storage crate in its
# dependency tree: ARCHITECTURE.md's "the core is pure", enforced by the build, not by a sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree --locked -p zhian-core --edges normal,build --prefix none --format '{p}')
bad=$(printf '%s\n' "$tree" | awk '{print $1}' | grep -E '^(tokio|tokio-[a-z-]+|mio|redb|rumqttc|rumqttd|axum|hyper|tokio-modbus|tokio-serial|tokio-postgres|socket2|rustls)$' | sort -u || true)
if [ -n "$bad" ]; then
  echo "check-core.sh: zhian-core's tree holds crates the pure core must not use:"
  echo "$bad"
  exit 1
fi
echo "zhian-core: $(printf '%s\n' "$tree" | awk '{print $1}' | sort -u | wc -l) crates in its tree, none of tokio, redb or a network crate"
