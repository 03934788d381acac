#!/usr/bin/env bash
# The gateway container's entrypoint (infra/docker-compose.yml): renders the
# same template with the same function as `make up` (scripts/lib.sh, mounted
# read-only under /srv), checks the result and runs nginx in the foreground.
# Ports and upstream hosts come from the environment (GATEWAY_PORT,
# GATEWAY_EDGE_HOST, ...; see lib.sh). scripts/check-infra.sh runs this file
# outside a container with GATEWAY_SRC, GATEWAY_RUN_DIR and
# GATEWAY_CHECK_ONLY=1 (render and `nginx -t` only).
set -euo pipefail

export GATEWAY_LISTEN="${GATEWAY_LISTEN:-0.0.0.0}"
export GATEWAY_DAEMON=off
export GATEWAY_ACCESS_LOG=/dev/stdout
export GATEWAY_ERROR_LOG=stderr

# shellcheck source-path=SCRIPTDIR source=../../scripts/lib.sh
source "${GATEWAY_SRC:-/srv}/scripts/lib.sh"

dir="${GATEWAY_RUN_DIR:-/var/cache/nginx/gateway}"
mkdir -p "$dir"
render_gateway_conf "$dir/nginx.conf" "$dir" "$dir"
nginx_test "$dir/nginx.conf" stderr
if [[ "${GATEWAY_CHECK_ONLY:-0}" == 1 ]]; then
    exit 0
fi
exec nginx -e stderr -c "$dir/nginx.conf"
