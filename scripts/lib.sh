# shellcheck shell=bash
# Shared helpers for scripts/*.sh. Sourced, never executed: the caller sets
# `set -euo pipefail`.

# Resolve the repo root from this file's location so the scripts work from any
# working directory (make, CI, a user's shell in a subdirectory).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where the stack keeps its state; STACK_DIR moves it (the end-to-end test
# runs a second, throw-away stack this way).
# shellcheck disable=SC2034
LOCAL="${STACK_DIR:-$ROOT/.local}"

# Non-root shells on Debian do not have the sbin directories on PATH, yet
# nginx and runuser live there. rustup installs into ~/.cargo/bin, which
# non-login shells (CI, make) often lack.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if ! command -v cargo >/dev/null 2>&1 && [[ -d "${CARGO_HOME:-${HOME:-}/.cargo}/bin" ]]; then
    PATH="$PATH:${CARGO_HOME:-${HOME:-}/.cargo}/bin"
fi
# pip --user installs (Debian's Python) land here.
PATH="$PATH:${HOME:-/root}/.local/bin"
export PATH

# Ports. Defaults avoid the system services' ports (5432, 6379, 80) so the
# local stack can run next to them.
: "${GATEWAY_PORT:=8080}"
: "${EDGE_PORT:=8081}"
: "${EDGE_ADMIN_PORT:=9081}"
: "${CONTROL_PLANE_PORT:=8082}"
: "${KEYGEN_PORT:=8083}"
: "${KEYGEN_GRPC_PORT:=50051}"
: "${ANALYTICS_PORT:=8084}"
: "${STACK_PG_PORT:=5433}"
: "${STACK_REDIS_PORT:=6380}"
: "${STACK_CLICKHOUSE_PORT:=8124}"
: "${STACK_CLICKHOUSE_TCP_PORT:=9001}"

# Where the gateway listens, where it finds the services and how nginx runs.
# The local stack keeps all of it on loopback with a daemonised nginx; the
# containers (infra/nginx/container-entrypoint.sh) and Kubernetes
# (infra/k8s/render-gateway.sh) use service names, 0.0.0.0, a foreground
# nginx and GATEWAY_ACCESS_LOG / GATEWAY_ERROR_LOG on stdout and stderr.
: "${GATEWAY_LISTEN:=127.0.0.1}"
: "${GATEWAY_EDGE_HOST:=127.0.0.1}"
: "${GATEWAY_CONTROL_PLANE_HOST:=127.0.0.1}"
: "${GATEWAY_ANALYTICS_HOST:=127.0.0.1}"
: "${GATEWAY_DAEMON:=on}"

GATEWAY_TEMPLATE="$ROOT/infra/nginx/gateway.conf.template"

log() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Escape a value for the replacement side of a sed `s|...|...|` expression,
# so paths containing `&`, `|` or `\` survive.
_sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

# The group nginx workers run as when the master is root: Debian/Ubuntu call
# it nogroup, other distributions nobody.
nginx_worker_group() {
    if getent group nogroup >/dev/null 2>&1; then echo nogroup; else echo nobody; fi
}

# render_gateway_conf OUT_FILE NGINX_DIR LOG_DIR
#
# Renders infra/nginx/gateway.conf.template using the *_PORT and GATEWAY_*
# variables above.
# Placeholders are @NAME@ and are replaced with sed rather than envsubst, so
# nginx's own $variables stay untouched.
render_gateway_conf() {
    local out="$1" nginx_dir="$2" log_dir="$3"
    local user_line="# not root: workers run as the invoking user"
    if is_root; then
        # As root the master drops worker privileges; without this line nginx
        # would try the compiled-in default user (www-data / nobody) and its
        # own idea of the group.
        user_line="user nobody $(nginx_worker_group);"
    fi

    # Each proxied connection costs two descriptors. Non-root shells often
    # have a soft limit of 1024; nginx may raise it up to the hard limit
    # (root: beyond), so size connections from what it can actually get.
    local nofile=16384 hard
    hard="$(ulimit -Hn)"
    if ! is_root && [[ "$hard" != unlimited ]] && ((hard < nofile)); then
        nofile="$hard"
    fi
    local worker_connections=$((nofile / 2 < 4096 ? nofile / 2 : 4096))

    local -a expr=()
    local name value
    for name in USER_LINE NGINX_DIR NOFILE WORKER_CONNECTIONS DAEMON \
        ERROR_LOG ACCESS_LOG GATEWAY_LISTEN EDGE_HOST CONTROL_PLANE_HOST \
        ANALYTICS_HOST GATEWAY_PORT EDGE_PORT CONTROL_PLANE_PORT ANALYTICS_PORT; do
        case "$name" in
            USER_LINE) value="$user_line" ;;
            NOFILE) value="$nofile" ;;
            WORKER_CONNECTIONS) value="$worker_connections" ;;
            NGINX_DIR) value="$nginx_dir" ;;
            DAEMON) value="$GATEWAY_DAEMON" ;;
            ERROR_LOG) value="${GATEWAY_ERROR_LOG:-$nginx_dir/error.log}" ;;
            ACCESS_LOG) value="${GATEWAY_ACCESS_LOG:-$log_dir/nginx-access.log}" ;;
            EDGE_HOST) value="$GATEWAY_EDGE_HOST" ;;
            CONTROL_PLANE_HOST) value="$GATEWAY_CONTROL_PLANE_HOST" ;;
            ANALYTICS_HOST) value="$GATEWAY_ANALYTICS_HOST" ;;
            *) value="${!name}" ;;
        esac
        expr+=(-e "s|@${name}@|$(_sed_escape "$value")|g")
    done

    # Some nginx builds (e.g. older "light" flavours) leave out the fastcgi,
    # uwsgi or scgi modules; their *_temp_path directives would then be
    # unknown. Template lines tagged `# requires:http_X_module` are dropped
    # when `nginx -V` says that module was compiled out.
    local nginx_v module
    nginx_v="$(nginx -V 2>&1 || true)"
    for module in fastcgi uwsgi scgi; do
        if [[ "$nginx_v" == *"--without-http_${module}_module"* ]]; then
            expr+=(-e "/# requires:http_${module}_module/d")
        fi
    done

    sed "${expr[@]}" "$GATEWAY_TEMPLATE" >"$out"
    if grep -nE '@[A-Z_]+@' "$out" >&2; then
        die "unreplaced placeholders in $out (see above)"
    fi
}

# nginx_test CONF_FILE ERROR_LOG
# `-e` keeps nginx from touching its compiled-in error log before it has read
# the config (a permission error for non-root users on some builds).
nginx_test() {
    local conf="$1" errlog="$2"
    nginx -q -t -e "$errlog" -c "$conf"
}
