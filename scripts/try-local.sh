#!/usr/bin/env bash
# Try zhian-gateway on this machine before `demo` exists: two local mosquitto brokers (site and
# district), the daemon, a few simulated doors, a vehicle gate and a camera, and the district's
# view printed as it arrives. Ctrl-C stops everything. Optional: DURATION=60 stops after 60 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
  echo "installing mosquitto (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
cargo build --release --locked -q
dir=$(mktemp -d /tmp/zhian-try-XXXXXX)
chmod 0777 "$dir"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
site=$(free_port); district=$(free_port)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; echo "logs and store: $dir"; }
trap cleanup EXIT INT TERM
for p in "$site" "$district"; do
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 100000\n' "$p" > "$dir/mosquitto-$p.conf"
  mosquitto -c "$dir/mosquitto-$p.conf" >"$dir/mosquitto-$p.log" 2>&1 & pids+=($!)
done
sleep 0.5
cat > "$dir/gateway.toml" <<TOML
[gateway]
id = "try-local-01"
district = "富阳区"
street = "富春街道"
community = "江滨社区"
compound = "春江花园"
data_dir = "$dir/data"
[mqtt]
url = "mqtt://127.0.0.1:$site"
[upstream]
url = "mqtt://127.0.0.1:$district"
heartbeat = "10s"
[aggregate]
window = "10s"
grace = "2s"
[status]
enabled = false
TOML
echo "site broker :$site   district broker :$district   data: $dir"
mosquitto_sub -p "$district" -t 'zhian/district/#' -v & pids+=($!)
RUST_LOG=${RUST_LOG:-info} ./target/release/zhian-gateway run --config "$dir/gateway.toml" 2>"$dir/gateway.log" & pids+=($!)
sleep 1
( n=0
  while true; do
    n=$((n+1)); ts=$(date +%s%3N)
    for d in 1 2 3; do
      act=entry; [ $((RANDOM % 2)) -eq 0 ] && act=exit
      mosquitto_pub -p "$site" -q 1 -t "zhian/access/door-$d" \
        -m "{\"id\":\"door-$d-$n\",\"ts\":$ts,\"action\":\"$act\",\"result\":\"granted\",\"subject\":\"card:$RANDOM\"}"
    done
    mosquitto_pub -p "$site" -q 1 -t zhian/vehicle/gate-1 -m "{\"id\":\"gate-1-$n\",\"ts\":$ts,\"action\":\"entry\",\"subject\":\"plate:浙A$RANDOM\"}"
    # A duplicate now and then (devices resend): counted once.
    [ $((n % 5)) -eq 0 ] && mosquitto_pub -p "$site" -q 1 -t zhian/access/door-1 -m "{\"id\":\"door-1-$n\",\"ts\":$ts,\"action\":\"entry\"}"
    [ $((n % 17)) -eq 0 ] && mosquitto_pub -p "$site" -q 1 -t zhian/camera/cam-2 -m "{\"id\":\"cam-2-$n\",\"ts\":$ts,\"action\":\"fire_lane_blocked\"}"
    sleep 1
  done ) & pids+=($!)
if [ -n "${DURATION:-}" ]; then sleep "$DURATION"; else wait; fi
