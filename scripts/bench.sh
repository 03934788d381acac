#!/usr/bin/env bash
# Micro-benchmarks. Each service adds its own `cargo bench -p <crate>` line
# here once it has benches.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

cargo bench -p keygen --locked
cargo bench -p control-plane --locked
cargo bench -p edge-redirect --locked
cargo bench -p analytics-sink --locked
