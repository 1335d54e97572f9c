#!/usr/bin/env python3
"""Helpers for benches/write_volume/run.sh: a paced QoS 1 event publisher and the daemon's
counters.

  pub.py freeport
  pub.py wait-ready --url http://127.0.0.1:PORT [--timeout 30]
  pub.py scrape --url http://127.0.0.1:PORT
  pub.py publish --port P --prefix ID --rate R --secs S          # paced, one publisher
  pub.py publish --port P --prefix ID --count N --procs 4        # as fast as possible
  pub.py merge-toml BASE_FILE EXTRA_TEXT                          # prints the merged config

`publish` prints one JSON line: {"published", "payload_bytes", "secs", "max_lag_ms"}. Every
message is acknowledged by the broker (PUBACK) before it returns. Events are canonical access
payloads on zhian/access/door-1..20 with ids "{prefix}-{i}", so distinct prefixes never collide.
"""

import argparse
import os
import json
import multiprocessing as mp
import re
import signal
import socket
import sys
import threading
import time
import urllib.request

DOORS = 20


def freeport():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def scrape(url):
    """Counters from GET /metrics (Prometheus text)."""
    _, text = http_get(url.rstrip("/") + "/metrics")
    out = {"accepted": 0, "duplicate": 0, "rejected": 0, "commits": None,
           "upstream_published": None, "outbox_pending": None, "ack_wait": {}}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+)')
    for line in text.splitlines():
        m = sample.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "zhian_events_total":
            for outcome in ("accepted", "duplicate", "rejected"):
                if f'outcome="{outcome}"' in labels:
                    out[outcome] += int(value)
        elif name == "zhian_commits_total":
            out["commits"] = int(value)
        elif name == "zhian_upstream_published_total":
            out["upstream_published"] = int(value)
        elif name == "zhian_outbox_pending":
            out["outbox_pending"] = int(value)
        elif name == "zhian_ack_wait_seconds_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                out["ack_wait"][le.group(1)] = int(value)
    return out


def wait_ready(url, timeout):
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        try:
            code, body = http_get(url.rstrip("/") + "/healthz", timeout=2)
            if code == 200:
                scrape(url)  # /metrics answers too
                return 0
            last = f"{code} {body.strip()}"
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read().decode(errors='replace').strip()}"
        except Exception as e:  # noqa: BLE001 - connection refused while it starts
            last = str(e)
        time.sleep(0.2)
    print(f"daemon not ready after {timeout}s: {last}", file=sys.stderr)
    return 1


def payload(prefix, i, ts_offset_ms):
    ts = int(time.time() * 1000) + ts_offset_ms
    if os.environ.get("BENCH_KIND") == "vehicle":
        # Plate reads at 4 gates: each plate comes in, then goes out (vehicles inside).
        action = "entry" if i % 2 == 0 else "exit"
        plate = f"浙A{((i // 2) * 7919) % 100000:05d}"
        body = json.dumps({"id": f"{prefix}-{i}", "ts": ts, "action": action,
                           "result": "granted", "subject": plate},
                          separators=(",", ":"), ensure_ascii=False).encode()
        return f"zhian/vehicle/gate-{i % 4 + 1}", body
    body = json.dumps({"id": f"{prefix}-{i}", "ts": ts, "action": "entry",
                       "result": "granted", "subject": f"card:{(i * 7919) % 100000}"},
                      separators=(",", ":")).encode()
    return f"zhian/access/door-{i % DOORS + 1}", body


def connect(port, client_id):
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    ready = threading.Event()
    c.on_connect = lambda *a: ready.set()
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not ready.wait(10):
        raise SystemExit(f"publisher could not connect to 127.0.0.1:{port}")
    return c


