#!/usr/bin/env bash
# What CI runs (via `make test`): formatting, lints, tests, then infra checks.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# Infra checks: configs that only fail at `make up` time otherwise.
scripts/check-gateway.sh
# Compose, Prometheus rules (with unit tests), Grafana, Kubernetes manifests,
# the gateway renderings and the CI workflow: validated without an engine.
scripts/check-infra.sh

# End to end through the gateway: a throw-away `make up` stack on free ports.
tests/e2e.sh
