#!/usr/bin/env bash
# Verifies systemd/zhian-gateway.service (the box) and contrib/systemd/zhian-district.service (the
# district receiver) with `systemd-analyze verify` (against the binary just built, put where the
# units expect it) and prints each one's `systemd-analyze security` exposure. Fails when either
# is not clean, or when the receiver's exposure is worse (higher) than the box's.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/zhian-gateway}
if ! command -v systemd-analyze >/dev/null; then
  echo "check-unit.sh: installing systemd (for systemd-analyze)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; } >/dev/null
fi
[ -x "$bin" ] || { echo "check-unit.sh: $bin is not executable (build first, or pass its path)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
real=$(realpath "$bin")

# check UNIT_FILE: verify a copy that points at the built binary; print and remember its exposure.
declare -A exposure
check() {
  local unit=$1 name copy out line
  name=$(basename "$unit")
  copy="$tmp/$name"
  # The units name /usr/local/bin/zhian-gateway.
  sed "s#/usr/local/bin/zhian-gateway#$real#g" "$unit" > "$copy"
  out=$(systemd-analyze verify "$copy" 2>&1) || {
    echo "$out"; echo "check-unit.sh: $name fails systemd-analyze verify"; exit 1
  }
  if [ -n "$out" ]; then
    echo "$out"; echo "check-unit.sh: systemd-analyze verify of $name is not clean"; exit 1
  fi
  echo "$name: systemd-analyze verify: clean"
  line=$(systemd-analyze security --offline=true "$copy" 2>/dev/null | tail -n 1)
  echo "$line"
  # "→ Overall exposure level for NAME: 1.5 OK 🙂"
  exposure[$name]=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$line")
  [ -n "${exposure[$name]}" ] || { echo "check-unit.sh: no exposure score for $name"; exit 1; }
}

check systemd/zhian-gateway.service
check contrib/systemd/zhian-district.service

box=${exposure[zhian-gateway.service]} district=${exposure[zhian-district.service]}
if awk -v d="$district" -v b="$box" 'BEGIN { exit !(d > b) }'; then
  echo "check-unit.sh: zhian-district.service exposure $district is worse than zhian-gateway.service's $box"
  exit 1
fi
echo "exposure: zhian-district.service $district <= zhian-gateway.service $box"
