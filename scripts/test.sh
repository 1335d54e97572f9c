#!/usr/bin/env bash
# The project's one test command: installs what the tests need when it is missing, then runs
# formatting, lints and every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# socat and pymodbus (+ pyserial) for the Modbus tests against a peer no one here wrote.
bash scripts/test-deps.sh
# mosquitto lives in /usr/sbin, which is not always on PATH.
export PATH="$PATH:/usr/sbin"
# Debian's package may start a mosquitto service on 1883; the tests use their own ports only.

rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo clippy, the box build (--no-default-features --features box: what the .deb ships)"
cargo clippy --locked --no-default-features --features box --all-targets -- -D warnings
echo "== the pure core's tree: no tokio, redb or network crate"
bash scripts/check-core.sh
echo "== cargo deny (bans, licenses, sources, advisories: live or the supply-chain snapshot)"
bash scripts/deny.sh
echo "== the box build (what the .deb and the ARM builds ship): built, and no database client in it"
cargo build --locked --no-default-features --features box
mkdir -p target/box && cp target/debug/zhian-gateway target/box/zhian-gateway
bash scripts/check-box.sh target/box/zhian-gateway
echo "== cargo test"
# lib, bins and tests/ (no doc tests: the crate has none; benches run with `cargo bench`).
# Every test that starts a gateway starts the box build (ZHIAN_GATEWAY_BIN, tests/common); the
# district receiver's tests start the default build, which has the receiver.
cargo test --workspace --locked --lib --bins --tests --no-run
export ZHIAN_GATEWAY_BIN=$PWD/target/box/zhian-gateway
# The ARM release builds (aarch64, armv7) take minutes of CPU: they run beside the tests, at the
# lowest priority so the tests keep the cores they need; their binaries run after the tests.
echo "== ARM release builds started beside the tests (target/arm-build.log)"
nice -n 19 bash scripts/check-arm.sh --build >target/arm-build.log 2>&1 &
arm_build=$!
set +e
cargo test --workspace --locked --lib --bins --tests 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "all test binaries: %d passed, %d failed", p, f }' target/test-output.txt)
echo "$summary"
if [ "$status" != 0 ]; then
  kill "$arm_build" 2>/dev/null || true
  exit "$status"
fi
echo "== systemd unit"
bash scripts/check-unit.sh target/box/zhian-gateway
echo "== contrib: alert rules (promtool check + test rules), dashboards"
bash scripts/check-contrib.sh
echo "== Debian package: amd64, from the box build, installed with dpkg -i"
strip -o target/zhian-gateway-stripped target/box/zhian-gateway
deb=$(bash scripts/package-deb.sh --target x86_64-unknown-linux-gnu --binary target/zhian-gateway-stripped --out target/deb)
bash scripts/check-deb.sh "$deb"
echo "== ARM release builds (aarch64, armv7): waiting for them"
if ! wait "$arm_build"; then
  tail -40 target/arm-build.log
  echo "test.sh: the ARM builds failed (target/arm-build.log)"
  exit 1
fi
grep -E "Finished|installing" target/arm-build.log || true
echo "== aarch64 and armv7 under qemu: --version, check-config, the demo"
bash scripts/check-arm.sh --run
echo "== Debian packages: arm64 and armhf"
for t in aarch64-unknown-linux-gnu:arm64 armv7-unknown-linux-gnueabihf:armhf; do
  deb=$(bash scripts/package-deb.sh --target "${t%%:*}" --binary "target/${t%%:*}/release/zhian-gateway" --out target/deb)
  dpkg-deb -f "$deb" Architecture | grep -qx "${t##*:}"
  echo "$deb: $(stat -c %s "$deb") bytes, $(dpkg-deb -c "$deb" | wc -l) entries"
done
echo "$summary"
