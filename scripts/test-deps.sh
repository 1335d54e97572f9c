#!/usr/bin/env bash
# Installs what the Modbus end-to-end tests need when it is missing: socat (pty pairs for the RTU
# test) and pymodbus + pyserial (the test peer, tests/modbus_peer.py). Idempotent; prints nothing
# when everything is already there, one line per install otherwise.
set -euo pipefail

log=$(mktemp)
trap 'rm -f "$log"' EXIT

if ! command -v socat >/dev/null 2>&1; then
  echo "test-deps.sh: installing socat"
  export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends socat; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "test-deps.sh: apt-get could not install socat" >&2
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
