#!/usr/bin/env bash
# The box build for the boxes' CPUs: cross-builds the release binary for aarch64 and armv7 (armhf)
# with Debian's cross gcc (no docker) and runs each under qemu-user: --version, check-config on
# every file in config/, and the demo until its page fills (the end-to-end smoke). Prints the
# stripped sizes.
#   check-arm.sh            build, then run
#   check-arm.sh --build    build only (the test command starts it early, niced, beside the tests)
#   check-arm.sh --run      run only (after --build)
# ARM_TARGETS="aarch64" limits it to one CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
want=${ARM_TARGETS:-aarch64 armv7}
need=()
triples=()
for a in $want; do
  case $a in
    aarch64)
      triples+=(aarch64-unknown-linux-gnu)
      command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
      command -v qemu-aarch64 >/dev/null || need+=(qemu-user) ;;
    armv7)
      triples+=(armv7-unknown-linux-gnueabihf)
      command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
      command -v qemu-arm >/dev/null || need+=(qemu-user) ;;
    *) echo "check-arm.sh: unknown ARM target $a (aarch64, armv7)"; exit 2 ;;
  esac
done
if [ "$mode" != --run ]; then
  if [ ${#need[@]} -gt 0 ]; then
    echo "check-arm.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u); } >/dev/null
  fi
  for t in "${triples[@]}"; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t"
    # The box build (no district receiver, no database client): what the .deb ships.
    cargo build --release --locked --no-default-features --features box --target "$t"
  done
fi
[ "$mode" = --build ] && exit 0

# The demo's page (config/demo.toml: status on 127.0.0.1:8080) shows door events counted and
# the Modbus gate online: the whole pipeline ran on this CPU.
page_filled() {
  python3 - <<'PY'
import json, sys, urllib.request
try:
    v = json.load(urllib.request.urlopen("http://127.0.0.1:8080/api/status", timeout=2))
except Exception:
    sys.exit(1)
access = sum((v.get("today", {}).get("access", {}) or {}).get(a, 0) or 0 for a in ("entry", "exit"))
gate = any(d.get("name") == "gate-east" and d.get("online") and d.get("source") == "modbus" for d in v.get("devices", []))
sys.exit(0 if access > 0 and gate else 1)
PY
}

for t in "${triples[@]}"; do
  bin=target/$t/release/zhian-gateway
  case $t in
    aarch64-*) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu); machine=b7 ;;   # EM_AARCH64
    armv7-*) qemu=(qemu-arm -L /usr/arm-linux-gnueabihf); machine=28 ;;       # EM_ARM
  esac
  run() { "${qemu[@]}" "$bin" "$@"; }
  echo "== $t under ${qemu[0]}: $(run --version)"
  # ELF e_machine at offset 18.
  [ "$(od -An -tx1 -j18 -N1 "$bin" | tr -d ' ')" = "$machine" ] || { echo "check-arm.sh: $bin is not a $t ELF"; exit 1; }
  for f in config/*.toml; do
    run check-config --config "$f" >/dev/null
    echo "check-config $f: ok ($t)"
  done
  data=$(mktemp -d)
  RUST_LOG=warn "${qemu[@]}" "$bin" demo --data-dir "$data" >"$data.out" 2>&1 &
  pid=$!
  filled=no
  # Waits for the condition; the bound only keeps a broken build from hanging CI.
  for _ in $(seq 600); do
    if page_filled; then filled=yes; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -TERM "$pid" 2>/dev/null || true
  status=0; wait "$pid" || status=$?
  if [ "$filled" != yes ] || [ "$status" != 0 ]; then
    echo "check-arm.sh: the demo on $t did not fill its page (page: $filled, exit: $status)"
    tail -20 "$data.out"
    exit 1
  fi
  echo "demo on $t: page filled (doors counted, Modbus gate online), clean stop"
  rm -rf "$data" "$data.out"
done
for t in "${triples[@]}"; do
  printf 'stripped size %-32s %s bytes\n' "$t" "$(stat -c %s "target/$t/release/zhian-gateway")"
done
