#!/usr/bin/env bash
# End-to-end: the whole stack as `make up` runs it (release binaries,
# PostgreSQL, Redis, ClickHouse, the nginx gateway), on free ports with its state in a
# temp dir, driven only through the public gateway. Stopped by pid at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
STACK_DIR="$(mktemp -d)"
chmod 755 "$STACK_DIR"
export STACK_DIR
for var in GATEWAY_PORT EDGE_PORT EDGE_ADMIN_PORT CONTROL_PLANE_PORT KEYGEN_PORT KEYGEN_GRPC_PORT ANALYTICS_PORT STACK_PG_PORT STACK_REDIS_PORT STACK_CLICKHOUSE_PORT STACK_CLICKHOUSE_TCP_PORT; do
    export "$var=$(free_port)"
done
unset ADMIN_API_KEY
cleanup() {
    scripts/stack.sh down >/dev/null 2>&1 || true
    rm -rf "$STACK_DIR"
}
trap cleanup EXIT

scripts/stack.sh up >"$STACK_DIR/up.log" 2>&1 || { cat "$STACK_DIR/up.log"; exit 1; }
KEY="$(cat "$STACK_DIR/secrets/admin_api_key")"

# A second `up` is harmless: everything is already running and is left alone.
scripts/stack.sh up >"$STACK_DIR/up-again.log" 2>&1 || { cat "$STACK_DIR/up-again.log"; exit 1; }
if ! grep -q "already running" "$STACK_DIR/up-again.log" || grep -q ": started" "$STACK_DIR/up-again.log"; then
    cat "$STACK_DIR/up-again.log"
    echo "FAIL: a second up restarted something"
    exit 1
fi
GW="http://127.0.0.1:$GATEWAY_PORT"
failures=0
check() { # name expected actual
    if [[ "$2" == "$3" ]]; then
        echo "ok: $1"
    else
        echo "FAIL: $1: expected [$2], got [$3]"
        failures=$((failures + 1))
    fi
}
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
# status and the error code of the JSON body: "404 not_found"
status_and_code() {
    local status
    status="$(curl -s -o "$STACK_DIR/body" -w '%{http_code}' "$@")"
    echo "$status $(json "['error']['code']" <"$STACK_DIR/body")"
}

# Shorten through the gateway.
body="$(curl -s -X POST "$GW/shorten" -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d '{"url":"https://example.com/e2e?q=1"}')"
code="$(json "['code']" <<<"$body")"
check "short_url uses the gateway" "$GW/$code" "$(json "['short_url']" <<<"$body")"

# Follow it through the gateway.
check "redirect through the gateway" "302 https://example.com/e2e?q=1" \
    "$(curl -s -o /dev/null -w '%{http_code} %{redirect_url}' "$GW/$code")"
check "HEAD through the gateway" "302" "$(curl -s -o /dev/null -I -w '%{http_code}' "$GW/$code")"

# Analytics through the gateway: ten more redirects as a browser, from a
# visitor in Great Britain, and the report counts all eleven GETs (a HEAD is
# not a click) within 5 s.
for _ in $(seq 1 10); do
    curl -s -o /dev/null "$GW/$code" -H 'X-Forwarded-For: 81.2.69.142' \
        -H 'User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0' \
        -H 'Referer: https://news.example.com/story'
done
clicks=""
for _ in $(seq 1 50); do
    report="$(curl -s "$GW/analytics/$code" -H "Authorization: Bearer $KEY")"
    clicks="$(json "['clicks']" <<<"$report" 2>/dev/null || true)"
    [[ "$clicks" == 11 ]] && break
    sleep 0.1
done
check "analytics count every redirect" "11" "$clicks"
check "analytics breakdowns" "Firefox=10 GB=10 news.example.com=10" \
    "$(python3 -c 'import json,sys; r=json.load(sys.stdin); d=lambda k: {v["value"]: v["clicks"] for v in r[k]}; print("Firefox=%s GB=%s news.example.com=%s" % (d("browsers").get("Firefox"), d("countries").get("GB"), d("referrers").get("news.example.com")))' <<<"$report")"
check "analytics need a key" "401" "$(curl -s -o /dev/null -w '%{http_code}' "$GW/analytics/$code")"
check "analytics of an unknown link" "404 link_not_found" \
    "$(status_and_code "$GW/analytics/NoSuchCode42" -H "Authorization: Bearer $KEY")"
