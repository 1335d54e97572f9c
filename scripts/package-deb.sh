#!/usr/bin/env bash
# Builds zhian-gateway_<version>_<arch>.deb with dpkg-deb (Debian's own package builder: no
# extra build tool to compile). Usage:
#   scripts/package-deb.sh [--target TRIPLE] [--binary PATH] [--out DIR]
# Without --binary it builds the release binary for TRIPLE (default: this machine's). The
# package holds: /usr/bin/zhian-gateway, the systemd unit, a sysusers.d entry for the `zhian`
# user, the reference config as /etc/zhian-gateway/gateway.toml (a conffile, 0640 root:zhian
# after postinst), README, install guide and the example config under /usr/share/doc.
set -euo pipefail
cd "$(dirname "$0")/.."
target="" binary="" out="target/deb"
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "package-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$target" ] || target=$(rustc -vV | sed -n 's/^host: //p')
case "$target" in
  x86_64-*) arch=amd64 ;;
  aarch64-*) arch=arm64 ;;
  armv7-*gnueabihf) arch=armhf ;;
  *) echo "package-deb.sh: no Debian architecture for $target" >&2; exit 2 ;;
esac
if [ -z "$binary" ]; then
  # The box build: no district receiver (no database client on a gateway).
  cargo build --release --locked --no-default-features --features box --target "$target"
  binary="target/$target/release/zhian-gateway"
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/bin/zhian-gateway"
install -d -m 0755 "$root/lib/systemd/system"
sed 's#/usr/local/bin/zhian-gateway#/usr/bin/zhian-gateway#g' systemd/zhian-gateway.service \
  > "$root/lib/systemd/system/zhian-gateway.service"
chmod 0644 "$root/lib/systemd/system/zhian-gateway.service"
install -D -m 0644 packaging/debian/sysusers.conf "$root/usr/lib/sysusers.d/zhian-gateway.conf"
install -D -m 0640 config/gateway.toml "$root/etc/zhian-gateway/gateway.toml"
doc="$root/usr/share/doc/zhian-gateway"
install -D -m 0644 README.md "$doc/README.md"
install -D -m 0644 docs/install.md "$doc/install.md"
install -D -m 0644 config/gateway.toml "$doc/examples/gateway.toml"
for f in contrib/*; do [ -f "$f" ] && install -D -m 0644 "$f" "$doc/contrib/$(basename "$f")"; done
printf 'zhian-gateway\nLicense: see the project repository.\n' > "$doc/copyright"
install -d -m 0755 "$root/DEBIAN"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
echo /etc/zhian-gateway/gateway.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: zhian-gateway
Version: $version
Architecture: $arch
Maintainer: zhian-gateway developers <zhian-gateway@localhost>
Installed-Size: $size
Depends: adduser | systemd
Section: net
Priority: optional
Homepage: https://example.invalid/zhian-gateway
Description: smart-compound edge gateway: durable, deduplicated counts for the district
 Turns a residential compound's door, camera and vehicle-gate feeds (MQTT, Modbus TCP/RTU)
 into per-window counts, alerts and heartbeats for the district platform, kept in redb
 through power cuts and outages. One binary, one config file, one data directory.
CONTROL
mkdir -p "$out"
deb="$out/zhian-gateway_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
