#!/usr/bin/env bash
# Installs a zhian-gateway .deb on this machine with `dpkg -i` (CI machines are throwaway and
# run as root), checks files, owners and modes and that the installed binary validates the
# installed config as the service user, then purges it again. Usage: scripts/check-deb.sh DEB
set -euo pipefail
deb=$1
[ "$(id -u)" = 0 ] || { echo "check-deb.sh: needs root (dpkg -i)"; exit 1; }
fail() { echo "check-deb.sh: $*"; exit 1; }
dpkg -i "$deb" >/dev/null
trap 'dpkg --purge zhian-gateway >/dev/null 2>&1 || true' EXIT
getent passwd zhian >/dev/null || fail "user zhian not created"
id -nG zhian | grep -qw dialout || fail "zhian is not in dialout"
mode_owner() { stat -c '%a %U:%G' "$1"; }
[ "$(mode_owner /usr/bin/zhian-gateway)" = "755 root:root" ] || fail "binary: $(mode_owner /usr/bin/zhian-gateway)"
[ "$(mode_owner /etc/zhian-gateway/gateway.toml)" = "640 root:zhian" ] || fail "config: $(mode_owner /etc/zhian-gateway/gateway.toml)"
[ "$(mode_owner /etc/zhian-gateway)" = "750 root:zhian" ] || fail "config dir: $(mode_owner /etc/zhian-gateway)"
[ "$(mode_owner /var/lib/zhian-gateway)" = "750 zhian:zhian" ] || fail "data dir: $(mode_owner /var/lib/zhian-gateway)"
[ "$(mode_owner /var/lib/zhian-gateway.keys)" = "700 zhian:zhian" ] || fail "key dir: $(mode_owner /var/lib/zhian-gateway.keys)"
grep -q '^ExecStart=/usr/bin/zhian-gateway run' /lib/systemd/system/zhian-gateway.service || fail "unit ExecStart"
[ -f /usr/lib/sysusers.d/zhian-gateway.conf ] || fail "sysusers.d entry"
[ -f /usr/share/doc/zhian-gateway/install.md ] || fail "install guide"
dpkg-query -W -f='${Conffiles}\n' zhian-gateway | grep -q /etc/zhian-gateway/gateway.toml || fail "config is not a conffile"
# The service user can read its config and write its data dir: check-config as that user.
out=$(setpriv --reuid=zhian --regid=zhian --init-groups /usr/bin/zhian-gateway check-config --quiet --config /etc/zhian-gateway/gateway.toml 2>&1) \
  || fail "check-config as zhian: $out"
# Anyone else cannot read the config (it may hold secrets).
if setpriv --reuid=nobody --regid=nogroup --clear-groups cat /etc/zhian-gateway/gateway.toml >/dev/null 2>&1; then
  fail "the config is readable by nobody"
fi
echo "check-deb.sh: $(basename "$deb") installs: user, modes, conffile, unit, check-config as zhian: ok"
