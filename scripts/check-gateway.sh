#!/usr/bin/env bash
# Renders the gateway template with dummy ports into a throwaway directory and
# asks nginx to validate it, so a broken template fails `make test` instead of
# `make up`.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v nginx >/dev/null 2>&1 || die "nginx not found: run scripts/install-deps.sh"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# mktemp creates the directory 0700; as root the rendered config drops worker
# privileges to nobody, so keep the tree traversable like .local is.
chmod 755 "$tmp"
mkdir -p "$tmp/nginx" "$tmp/logs"

# Dummy ports: nginx -t only parses and opens files, it does not bind.
GATEWAY_PORT=18080 EDGE_PORT=18081 CONTROL_PLANE_PORT=18082 ANALYTICS_PORT=18084 \
    render_gateway_conf "$tmp/nginx/nginx.conf" "$tmp/nginx" "$tmp/logs"

if ! nginx_test "$tmp/nginx/nginx.conf" "$tmp/nginx/error.log"; then
    die "gateway template failed nginx -t"
fi
echo "gateway config OK"
