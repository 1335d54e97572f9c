#!/usr/bin/env bash
# Write volume: bytes the daemon writes to disk per accepted event (flash wear on SD/eMMC).
#
# Two mosquitto brokers of its own (site and district) on free loopback ports, the daemon with a
# fresh store in a temp dir, then phases, each measured as the difference of write_bytes in
# /proc/<daemon pid>/io over the phase (after the phase it waits until the accepted counter has
# caught up with what was published, or stopped moving, and 2 s more):
#   idle       no events for BENCH_SECS
#   5/s, 50/s, 500/s   paced QoS 1 events for BENCH_SECS each (absolute deadlines, one publisher)
#   full       BENCH_FULL_EVENTS as fast as possible from 4 publishers
# Events: {"id","ts":<now ms>,"action":"entry","result":"granted","subject":"card:N"} on
# zhian/access/door-1..20, ids unique per run and phase. Events accepted and commits come from
# GET /metrics (zhian_events_total{outcome="accepted"} summed, zhian_commits_total). The payload
# floor is the mean size of the payloads published in the phase; "x payload" is bytes/event over it.
# Prints a markdown table on stdout (progress goes to stderr).
#
#   bash benches/write_volume/run.sh
#   ZHIAN_BIN=/tmp/zhian-before BENCH_SECS=60 BENCH_FULL_EVENTS=50000 bash benches/write_volume/run.sh
#   BENCH_EXTRA_TOML=$'[store]\nbatch_linger = "1s"' bash benches/write_volume/run.sh   # A/B
#
# BENCH_EXTRA_TOML is TOML added to the generated config: a [section] the generated config already
# has ([gateway], [mqtt], [aggregate], [upstream], [status]) is merged into it, others (e.g.
# [store], which is not generated, so store.* stay at their defaults) are appended verbatim. A
# literal "\n" in a one-line value is read as a newline. BENCH_KEEP=1 keeps the temp dir (logs,
# store). The store lives under ${TMPDIR:-/tmp}: it must be a real disk, not tmpfs.
# BENCH_KIND=vehicle publishes plate reads at 4 vehicle gates (each plate in, then out) instead of
# access events: with BENCH_EXTRA_TOML=$'[occupancy]\ncapacity = 420' it measures vehicles inside.
# Does not build: point ZHIAN_BIN at a release binary (default target/release/zhian-gateway).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
export PATH="$PATH:/usr/sbin"

bin=${ZHIAN_BIN:-target/release/zhian-gateway}
secs=${BENCH_SECS:-60}
full_events=${BENCH_FULL_EVENTS:-50000}
extra=${BENCH_EXTRA_TOML:-}
pub="$here/pub.py"
log() { echo "write_volume: $*" >&2; }

[ -x "$bin" ] || { log "no executable binary at $bin (set ZHIAN_BIN)"; exit 1; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

# What it needs, installed in the style of scripts/test-deps.sh: mosquitto (Debian), paho-mqtt (pip).
deplog=$(mktemp)
if ! command -v mosquitto >/dev/null 2>&1; then
  log "installing mosquitto (apt-get)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
      apt-get install -y -qq --no-install-recommends mosquitto; } >"$deplog" 2>&1; then
    cat "$deplog" >&2; rm -f "$deplog"; log "apt-get could not install mosquitto"; exit 1
  fi
fi
if ! python3 -c 'import paho.mqtt.client as m; m.CallbackAPIVersion' >/dev/null 2>&1; then
  log "installing paho-mqtt (pip)"
  if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check \
      "paho-mqtt>=2,<3" >"$deplog" 2>&1; then
    cat "$deplog" >&2; rm -f "$deplog"; log "pip could not install paho-mqtt"; exit 1
  fi
fi
rm -f "$deplog"

dir=$(mktemp -d "${TMPDIR:-/tmp}/zhian-wv-XXXXXX")
chmod 0755 "$dir"
pids=()
gw_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$gw_pid" ] && kill -0 "$gw_pid" 2>/dev/null; then
    kill -TERM "$gw_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gw_pid" 2>/dev/null || true
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$rc" != 0 ] && [ -f "$dir/gateway.log" ]; then
    log "failed (exit $rc); last lines of the daemon's log:"
    tail -n 30 "$dir/gateway.log" >&2 || true
  fi
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $dir"; else rm -rf "$dir"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fstype=$(df -PT "$dir" | awk 'NR==2{print $2}')
[ "$fstype" = tmpfs ] && log "warning: $dir is on tmpfs: write_bytes will not mean disk writes"

# Brokers
site=$(python3 "$pub" freeport); district=$(python3 "$pub" freeport); http=$(python3 "$pub" freeport)
for p in "$site" "$district"; do
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 0\npersistence false\n' \
    "$p" >"$dir/mosquitto-$p.conf"
  mosquitto -c "$dir/mosquitto-$p.conf" >"$dir/mosquitto-$p.log" 2>&1 & pids+=($!)
done
for p in "$site" "$district"; do
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done