def publish_range(port, prefix, start, stop, step, rate, ts_offset_ms, q=None):
    """Publish events start, start+step, ... < stop; paced at `rate`/s if rate > 0."""
    c = connect(port, f"wv-pub-{prefix}-{start}")
    infos, nbytes, max_lag = [], 0, 0.0
    t0 = time.monotonic()
    for k, i in enumerate(range(start, stop, step)):
        if rate > 0:
            deadline = t0 + k / rate  # absolute deadlines: no drift, whatever each call costs
            now = time.monotonic()
            if now < deadline:
                time.sleep(deadline - now)
            else:
                max_lag = max(max_lag, now - deadline)
        topic, body = payload(prefix, i, ts_offset_ms)
        nbytes += len(body)
        infos.append(c.publish(topic, body, qos=1))
    sent = time.monotonic() - t0
    for info in infos:
        info.wait_for_publish(timeout=120)
        if not info.is_published():
            raise SystemExit(f"publisher {prefix}: a message was not acknowledged by the broker")
    c.loop_stop()
    c.disconnect()
    r = {"published": len(infos), "payload_bytes": nbytes, "secs": sent,
         "max_lag_ms": round(max_lag * 1000, 1)}
    if q is not None:
        q.put(r)
    return r


def publish(a):
    if a.rate > 0:
        n = int(round(a.rate * a.secs))
        r = publish_range(a.port, a.prefix, 0, n, 1, a.rate, a.ts_offset_ms)
    else:
        q = mp.Queue()
        t0 = time.monotonic()
        ps = [mp.Process(target=publish_range,
                         args=(a.port, a.prefix, p, a.count, a.procs, 0, a.ts_offset_ms, q))
              for p in range(a.procs)]
        def stop(*_):
            for p in ps:
                if p.is_alive():
                    p.terminate()
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        for p in ps:
            p.start()
        parts = [q.get(timeout=600) for _ in ps]
        for p in ps:
            p.join()
        r = {"published": sum(x["published"] for x in parts),
             "payload_bytes": sum(x["payload_bytes"] for x in parts),
             "secs": time.monotonic() - t0, "max_lag_ms": 0}
    print(json.dumps(r))


HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-]+)\s*\]\s*(#.*)?$")
KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*=")


def merge_toml(base_path, extra):
    """The base config with `extra` merged in: a [section] of extra that the base already has is
    merged into it (extra's keys win), any other text is appended verbatim; key lines before
    extra's first header (dotted keys such as store.batch_linger = "1s") go first."""
    if "\n" not in extra and "\\n" in extra:
        extra = extra.replace("\\n", "\n")  # BENCH_EXTRA_TOML='[store]\nbatch_linger = "1s"'
    with open(base_path) as f:
        base = f.read().splitlines()
    # base: sections in order, each [header_line, lines...]; base has no top-level keys
    sections, order = {}, []
    cur = None
    for line in base:
        m = HEADER.match(line)
        if m:
            cur = m.group(1)
            order.append(cur)
            sections[cur] = []
        elif cur is not None:
            sections[cur].append(line)
    lead, tail = [], []
    cur = None
    for line in extra.splitlines():
        m = HEADER.match(line)
        if m:
            cur = m.group(1)
            if cur not in sections:
                tail.append(line)
            continue
        if cur is None:
            lead.append(line)
        elif cur in sections:
            k = KEY.match(line)
            if k:
                sections[cur] = [l for l in sections[cur]
                                 if not (KEY.match(l) and KEY.match(l).group(1) == k.group(1))]
            sections[cur].append(line)
        else:
            tail.append(line)
    out = lead[:]
    for s in order:
        out.append(f"[{s}]")
        out.extend(sections[s])
    out.extend(tail)
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("freeport")
    w = sub.add_parser("wait-ready")
    w.add_argument("--url", required=True)
    w.add_argument("--timeout", type=float, default=30)
    s = sub.add_parser("scrape")
    s.add_argument("--url", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--secs", type=float, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--ts-offset-ms", type=int, default=0)
    m = sub.add_parser("merge-toml")
    m.add_argument("base")
    m.add_argument("extra")
    a = ap.parse_args()
    if a.cmd == "freeport":
        freeport()
    elif a.cmd == "wait-ready":
        sys.exit(wait_ready(a.url, a.timeout))
    elif a.cmd == "scrape":
        print(json.dumps(scrape(a.url)))
    elif a.cmd == "publish":
        publish(a)
    elif a.cmd == "merge-toml":
        merge_toml(a.base, a.extra)


if __name__ == "__main__":
    main()
