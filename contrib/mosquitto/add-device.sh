#!/bin/sh
# Add (or change the password of) a device or the gateway on the site broker:
#   sudo sh add-device.sh door-3          # prompts for the password
# The username is the device id the device publishes under (zhian/{kind}/door-3).
set -e
[ -n "$1" ] || { echo "usage: $0 DEVICE-ID" >&2; exit 2; }
f=/etc/mosquitto/zhian-site.passwd
[ -f "$f" ] || { touch "$f"; chmod 0640 "$f"; chown root:mosquitto "$f" 2>/dev/null || true; }
mosquitto_passwd "$f" "$1"
systemctl reload mosquitto 2>/dev/null || pkill -HUP -x mosquitto || true