check "the same clicks in ClickHouse by SQL" "11" \
    "$(curl -s "http://127.0.0.1:$STACK_CLICKHOUSE_PORT/" --data-binary "SELECT count() FROM shortener.clicks WHERE code = '$code'")"

# A change reaches the edge behind the gateway.
curl -s -o /dev/null -X PATCH "$GW/links/$code" -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d '{"disabled":true}'
status=""
for _ in $(seq 1 50); do
    status="$(curl -s -o /dev/null -w '%{http_code}' "$GW/$code")"
    [[ "$status" == 410 ]] && break
    sleep 0.02
done
check "disabled link is 410 within a second" "410" "$status"

check "unknown code" "404 not_found" "$(status_and_code "$GW/NoSuchCode42")"
check "admin route without a key" "401" "$(curl -s -o /dev/null -w '%{http_code}' "$GW/links")"
check "listing through the gateway" "1" \
    "$(curl -s "$GW/links" -H "Authorization: Bearer $KEY" | json "['links'].__len__()")"
check "OpenAPI document" "3.0.3" "$(curl -s "$GW/openapi.json" | json "['openapi']")"

# Internal routes are not reachable through the gateway.
for path in "/internal/resolve/$code" /metrics /healthz /readyz /generate-key; do
    check "gateway hides $path" "404" "$(curl -s -o /dev/null -w '%{http_code}' "$GW$path")"
done

# The gateway's own errors are JSON too.
big="$(python3 -c 'print("{\"url\":\"https://example.com/" + "a" * 70000 + "\"}")')"
check "413 for a big body, as JSON" "413 payload_too_large" \
    "$(status_and_code -X POST "$GW/shorten" -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/json' --data-binary "$big")"

# k6 smoke runs of the load scripts, with their thresholds.
for script in k6/redirect.js k6/shorten.js k6/mixed.js; do
    if k6 run --quiet -e BASE_URL="$GW" -e ADMIN_API_KEY="$KEY" -e DURATION=3s -e VUS=8 -e LINKS=50 -e RATE=20 \
        "$script" >"$STACK_DIR/k6.log" 2>&1; then
        echo "ok: k6 $script"
    else
        cat "$STACK_DIR/k6.log"
        echo "FAIL: k6 $script"
        failures=$((failures + 1))
    fi
done

# A real Prometheus scrapes every service's /metrics and loads the alert rules.
if tests/prometheus-scrape.sh >"$STACK_DIR/scrape.log" 2>&1; then
    echo "ok: prometheus scrapes every service"
else
    cat "$STACK_DIR/scrape.log"
    echo "FAIL: prometheus scrape"
    failures=$((failures + 1))
fi

# Schemathesis against the control plane's and the sink's OpenAPI documents
# (last: it changes and deletes links). A fixed seed keeps CI reproducible;
# `ST_SEED= tests/schemathesis.sh` against a stack explores further.
if ST_SEED="${ST_SEED:-20261130}" ST_MAX_EXAMPLES="${ST_MAX_EXAMPLES:-50}" \
    tests/schemathesis.sh >"$STACK_DIR/schemathesis.log" 2>&1; then
    echo "ok: schemathesis"
else
    cat "$STACK_DIR/schemathesis.log"
    echo "FAIL: schemathesis"
    failures=$((failures + 1))
fi

# The gateway's per-client admin limit (50 r/s, burst 100) answers a flood
# with 429 and the JSON error body (last: it throttles this client a while).
limited="$(python3 - "$GW" <<'PY'
import json, sys, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor
def hit(_):
    try:
        urllib.request.urlopen(sys.argv[1] + "/links", timeout=5)
        return None
    except urllib.error.HTTPError as e:
        return (e.code, e.read())
answers = list(ThreadPoolExecutor(16).map(hit, range(400)))
codes = [json.loads(b)["error"]["code"] for (c, b) in filter(None, answers) if c == 429]
print("429 rate_limited" if codes and set(codes) == {"rate_limited"} else "no 429 in %d answers" % len(answers))
PY
)"
check "a flood of admin requests gets 429 as JSON" "429 rate_limited" "$limited"

if ((failures > 0)); then
    echo "e2e: $failures check(s) failed"
    exit 1
fi
echo "e2e: all checks passed"
