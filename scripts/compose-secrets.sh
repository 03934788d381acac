#!/usr/bin/env bash
# Writes the secrets infra/docker-compose.yml mounts, into infra/secrets/
# (git-ignored). Each is generated once and kept, so restarts keep working
# links, keygen's permutation and the admin key. Running it again only fills
# in what is missing.
#
# The directory is private (0700); the files are world-readable (0644)
# because compose mounts them into the containers as they are, and the
# services run as an unprivileged user there.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

dir="$ROOT/infra/secrets"
mkdir -p "$dir"
chmod 700 "$dir"

random_hex() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }

# write NAME VALUE: only when NAME does not exist yet.
write() {
    local file="$dir/$1"
    if [[ ! -s "$file" ]]; then
        printf '%s' "$2" >"$file.tmp"
        mv "$file.tmp" "$file"
        log "compose-secrets: wrote infra/secrets/$1"
    fi
    chmod 644 "$file"
}

for name in postgres_password clickhouse_password admin_api_key keygen_secret \
    analytics_visitor_secret grafana_admin_password; do
    write "$name" "$(random_hex)"
done
write database_url "postgres://shortener:$(cat "$dir/postgres_password")@postgres:5432/shortener"
