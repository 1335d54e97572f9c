#!/usr/bin/env bash
# Installs what the end-to-end tests need when it is missing: socat (pty pairs for the RTU test),
# pymodbus + pyserial (the Modbus test peer, tests/modbus_peer.py), chromium (renders the status
# page headless) and prometheus (for promtool, which checks /metrics). Idempotent; prints nothing
# when everything is already there, one line per install otherwise.
set -euo pipefail

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Debian packages, each checked by the program the tests run (chromium and promtool by the paths
# tests/e2e/e2e_status.rs uses).
need_apt=()
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
# libfaketime: moves the daemon's wall clock for the clock-rule tests (tests/e2e/field_faults.rs).
command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/promtool ] || need_apt+=(prometheus)
# PostgreSQL server binaries for the district receiver's tests (tests/e2e/district.rs starts its own
# cluster in a temp dir; policy-rc.d below keeps the package's own cluster from starting).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
# A CJK font, so the status page's Chinese renders in headless Chromium (screenshots).
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need_apt+=(fonts-wqy-microhei)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test-deps.sh: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
  # policy-rc.d 101: the prometheus package must not start a server (port 9090) on install.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  ok=1
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"; } >"$log" 2>&1 || ok=0
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
  if [ "$ok" != 1 ]; then
    cat "$log" >&2
    echo "test-deps.sh: apt-get could not install ${need_apt[*]}" >&2
    exit 1
  fi
fi

# The peer is checked against pymodbus 3.11 to 3.16 (see tests/modbus_peer.py).
pymodbus_ok() {
  python3 - <<'PY' >/dev/null 2>&1
import serial  # pyserial, for the RTU server
import pymodbus
major, minor = (int(x) for x in pymodbus.__version__.split(".")[:2])
assert (3, 11) <= (major, minor) < (3, 17), pymodbus.__version__
PY
}

if ! pymodbus_ok; then
  echo "test-deps.sh: installing pymodbus and pyserial"
  if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check \
      "pymodbus>=3.11,<3.17" pyserial >"$log" 2>&1; then
    cat "$log" >&2
    echo "test-deps.sh: pip could not install pymodbus/pyserial" >&2
    exit 1
  fi
  pymodbus_ok || { echo "test-deps.sh: python3 still cannot import pymodbus 3.11-3.16 and pyserial" >&2; exit 1; }
fi
