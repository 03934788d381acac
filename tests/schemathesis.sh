#!/usr/bin/env bash
# Property-based API tests with Schemathesis against a running stack: the
# analytics sink against analytics-sink/openapi.json, then the control plane
# against control-plane/openapi.json, both from the local files (no network).
#
# Ports come from CONTROL_PLANE_PORT, ANALYTICS_PORT and EDGE_PORT (defaults
# in scripts/lib.sh), the admin key from ADMIN_API_KEY or
# $STACK_DIR/secrets/admin_api_key, as in tests/prometheus-scrape.sh.
#
# Each service is tested on its own port, not through the gateway: the
# gateway's per-client limit on admin routes (50 r/s, burst 100) would turn
# a fast run into 429s, and it hides /internal/resolve, /healthz, /readyz and
# /metrics, which the control plane's document also describes.
#
# Checks: no 5xx, documented status codes, content types, response bodies
# and headers (WWW-Authenticate, Location) matching the schemas, invalid
# input refused, auth enforced on every operation that declares it, and, in
# the stateful phase, a deleted link gone and a created one readable. Not
# checked: that schema-valid input is accepted (the APIs also refuse, by
# design, what no schema expresses: non-http URLs, past expiries, reserved
# aliases, ranges outside 1970 to 2100) and 405 for undeclared methods.
# tests/schemathesis_hooks.py steers generated codes, bodies and ranges
# towards real links and acceptable values; tests/schemathesis.toml holds
# check settings.
#
# It creates links (to example.com) and may change or delete any link it
# lists: run it against a throw-away stack (tests/e2e.sh's), not one whose
# links you keep.
#
# Options (env): ST_MAX_EXAMPLES per operation and phase (100), ST_SEED for
# a reproducible run (default: random, printed at the end of each run).
# Exits non-zero when either run finds a failure; each failure is printed
# with a curl command that reproduces it (the key shown as [Filtered]).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

command -v schemathesis >/dev/null 2>&1 || die "schemathesis not found: run scripts/install-deps.sh"

if [[ -z "${ADMIN_API_KEY:-}" ]]; then
    [[ -s "$LOCAL/secrets/admin_api_key" ]] || die "no ADMIN_API_KEY and no $LOCAL/secrets/admin_api_key"
    ADMIN_API_KEY="$(cat "$LOCAL/secrets/admin_api_key")"
fi
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-100}"
CHECKS="not_a_server_error,status_code_conformance,content_type_conformance"
CHECKS+=",response_schema_conformance,response_headers_conformance"
CHECKS+=",negative_data_rejection,ignored_auth,use_after_free,ensure_resource_availability"
CP="http://127.0.0.1:$CONTROL_PLANE_PORT"
SINK="http://127.0.0.1:$ANALYTICS_PORT"
EDGE="http://127.0.0.1:$EDGE_PORT"

# Schemathesis and Hypothesis write their state to the working directory.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

# create URL: prints the new link's code.
create() {
    curl -fsS --max-time 5 -X POST "$CP/shorten" -H "Authorization: Bearer $ADMIN_API_KEY" \
        -H 'Content-Type: application/json' -d "{\"url\":\"$1\"}" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["code"])'
}

# run NAME SCHEMA BASE_URL KNOWN_CODES
run() {
    local name="$1" schema="$2" url="$3" known="$4"
    local -a args=(
        --url "$url"
        -H "Authorization: Bearer $ADMIN_API_KEY"
        --checks "$CHECKS"
        --max-examples "$MAX_EXAMPLES"
        --request-timeout 10
        --generation-database none
    )
    [[ -n "${ST_SEED:-}" ]] && args+=(--seed "$ST_SEED")
    [[ -t 1 ]] || args+=(--no-color)
    log "== schemathesis: $name ($url, $MAX_EXAMPLES examples per operation)"
    SCHEMATHESIS_HOOKS="$ROOT/tests/schemathesis_hooks.py" ST_KNOWN_CODES="$known" \
        schemathesis --config-file "$ROOT/tests/schemathesis.toml" run "$ROOT/$schema" "${args[@]}"
}

failed=()

# The sink: links with clicks (a browser, a crawler, a library), so reports
# have breakdowns and bots, one link without clicks, and random codes (404).
sink_codes=()
for i in 1 2 3 4; do
    sink_codes+=("$(create "https://example.com/schemathesis/sink/$i")")
done
for code in "${sink_codes[@]:0:3}"; do
    for ua in 'Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0' \
        'Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)' 'curl/8.5.0'; do
        curl -fsS -o /dev/null --max-time 5 "$EDGE/$code" -H "User-Agent: $ua" \
            -H 'Referer: https://news.example.com/story' -H 'X-Forwarded-For: 81.2.69.142'
    done
done
# The clicks are in ClickHouse within a few seconds; the run does not need
# them, but reports with rows test more of the response schema.
for _ in $(seq 1 50); do
    clicks="$(curl -fsS --max-time 2 "$SINK/analytics/${sink_codes[0]}" -H "Authorization: Bearer $ADMIN_API_KEY" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["clicks"])' 2>/dev/null || true)"
    [[ -n "$clicks" && "$clicks" != 0 ]] && break
    sleep 0.1
done
known="$(IFS=,; echo "${sink_codes[*]}")"
run analytics-sink analytics-sink/openapi.json "$SINK" "$known" || failed+=(analytics-sink)

# The control plane. Its stateful phase may delete any link, the sink's too,
# so it runs second.
cp_codes=()
for i in 1 2 3 4 5; do
    cp_codes+=("$(create "https://example.com/schemathesis/cp/$i")")
done
known="$(IFS=,; echo "${cp_codes[*]}")"
run control-plane control-plane/openapi.json "$CP" "$known" || failed+=(control-plane)

if ((${#failed[@]} > 0)); then
    echo "schemathesis: failures in ${failed[*]} (see above)"
    exit 1
fi
echo "schemathesis: no failures"