# Config: the store section (and anything else) only from BENCH_EXTRA_TOML
cat >"$dir/base.toml" <<TOML
[gateway]
id = "wv-bench-01"
data_dir = "$dir/data"
[mqtt]
url = "mqtt://127.0.0.1:$site"
[aggregate]
window = "60s"
[upstream]
url = "mqtt://127.0.0.1:$district"
topic_prefix = "zhian/district"
[status]
listen = "127.0.0.1:$http"
TOML
python3 "$pub" merge-toml "$dir/base.toml" "$extra" >"$dir/gateway.toml"
# The daemon reads every ZHIAN_* variable as config (ZHIAN_BIN would be an unknown key "bin"):
# run it without them.
unset_zhian=()
for v in $(compgen -e); do case $v in ZHIAN_*) unset_zhian+=(-u "$v") ;; esac; done
daemon() { env "${unset_zhian[@]}" "$bin" "$@"; }
if ! daemon check-config --config "$dir/gateway.toml" >"$dir/effective.toml" 2>"$dir/check.log"; then
  cat "$dir/check.log" >&2; log "config rejected:"; cat "$dir/gateway.toml" >&2; exit 1
fi
store_cfg=$(awk '/^\[store\]/{s=1;next} /^\[/{s=0} s && /^(batch_max|batch_linger)/{printf "%s%s", sep, $0; sep=", "}' "$dir/effective.toml")

RUST_LOG=${RUST_LOG:-warn} env "${unset_zhian[@]}" "$bin" run --config "$dir/gateway.toml" 2>"$dir/gateway.log" &
gw_pid=$!
url="http://127.0.0.1:$http"
python3 "$pub" wait-ready --url "$url" --timeout 30

