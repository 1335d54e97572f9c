#!/usr/bin/env bash
# contrib/: the Prometheus alert rules (the gateway's and the district receiver's) pass
# `promtool check rules` and their unit tests (`promtool test rules`), and the receiver's rules
# name only metrics it exports; the Grafana dashboards are valid JSON whose every query names
# only metrics the daemon exports (the names in src/status/ and src/stats.rs, plus the
# Prometheus-side `up`); the district dashboards read only tables and views the schema has.
set -euo pipefail
cd "$(dirname "$0")/.."
promtool=$(command -v promtool || echo /usr/bin/promtool)
"$promtool" check rules contrib/prometheus/zhian-gateway.rules.yml contrib/prometheus/zhian-district.rules.yml
(cd contrib/prometheus && "$promtool" test rules zhian-gateway.rules.test.yml zhian-district.rules.test.yml)
python3 - <<'PY'
import glob, re, sys
src = "".join(open(f).read() for f in glob.glob("src/**/*.rs", recursive=True))
exported = set(re.findall(r'"(zhian_district_[a-z_]+)"', src))
rules = open("contrib/prometheus/zhian-district.rules.yml").read()
used = set(re.findall(r"\b(zhian_district_[a-z_]+)", rules))
if not exported:
    print("district rules: the receiver exports no zhian_district_* metric yet; names not checked")
    sys.exit(0)
bad = sorted(n for n in used
             if n not in exported and re.sub(r"_(total|bucket|sum|count)$", "", n) not in exported)
if bad:
    print("district rules name metrics the receiver does not export: " + ", ".join(bad))
    sys.exit(1)
print(f"district rules: {len(used)} metric names, every one exported")
PY
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
python3 - <<'PY'
import glob, json, re, sys
sql = "".join(open(f).read() for f in sorted(glob.glob("migrations/district/*.sql")))
objects = set(re.findall(r"CREATE (?:TABLE|VIEW) (\w+)", sql))
bad = []
files = sorted(glob.glob("contrib/grafana/district/*.json"))
panels = 0
for f in files:
    d = json.load(open(f))
    queries = [(f"panel {p['title']!r}", t["rawSql"]) for p in d["panels"] for t in p["targets"]]
    queries += [(f"variable {v['name']!r}", v["query"])
                for v in d.get("templating", {}).get("list", []) if v["type"] == "query"]
    panels += len(d["panels"])
    for what, sql in queries:
        for name in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", sql):
            if name not in objects:
                bad.append(f"{f}: {what}: {name}")
if bad:
    print("the district dashboards read what the schema does not have:\n" + "\n".join(bad))
    sys.exit(1)
print(f"district dashboards: {len(files)} files, {panels} panels, every table and view in the schema "
      "(tests/e2e/district_dashboard.rs runs each query)")
PY
