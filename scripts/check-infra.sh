#!/usr/bin/env bash
# Validates everything under infra/ (and the CI workflow) without a Docker
# engine or a cluster: compose, Prometheus config and rules (with unit tests),
# Grafana dashboards, the OpenTelemetry collector config, Kubernetes manifests
# against the bundled schemas (offline), the gateway renderings for compose and
# Kubernetes, and the syntax of every shell script. Prints one OK line per
# check, a FAIL line with the tool's output for each failure, and exits
# non-zero if any check failed. Tools come from scripts/install-deps.sh.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

K8S_VERSION=1.32.0
SERVICES=(keygen control-plane edge-redirect analytics-sink)

for tool in docker-compose promtool kubernetes-validate nginx python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/install-deps.sh"
done
python3 -c 'import yaml' 2>/dev/null ||
    die "python3 cannot import yaml (comes with kubernetes-validate): run scripts/install-deps.sh"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# As root the rendered gateway configs drop worker privileges to nobody, so
# keep the tree traversable (see scripts/check-gateway.sh).
chmod 755 "$tmp"

failures=0
# check NAME CMD...: runs CMD, prints "OK NAME" or "FAIL NAME" and its output.
# CMD runs as an `if` condition, where `set -e` does not apply: the check
# functions below return on their own failures.
check() {
    local name="$1"
    shift
    if "$@" >"$tmp/out" 2>&1; then
        echo "OK   $name"
    else
        echo "FAIL $name"
        sed 's/^/     /' "$tmp/out"
        failures=$((failures + 1))
    fi
}

# --- shell -------------------------------------------------------------------
shell_syntax() {
    local f
    for f in scripts/*.sh tests/*.sh infra/nginx/*.sh infra/k8s/*.sh .ci/run; do
        bash -n "$f" || return 1
    done
}
check "shell scripts parse (bash -n)" shell_syntax

# --- images and compose ------------------------------------------------------
dockerfiles() {
    local svc f src
    for svc in "${SERVICES[@]}"; do
        f="infra/docker/$svc.Dockerfile"
        [[ -f "$f" ]] || { echo "$f is missing"; return 1; }
        while read -r src; do
            [[ "$src" == . || -e "$src" ]] || { echo "$f: COPY source $src does not exist"; return 1; }
        done < <(awk '/^COPY / && !/--from/ { for (i = 2; i < NF; i++) print $i }' "$f")
        grep -q "cargo chef cook" "$f" || { echo "$f: no cargo-chef dependency layer"; return 1; }
        grep -q -- "--bin $svc\$" "$f" || { echo "$f: does not build --bin $svc"; return 1; }
        grep -qE '^USER [1-9]' "$f" || { echo "$f: runs as root"; return 1; }
        { grep -q 'HEALTHCHECK' "$f" && grep -q '/healthz' "$f"; } || { echo "$f: no /healthz HEALTHCHECK"; return 1; }
    done
    grep -qx 'target/' .dockerignore || { echo ".dockerignore does not exclude target/"; return 1; }
}
check "dockerfiles (${#SERVICES[@]} services)" dockerfiles
check "docker-compose config" docker-compose -f infra/docker-compose.yml config -q
check "compose secrets, build files and mounts" python3 scripts/check-infra.py compose
check "compose gateway entrypoint renders and passes nginx -t" \
    env GATEWAY_SRC="$ROOT" GATEWAY_RUN_DIR="$tmp/compose-gateway" GATEWAY_CHECK_ONLY=1 \
    GATEWAY_PORT=8080 GATEWAY_EDGE_HOST=127.0.0.1 GATEWAY_CONTROL_PLANE_HOST=127.0.0.1 \
    GATEWAY_ANALYTICS_HOST=127.0.0.1 bash infra/nginx/container-entrypoint.sh

# --- Prometheus --------------------------------------------------------------
check "promtool check config" promtool check config infra/prometheus/prometheus.yml
check "promtool check rules" promtool check rules infra/prometheus/alerts.yml
check "promtool test rules (alert unit tests)" promtool test rules infra/prometheus/alerts.test.yml
local_stack_config() {
    sed -e 's/@[A-Z_]*PORT@/9999/g' \
        -e "s|@RULES_FILE@|$(_sed_escape "$ROOT/infra/prometheus/alerts.yml")|" \
        infra/prometheus/local-stack.yml.template >"$tmp/local-stack.yml" || return 1
    promtool check config "$tmp/local-stack.yml"
}
check "promtool check config (local-stack template)" local_stack_config

# --- Grafana -----------------------------------------------------------------
dashboards_json() {
    local f
    for f in infra/grafana/dashboards/*.json; do
        python3 -m json.tool "$f" >/dev/null || { echo "$f is not valid JSON"; return 1; }
    done
}
check "grafana dashboards are JSON" dashboards_json
check "grafana panels, datasource uid, provisioning" python3 scripts/check-infra.py grafana
dashboards_promql() {
    python3 scripts/check-infra.py promql-rules "$tmp/dashboards.rules.yml" &&
        promtool check rules "$tmp/dashboards.rules.yml"
}
check "grafana PromQL parses (promtool)" dashboards_promql

# --- OpenTelemetry -----------------------------------------------------------
check "otel collector pipelines" python3 scripts/check-infra.py otel

# --- Kubernetes --------------------------------------------------------------
check "kubernetes-validate --strict (k8s $K8S_VERSION, offline schemas)" \
    kubernetes-validate --strict --quiet --kubernetes-version "$K8S_VERSION" \
    infra/k8s/*.yaml infra/k8s/examples/*.yaml
check "k8s selectors, ports, probes, secrets" python3 scripts/check-infra.py k8s
gateway_configmap_current() {
    infra/k8s/render-gateway.sh >"$tmp/gateway-config.yaml" || return 1
    diff -u infra/k8s/gateway-config.yaml "$tmp/gateway-config.yaml" || {
        echo "regenerate: infra/k8s/render-gateway.sh >infra/k8s/gateway-config.yaml"
        return 1
    }
}
check "k8s gateway ConfigMap matches the template" gateway_configmap_current
# nginx -t on the ConfigMap's nginx.conf, with upstream hosts that resolve
# here, paths in the temp dir and the modules this nginx lacks left out.
gateway_configmap_nginx_t() {
    local dir="$tmp/k8s-gateway" module
    local -a drop=()
    mkdir -p "$dir"
    for module in fastcgi uwsgi scgi; do
        if [[ "$(nginx -V 2>&1)" == *"--without-http_${module}_module"* ]]; then
            drop+=(-e "/${module}_temp_path/d")
        fi
    done
    python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["nginx.conf"], end="")' \
        infra/k8s/gateway-config.yaml |
        sed -E -e 's/server (edge-redirect|control-plane|analytics-sink):/server 127.0.0.1:/' \
            -e "s|/tmp/nginx|$dir|g" ${drop[@]+"${drop[@]}"} >"$dir/nginx.conf" || return 1
    nginx_test "$dir/nginx.conf" stderr
}
check "k8s gateway config passes nginx -t" gateway_configmap_nginx_t

# --- CI ----------------------------------------------------------------------
check "ci workflow (jobs, pinned actions, run steps parse)" python3 scripts/check-infra.py workflow

# Variables the infra sets that no service reads: warnings, not failures.
python3 scripts/check-infra.py env

if ((failures > 0)); then
    echo "check-infra: $failures check(s) failed"
    exit 1
fi
echo "check-infra: all checks passed"