scrape() { python3 "$pub" scrape --url "$url"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
wbytes() { awk '/^write_bytes:/{print $2}' "/proc/$gw_pid/io"; }
cbytes() { awk '/^cancelled_write_bytes:/{print $2}' "/proc/$gw_pid/io"; }
alive() { kill -0 "$gw_pid" 2>/dev/null || { log "the daemon exited"; exit 1; }; }

# After a phase: until accepted has reached target (or stopped moving for 5 s), then 2 s more.
settle() { # $1 = accepted count to wait for
  local target=$1 last=-1 still=0 a
  for _ in $(seq 600); do
    alive
    a=$(field "$(scrape)" accepted)
    [ "$a" -ge "$target" ] && break
    if [ "$a" = "$last" ]; then still=$((still + 1)); else still=0; last=$a; fi
    [ "$still" -ge 10 ] && { log "accepted stopped at $a (wanted $target)"; break; }
    sleep 0.5
  done
  sleep 2
}

run_id="wv$(date +%s)$$"
results="$dir/results.jsonl"
: >"$results"

# Warm-up (not measured): the first commits create the tables. The events are stamped 10 min ago,
# so their window is summarised and acknowledged upstream now, not during the idle phase.
log "warm-up"
python3 "$pub" publish --port "$site" --prefix "$run_id-warm" --rate 40 --secs 0.5 --ts-offset-ms -600000 >"$dir/pub.out" & pids+=($!)
wait $!
out=$(cat "$dir/pub.out")
settle "$(field "$out" published)"
for _ in $(seq 60); do
  s=$(scrape)
  [ "$(field "$s" outbox_pending)" = 0 ] && [ "$(field "$s" upstream_published)" -ge 1 ] && break
  sleep 0.5
done
sleep 3

phase() { # $1 = name, then the publish arguments (none: idle)
  local name=$1; shift
  alive
  local s0 w0 c0 t0 out s1 w1 c1 t1 a0
  s0=$(scrape); a0=$(field "$s0" accepted); w0=$(wbytes); c0=$(cbytes); t0=$(date +%s.%N)
  if [ $# -eq 0 ]; then
    sleep "$secs" & pids+=($!); wait $!
    out='{"published": 0, "payload_bytes": 0, "secs": '"$secs"', "max_lag_ms": 0}'
    settle "$a0"
  else
    # In the background and waited for, so a signal to this script is handled at once.
    python3 "$pub" publish --port "$site" --prefix "$run_id-$name" "$@" >"$dir/pub.out" & pids+=($!)
    wait $!
    out=$(cat "$dir/pub.out")
    settle $((a0 + $(field "$out" published)))
  fi
  alive
  s1=$(scrape); w1=$(wbytes); c1=$(cbytes); t1=$(date +%s.%N)
  python3 - "$name" "$out" "$s0" "$s1" "$w0" "$w1" "$c0" "$c1" "$t0" "$t1" >>"$results" <<'PY'
import json, sys
name, out, s0, s1 = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
w0, w1, c0, c1 = (int(x) for x in sys.argv[5:9])
t0, t1 = float(sys.argv[9]), float(sys.argv[10])
print(json.dumps({"phase": name, "pub": out, "wall": t1 - t0,
  "accepted": s1["accepted"] - s0["accepted"], "duplicate": s1["duplicate"] - s0["duplicate"],
  "rejected": s1["rejected"] - s0["rejected"], "commits": s1["commits"] - s0["commits"],
  "write_bytes": w1 - w0, "cancelled": c1 - c0,
  # per le bound of zhian_ack_wait_seconds: batches committed in the phase
  "ack_wait": {le: n - s0.get("ack_wait", {}).get(le, 0) for le, n in s1.get("ack_wait", {}).items()}}))
PY
  log "$name: $(tail -n 1 "$results")"
}

log "idle ${secs}s"; phase idle
for r in 5 50 500; do log "$r/s for ${secs}s"; phase "${r}ps" --rate "$r" --secs "$secs"; done
log "full speed: $full_events events, 4 publishers"; phase full --count "$full_events" --procs 4

# Report
cmd="ZHIAN_BIN=$bin BENCH_SECS=$secs BENCH_FULL_EVENTS=$full_events"
# shown on one line: real newlines as \n (which this script reads back as newlines)
[ -n "$extra" ] && cmd+=" BENCH_EXTRA_TOML=$(python3 -c 'import shlex,sys; print(shlex.quote(sys.argv[1].replace(chr(10), chr(92) + "n")))' "$extra")"
cmd+=" bash benches/write_volume/run.sh"
{
  echo "### Write volume"
  echo
  echo "- command: \`$cmd\`"
  echo "- binary: \`$bin\` ($("$bin" --version 2>/dev/null | head -n 1), sha256 $(sha256sum "$bin" | cut -c1-12))"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), nproc $(nproc), kernel $(uname -r), store on $fstype ($(df -P "$dir" | awk 'NR==2{print $1}'))"
  echo "- effective store config: ${store_cfg:-?}${extra:+ (BENCH_EXTRA_TOML set)}"
  echo
} 
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
label = {"idle": "idle", "5ps": "5 ev/s", "50ps": "50 ev/s", "500ps": "500 ev/s", "full": "full speed (4 pub)"}
def n(x): return f"{x:,.0f}"
def ack_wait(r):
    """The smallest histogram bound that holds every batch of the phase: the longest wait."""
    b = r.get("ack_wait") or {}
    total = b.get("+Inf", 0)
    if not total:
        return "—"
    for le in sorted((k for k in b if k != "+Inf"), key=float):
        if b[le] == total:
            return f"≤ {float(le):g} s"
    return "> largest bound"
print("| phase | secs | published | accepted | payload avg (B) | write_bytes | bytes/event | x payload | commits | events/commit | longest ack wait | per day at this rate |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
cancelled = 0
for r in rows:
    p, acc, wb, com = r["pub"], r["accepted"], r["write_bytes"], r["commits"]
    cancelled += r["cancelled"]
    secs = p["secs"]
    avg = p["payload_bytes"] / p["published"] if p["published"] else None
    bpe = wb / acc if acc else None
    if r["phase"] == "idle":
        per_day = wb / r["wall"] * 86400  # the whole measured interval, settling included
    elif r["phase"].endswith("ps") and bpe is not None:
        per_day = bpe * float(r["phase"][:-2]) * 86400  # bytes/event x the paced rate
    else:
        per_day = None
    per_day = "—" if per_day is None else f"{per_day / 2**30:,.2f} GiB" if per_day >= 2**30 else f"{per_day / 2**20:,.1f} MiB"
    print("| " + " | ".join([
        label.get(r["phase"], r["phase"]),
        f"{secs:.1f}",
        n(p["published"]), n(acc),
        f"{avg:.1f}" if avg else "—",
        n(wb),
        n(bpe) if bpe is not None else "—",
        f"{bpe / avg:,.0f}x" if bpe is not None and avg else "—",
        n(com),
        f"{acc / com:,.1f}" if com and acc else "—",
        ack_wait(r),
        per_day,
    ]) + " |")
full = [r for r in rows if r["phase"] == "full"]
print()
for r in full:
    print(f"Full speed: {r['accepted'] / r['pub']['secs']:,.0f} events/s accepted over the publishing time "
          f"({r['pub']['secs']:.1f} s; the phase, with settling, took {r['wall']:.1f} s).")
paced = [r for r in rows if r["phase"].endswith("ps")]
if paced:
    print("Max publisher lag behind its schedule: " + ", ".join(f"{label[r['phase']]} {r['pub']['max_lag_ms']} ms" for r in paced) + ".")
bad = [r for r in rows if r["accepted"] != r["pub"]["published"] or r["duplicate"] or r["rejected"]]
for r in bad:
    print(f"Note: {r['phase']}: published {r['pub']['published']}, accepted {r['accepted']}, duplicate {r['duplicate']}, rejected {r['rejected']}.")
print("write_bytes: /proc/<pid>/io of the daemon, bytes of page cache it dirtied (what reaches the block layer; "
      "not the filesystem journal, not the flash translation layer's own amplification). "
      "'per day at this rate': idle, write_bytes / measured time (incl. settling) x 86400; paced phases, bytes/event x rate x 86400. "
      "Commits: zhian_commits_total from /metrics (every store write transaction). "
      "Longest ack wait: from the histogram zhian_ack_wait_seconds (per committed batch, its first message's wait "
      "from reaching the committer to commit and acknowledgement), the smallest bucket bound holding every batch of the phase.")
if cancelled:
    print(f"cancelled_write_bytes over all phases: {cancelled:,} (not subtracted).")
PY
