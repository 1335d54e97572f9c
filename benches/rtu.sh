#!/usr/bin/env bash
# RTU polling throughput: polls/s the daemon gets from two live units (and one silent unit) on
# one serial line, against the line-rate limit computed for the same frames.
#
# Two lines are measured in the same run:
#   paced:   benches/rtu_line.py, a relay that carries each byte only when a 9600 baud 8N1 line
#            would have (half-duplex, like RS-485);
#   instant: a socat pty pair (no baud rate at all): what the software alone can do.
# The peer is tests/modbus_peer.py (pymodbus). Each poll reads one u32 (holding 2-3): an 8-byte
# request and a 9-byte response.
#
#   bash benches/rtu.sh            # SECONDS_PER_RUN=20 by default
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
bash scripts/test-deps.sh
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cargo build --release --locked -q
secs=${SECONDS_PER_RUN:-20}
dir=$(mktemp -d /tmp/zhian-rtu-XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

up=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$up" > "$dir/up.conf"
mosquitto -c "$dir/up.conf" >"$dir/up.log" 2>&1 & pids+=($!)
sleep 0.3

heartbeat() { mosquitto_sub -p "$up" -t 'zhian/district/+/heartbeat' -C 1 -W 10; }
polls() { python3 -c 'import json,sys; h=json.load(sys.stdin); print(sum(d["polls"] for d in h["modbus"] if d["online"]), sum(d["errors"] for d in h["modbus"]))'; }

run() { # $1 = paced|instant
  local mode=$1 run="$dir/$1"
  mkdir -p "$run"
  if [ "$mode" = paced ]; then
    python3 benches/rtu_line.py --baud 9600 --bits 10 --links "$run/ttyGW" "$run/ttyPEER" >"$run/line.log" 2>&1 & pids+=($!)
  else
    socat pty,raw,echo=0,link="$run/ttyGW" pty,raw,echo=0,link="$run/ttyPEER" 2>"$run/line.log" & pids+=($!)
  fi
  for _ in $(seq 50); do [ -e "$run/ttyGW" ] && [ -e "$run/ttyPEER" ] && break; sleep 0.1; done
  touch "$run/start"
  python3 tests/modbus_peer.py --mode rtu --serial "$run/ttyPEER" --plan basic --state "$run/state.json" \
    --start-file "$run/start" --seconds 3600 >"$run/peer.out" 2>"$run/peer.err" & pids+=($!)
  for _ in $(seq 100); do grep -q READY "$run/peer.out" 2>/dev/null && break; sleep 0.1; done
  {
    printf '[gateway]\nid = "rtu-bench"\ndata_dir = "%s/data"\n[mqtt]\nenabled = false\n' "$run"
    printf '[upstream]\nurl = "mqtt://127.0.0.1:%s"\nheartbeat = "1s"\n[status]\nenabled = false\n' "$up"
    for unit in 1 2 3; do
      printf '[[modbus.devices]]\nname = "door-%s"\nkind = "access"\nunit = %s\npoll = "10ms"\ntimeout = "200ms"\n' "$unit" "$unit"
      printf 'rtu = { path = "%s/ttyGW", baud = 9600, parity = "none", data_bits = 8, stop_bits = 1 }\n' "$run"
      printf '[[modbus.devices.points]]\nname = "out_count"\ntable = "holding"\naddress = 2\ntype = "u32"\nrole = "counter"\naction = "exit"\n'
    done
  } > "$run/gateway.toml"
  RUST_LOG=warn ./target/release/zhian-gateway run --config "$run/gateway.toml" 2>"$run/gateway.log" & local gw=$!
  pids+=($gw)
  sleep 5
  read -r p0 e0 < <(heartbeat | polls)
  local t0; t0=$(date +%s.%N)
  sleep "$secs"
  read -r p1 e1 < <(heartbeat | polls)
  local t1; t1=$(date +%s.%N)
  kill "$gw"; wait "$gw" 2>/dev/null || true
  # run() is called in a subshell: clean up what it started here, not in the parent's trap.
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  python3 -c "print(f'{($p1-$p0)/($t1-$t0):.1f} {$e1-$e0}')"
}

read -r instant instant_err < <(run instant)
read -r paced paced_err < <(run paced)
python3 - "$instant" "$paced" "$paced_err" "$secs" <<'PY'
import sys
instant, paced, paced_err, secs = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
bits = 10                      # 8N1
req, resp = 8, 5 + 2 * 2       # read 2 holding registers: 8-byte request, 9-byte response
gap = 3.5                      # silent interval before each frame, in characters
with_gaps = 9600 / ((req + resp + 2 * gap) * bits)
bytes_only = 9600 / ((req + resp) * bits)
print(f"RTU 9600 8N1, 2 live units + 1 silent, one u32 per poll ({req}+{resp} bytes a poll), {secs} s a run")
print(f"line-rate limit: {with_gaps:.1f} polls/s with 3.5-character gaps, {bytes_only:.1f} polls/s bytes alone")
print(f"paced 9600 line : {paced:6.1f} polls/s = {paced / with_gaps:.2f} x limit with gaps "
      f"({paced / bytes_only:.2f} x bytes-only); silent unit cost {paced_err} timeouts")
print(f"instant pty     : {instant:6.1f} polls/s (software alone, no line rate)")
PY
