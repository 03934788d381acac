#!/usr/bin/env bash
# k6 load scripts against a running stack (default: `make up`'s gateway).
# Point them elsewhere with BASE_URL and ADMIN_API_KEY.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

BASE_URL="${BASE_URL:-http://127.0.0.1:$GATEWAY_PORT}"
if [[ -z "${ADMIN_API_KEY:-}" ]]; then
    [[ -f "$LOCAL/secrets/admin_api_key" ]] || die "no ADMIN_API_KEY and no $LOCAL/secrets/admin_api_key: run make up first"
    ADMIN_API_KEY="$(cat "$LOCAL/secrets/admin_api_key")"
fi
for script in k6/redirect.js k6/shorten.js k6/mixed.js; do
    log "== $script against $BASE_URL"
    k6 run -e BASE_URL="$BASE_URL" -e ADMIN_API_KEY="$ADMIN_API_KEY" "$script"
done
