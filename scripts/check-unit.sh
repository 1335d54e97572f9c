#!/usr/bin/env bash
# Verifies systemd/zhian-gateway.service with `systemd-analyze verify` (against the binary just
# built, put where the unit expects it) and prints its `systemd-analyze security` exposure.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/zhian-gateway}
if ! command -v systemd-analyze >/dev/null; then
  echo "check-unit.sh: installing systemd (for systemd-analyze)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; } >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The unit names /usr/local/bin/zhian-gateway; verify a copy that points at the built binary.
sed "s#/usr/local/bin/zhian-gateway#$(realpath "$bin")#g" systemd/zhian-gateway.service > "$tmp/zhian-gateway.service"
out=$(systemd-analyze verify "$tmp/zhian-gateway.service" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "$out"; echo "check-unit.sh: systemd-analyze verify is not clean"; exit 1; fi
echo "systemd-analyze verify: clean"
systemd-analyze security --offline=true "$tmp/zhian-gateway.service" 2>/dev/null | tail -n 1
