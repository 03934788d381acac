#!/usr/bin/env bash
# A real Prometheus scrapes the running local stack: renders
# infra/prometheus/local-stack.yml.template with the stack's ports
# (EDGE_ADMIN_PORT, CONTROL_PLANE_PORT, KEYGEN_PORT, ANALYTICS_PORT; defaults
# in scripts/lib.sh), starts prometheus on a free 127.0.0.1 port with its
# storage in a temp dir, and waits up to 60 s for every target to be "up".
# Also checks that the alert rules load. Prometheus is stopped by pid at exit.
# Exits non-zero naming each target that is not up.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

command -v prometheus >/dev/null 2>&1 || die "prometheus not found: run scripts/install-deps.sh"

DEADLINE_S=60
tmp="$(mktemp -d)"
prom_pid=""
cleanup() {
    if [[ -n "$prom_pid" ]] && kill -0 "$prom_pid" 2>/dev/null; then
        kill -TERM "$prom_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$prom_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$prom_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"

sed -e "s|@EDGE_ADMIN_PORT@|$EDGE_ADMIN_PORT|g" \
    -e "s|@CONTROL_PLANE_PORT@|$CONTROL_PLANE_PORT|g" \
    -e "s|@KEYGEN_PORT@|$KEYGEN_PORT|g" \
    -e "s|@ANALYTICS_PORT@|$ANALYTICS_PORT|g" \
    -e "s|@RULES_FILE@|$(_sed_escape "$ROOT/infra/prometheus/alerts.yml")|g" \
    "$ROOT/infra/prometheus/local-stack.yml.template" >"$tmp/prometheus.yml"
if grep -nE '@[A-Z_]+@' "$tmp/prometheus.yml" >&2; then
    die "unreplaced placeholders in the scrape config (see above)"
fi

prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn \
    </dev/null >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!

api="http://127.0.0.1:$port/api/v1"
# Prints one line per target, "HEALTH JOB URL ERROR", and exits 0 only when
# all four are up.
report_targets() {
    curl -fsS --max-time 2 "$api/targets?state=active" | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
for t in sorted(targets, key=lambda t: t["labels"]["job"]):
    print(t["health"], t["labels"]["job"], t["scrapeUrl"], t.get("lastError", ""))
sys.exit(0 if len(targets) == 4 and all(t["health"] == "up" for t in targets) else 1)
'
}

deadline=$((SECONDS + DEADLINE_S))
until report_targets >"$tmp/targets" 2>/dev/null; do
    if ! kill -0 "$prom_pid" 2>/dev/null; then
        cat "$tmp/prometheus.log" >&2
        die "prometheus exited"
    fi
    if ((SECONDS >= deadline)); then
        cat "$tmp/targets"
        awk '$1 != "up" { print "FAIL: target " $2 " (" $3 ") is " $1 }' "$tmp/targets" >&2
        [[ -s "$tmp/targets" ]] || echo "FAIL: prometheus reported no targets" >&2
        exit 1
    fi
    sleep 0.5
done
cat "$tmp/targets"

rules="$(curl -fsS --max-time 2 "$api/rules" |
    python3 -c 'import json,sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')"
((rules > 0)) || die "prometheus loaded no alert rules from infra/prometheus/alerts.yml"
echo "prometheus-scrape: all 4 targets up, $rules alert rules loaded"
