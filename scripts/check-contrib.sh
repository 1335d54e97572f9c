#!/usr/bin/env bash
# contrib/: the Prometheus alert rules pass `promtool check rules` and their unit tests
# (`promtool test rules`); the Grafana dashboards are valid JSON whose every query names only
# metrics the daemon exports (the names in src/status/ and src/stats.rs, plus the
# Prometheus-side `up`).
set -euo pipefail
cd "$(dirname "$0")/.."
promtool=$(command -v promtool || echo /usr/bin/promtool)
"$promtool" check rules contrib/prometheus/zhian-gateway.rules.yml
(cd contrib/prometheus && "$promtool" test rules zhian-gateway.rules.test.yml)
python3 - <<'PY'
import json, re, glob, sys
src = "".join(open(f).read() for f in glob.glob("src/status/*.rs") + ["src/stats.rs"])
exported = set(re.findall(r'"((?:zhian|process)_[a-z_]+)"', src)) | {"up"}
bad = []
for f in glob.glob("contrib/grafana/*.json"):
    d = json.load(open(f))
    for p in d["panels"]:
        for t in p.get("targets", []):
            for name in re.findall(r"\b((?:zhian|process)_[a-z_]+)", t["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                if name not in exported and base not in exported:
                    bad.append(f"{f}: panel {p['title']!r}: {name}")
if bad:
    print("dashboards name metrics the daemon does not export:\n" + "\n".join(bad))
    sys.exit(1)
print(f"dashboards: {len(glob.glob('contrib/grafana/*.json'))} files, every metric name exported")
PY
