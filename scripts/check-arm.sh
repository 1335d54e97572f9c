#!/usr/bin/env bash
# Cross-builds the aarch64 release binary with Debian's cross gcc (no docker) and runs it under
# qemu-aarch64: --version, and check-config on every file in config/. Prints the stripped sizes.
# ARMV7=1 also builds armv7 (slow on 2 cores; not part of CI).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ "${ARMV7:-0}" = 1 ]; then
  command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "check-arm.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >/dev/null
fi
targets=(aarch64-unknown-linux-gnu)
[ "${ARMV7:-0}" = 1 ] && targets+=(armv7-unknown-linux-gnueabihf)
for t in "${targets[@]}"; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
  # The box build (no district receiver, no database client): what the .deb ships.
  cargo build --release --locked --no-default-features --features box --target "$t"
done
bin=target/aarch64-unknown-linux-gnu/release/zhian-gateway
run() { qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" "$@"; }
echo "== aarch64 under qemu: $(run --version)"
# ELF e_machine at offset 18: 0xb7 = AArch64.
[ "$(od -An -tx1 -j18 -N1 "$bin" | tr -d ' ')" = b7 ] || { echo "check-arm.sh: $bin is not an aarch64 ELF"; exit 1; }
for f in config/*.toml; do
  run check-config --config "$f" >/dev/null
  echo "check-config $f: ok (aarch64)"
done
for t in "${targets[@]}"; do
  printf 'stripped size %-32s %s bytes\n' "$t" "$(stat -c %s "target/$t/release/zhian-gateway")"
done
