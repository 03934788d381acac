#!/usr/bin/env bash
# Fetches the country database the analytics sink reads (GEOIP_DB) into DIR:
# geo-whois-asn-country.mmdb from the npm package
# @ip-location-db/geo-whois-asn-country-mmdb (CC BY 4.0, by NRO; the licence
# is kept beside it). A no-op when the file is already there.
#   usage: scripts/fetch-geoip.sh DIR
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Pinned so that tests see the same data every run; bump deliberately.
GEOIP_NPM_PACKAGE="@ip-location-db/geo-whois-asn-country-mmdb@2.3.2026061719"

dir="${1:?usage: fetch-geoip.sh DIR}"
file="$dir/geo-whois-asn-country.mmdb"
[[ -s "$file" ]] && exit 0

command -v npm >/dev/null 2>&1 || die "npm not found: run scripts/install-deps.sh"
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$GEOIP_NPM_PACKAGE" >/dev/null) ||
    die "npm pack $GEOIP_NPM_PACKAGE failed"
tar -xzf "$tmp"/*.tgz -C "$tmp" package/geo-whois-asn-country.mmdb package/NRO_LICENSE
mv "$tmp/package/NRO_LICENSE" "$dir/geo-whois-asn-country.LICENSE"
# Atomic, so a concurrent reader never sees half a file.
mv "$tmp/package/geo-whois-asn-country.mmdb" "$file.tmp.$$"
mv "$file.tmp.$$" "$file"
log "fetch-geoip: country database in $file"
