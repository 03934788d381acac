#!/usr/bin/env bash
# Local stack: PostgreSQL, Redis, ClickHouse, the four services and an nginx
# gateway, all on 127.0.0.1 with their state under .local/.
#
#   scripts/stack.sh up | down | logs | status
#
# Ports come from GATEWAY_PORT EDGE_PORT EDGE_ADMIN_PORT CONTROL_PLANE_PORT
# KEYGEN_PORT KEYGEN_GRPC_PORT ANALYTICS_PORT STACK_PG_PORT STACK_REDIS_PORT
# STACK_CLICKHOUSE_PORT STACK_CLICKHOUSE_TCP_PORT (defaults in scripts/lib.sh). STACK_SKIP_BUILD=1 skips `cargo build`.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LOG_DIR="$LOCAL/logs"
PID_DIR="$LOCAL/pids"
SECRETS_DIR="$LOCAL/secrets"
PG_DIR="$LOCAL/postgres"
PG_SOCK_DIR="$LOCAL/postgres-socket"
PG_LOG="$LOG_DIR/postgres.log"
REDIS_DIR="$LOCAL/redis"
REDIS_CONF="$REDIS_DIR/redis.conf"
REDIS_PID="$PID_DIR/redis.pid"
REDIS_LOG="$LOG_DIR/redis.log"
CH_DIR="$LOCAL/clickhouse"
CH_LOG="$LOG_DIR/clickhouse.log"
GEOIP_DIR="$LOCAL/geoip"
NGINX_DIR="$LOCAL/nginx"
NGINX_CONF="$NGINX_DIR/nginx.conf"
NGINX_PID="$NGINX_DIR/nginx.pid"
NGINX_ERROR_LOG="$NGINX_DIR/error.log"
BIN_DIR="$ROOT/target/release"

# Start order matters: control-plane needs keygen's gRPC, the edge falls back
# to control-plane.
SERVICES=(keygen control-plane edge-redirect analytics-sink)

READY_TIMEOUT=30
STOP_TIMEOUT=10

# ---------------------------------------------------------------------------
# Process bookkeeping

# True while PID exists and has not exited. A zombie still passes `kill -0`;
# some init processes (e.g. in containers and micro-VMs) reap orphans late.
pid_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "$state" != Z && "$state" != X ]]
}

# running_pid PIDFILE PATTERN...
# Prints the pid if PIDFILE names a live process whose command line contains
# every PATTERN. The command-line check guards against pid reuse after a
# reboot or crash, when a stale file may name an unrelated process.
running_pid() {
    local file="$1" pid cmdline pattern
    shift
    [[ -r "$file" ]] || return 1
    pid="$(head -n 1 "$file" 2>/dev/null | tr -dc '0-9')"
    [[ -n "$pid" ]] || return 1
    pid_alive "$pid" || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    for pattern in "$@"; do
        [[ "$cmdline" == *"$pattern"* ]] || return 1
    done
    echo "$pid"
}

# Each component's pid file and command-line patterns, in one place so up,
# down and status agree.
component_pidfile() {
    case "$1" in
        postgres) echo "$PG_DIR/postmaster.pid" ;;
        redis) echo "$REDIS_PID" ;;
        clickhouse) echo "$PID_DIR/clickhouse.pid" ;;
        nginx) echo "$NGINX_PID" ;;
        *) echo "$PID_DIR/$1.pid" ;;
    esac
}
component_pid() {
    local file
    file="$(component_pidfile "$1")"
    case "$1" in
        postgres) running_pid "$file" postgres "$PG_DIR" ;;
        # Redis rewrites its process title to "redis-server ADDR:PORT".
        redis) running_pid "$file" redis-server ;;
        clickhouse) running_pid "$file" clickhouse "$CH_DIR/config.xml" ;;
        nginx) running_pid "$file" "nginx: master" "$NGINX_CONF" ;;
        *) running_pid "$file" "$BIN_DIR/$1" ;;
    esac
}

# A pid file that names no live process of ours is left over from a crash.
# PostgreSQL's postmaster.pid is not ours to delete: postgres checks it itself.
remove_stale_pidfile() {
    local file
    file="$(component_pidfile "$1")"
    if [[ "$1" != postgres && -e "$file" ]] && ! component_pid "$1" >/dev/null; then
        rm -f "$file"
    fi
}

port_in_use() {
    # Connecting is enough: anything listening on loopback answers the SYN.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Fails early with a clear message instead of a bind error buried in a log.
require_free_ports() {
    local name="$1" port
    shift
    for port in "$@"; do
        if port_in_use "$port"; then
            die "$name: port $port on 127.0.0.1 is already in use by another process (override with the *_PORT variables)"
        fi
    done
}

show_log_tail() {
    local file="$1"
    if [[ -s "$file" ]]; then
        echo "---- last 30 lines of $file ----" >&2
        tail -n 30 "$file" >&2
        echo "----" >&2
    fi
}

now_ms() {
    # EPOCHREALTIME's decimal separator follows the locale; drop it either way.
    local us="${EPOCHREALTIME//[!0-9]/}"
    echo $((us / 1000))
}

# wait_until NAME LOGFILE PID CMD...
# Polls CMD until it succeeds. Fails (after showing the log tail) once
# READY_TIMEOUT seconds have passed or as soon as PID exits (empty PID: no
# process to watch).
wait_until() {
    local name="$1" logfile="$2" pid="$3"
    shift 3
    local deadline=$(($(now_ms) + READY_TIMEOUT * 1000))
    until "$@" >/dev/null 2>&1; do
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
            show_log_tail "$logfile"
            warn "$name exited during startup"
            return 1
        fi
        if (($(now_ms) >= deadline)); then
            show_log_tail "$logfile"
            warn "$name not ready after ${READY_TIMEOUT}s"
            return 1
        fi
        sleep 0.2
    done
}

http_ok() { curl -fsS -o /dev/null --max-time 1 "$1"; }

# stop_pid NAME PID SIGNAL: sends SIGNAL, waits STOP_TIMEOUT seconds for the
# process to exit, then SIGKILLs it.
stop_pid() {
    local name="$1" pid="$2" sig="$3"
    kill -s "$sig" "$pid" 2>/dev/null || return 0
    local deadline=$(($(now_ms) + STOP_TIMEOUT * 1000))
    while pid_alive "$pid"; do
        if (($(now_ms) >= deadline)); then
            warn "$name (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -s KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    log "$name: stopped"
}

# Secrets are generated once and reused, so restarts keep working links,
# signatures and admin clients.
ensure_secret() {
    local file="$1"
    if [[ ! -s "$file" ]]; then
        (
            umask 077
            od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file.tmp"
            mv "$file.tmp" "$file"
        )
    fi
    chmod 600 "$file"
}

# ---------------------------------------------------------------------------
# PostgreSQL

pg_bindir() {
    # An existing cluster must be run by its own major version.
    if [[ -s "$PG_DIR/PG_VERSION" ]]; then
        local want
        want="$(cat "$PG_DIR/PG_VERSION")"
        [[ -x "/usr/lib/postgresql/$want/bin/postgres" ]] ||
            die "$PG_DIR was created by PostgreSQL $want, which is not installed"
        echo "/usr/lib/postgresql/$want/bin"
        return
    fi
    local newest
    newest="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$newest" ]] || die "PostgreSQL server not found under /usr/lib/postgresql: run scripts/install-deps.sh"
    dirname "$newest"
}

# initdb and postgres refuse to run as root, so as root they run as the
# `postgres` system user (created by the Debian package). From / because that
# user may not be allowed into the caller's working directory.
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Makes PATH (a directory or file) belong to whoever runs postgres.
pg_own() {
    if is_root; then chown postgres:postgres "$@"; fi
}

start_postgres() {
    local pid bin
    if pid="$(component_pid postgres)"; then
        log "postgres: already running (pid $pid)"
        return
    fi
    bin="$(pg_bindir)"

    mkdir -p "$PG_DIR" "$PG_SOCK_DIR"
    chmod 700 "$PG_DIR"
    touch "$PG_LOG"
    pg_own "$PG_DIR" "$PG_SOCK_DIR" "$PG_LOG"
    if ! as_pg test -w "$PG_DIR"; then
        die "postgres user cannot write $PG_DIR; every parent directory of $ROOT must be searchable by others (chmod o+x)"
    fi

    if [[ ! -s "$PG_DIR/PG_VERSION" ]]; then
        log "postgres: initialising cluster in $PG_DIR"
        # Trust auth is acceptable only because the server listens on
        # loopback and a socket inside .local.
        as_pg "$bin/initdb" -D "$PG_DIR" -U postgres -A trust -E UTF8 --no-locale >>"$PG_LOG" 2>&1 || {
            show_log_tail "$PG_LOG"
            die "initdb failed"
        }
    fi

    require_free_ports postgres "$STACK_PG_PORT"
    # pg_ctl hands -o to a shell, hence the inner quotes around the path.
    # 9>&-: see take_lock.
    if ! as_pg "$bin/pg_ctl" -D "$PG_DIR" -l "$PG_LOG" -w -t "$READY_TIMEOUT" \
        -o "-p $STACK_PG_PORT -k '$PG_SOCK_DIR' -c listen_addresses=127.0.0.1" \
        start >/dev/null 9>&-; then
        show_log_tail "$PG_LOG"
        die "postgres failed to start"
    fi
    log "postgres: started on 127.0.0.1:$STACK_PG_PORT (pid $(component_pid postgres || echo '?'))"
}

psql_admin() {
    PGCONNECT_TIMEOUT=5 "$(pg_bindir)/psql" -X -q -t -A -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$STACK_PG_PORT" -U postgres -d postgres "$@"
}

ensure_database() {
    if [[ "$(psql_admin -c "select 1 from pg_database where datname = 'shortener'")" != 1 ]]; then
        psql_admin -c 'create database shortener'
        log "postgres: created database shortener"
    fi
}

stop_postgres() {
    if ! component_pid postgres >/dev/null; then
        return
    fi
    as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DIR" -m fast -w -t 60 stop >/dev/null
    log "postgres: stopped"
}

# ---------------------------------------------------------------------------
# Redis

write_redis_conf() {
    mkdir -p "$REDIS_DIR/data"
    cat >"$REDIS_CONF" <<EOF
# Generated by scripts/stack.sh on every \`up\`; edits are overwritten.
bind 127.0.0.1
protected-mode yes
port $STACK_REDIS_PORT
daemonize yes
pidfile "$REDIS_PID"
logfile "$REDIS_LOG"
dir "$REDIS_DIR/data"
# Link data must survive a restart; everysec loses at most one second.
appendonly yes
appendfsync everysec
EOF
}

redis_ping() { [[ "$(redis-cli -h 127.0.0.1 -p "$STACK_REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

start_redis() {
    local pid
    if pid="$(component_pid redis)"; then
        log "redis: already running (pid $pid)"
        return
    fi
    remove_stale_pidfile redis
    require_free_ports redis "$STACK_REDIS_PORT"
    write_redis_conf
    redis-server "$REDIS_CONF" 9>&- || {
        show_log_tail "$REDIS_LOG"
        die "redis-server failed to start"
    }
    # daemonize returns before the server accepts connections (AOF replay).
    wait_until redis "$REDIS_LOG" "" redis_ping || die "redis failed to start"
    log "redis: started on 127.0.0.1:$STACK_REDIS_PORT (pid $(component_pid redis || echo '?'))"
}

# ---------------------------------------------------------------------------
# ClickHouse (click analytics)

write_clickhouse_conf() {
    mkdir -p "$CH_DIR/data" "$CH_DIR/tmp" "$CH_DIR/user_files" "$CH_DIR/format_schemas"
    cat >"$CH_DIR/config.xml" <<EOF
<!-- Generated by scripts/stack.sh on every up; edits are overwritten. -->
<yandex>
  <logger><level>warning</level><log>$CH_LOG</log><errorlog>$LOG_DIR/clickhouse.err.log</errorlog><console>0</console></logger>
  <http_port>$STACK_CLICKHOUSE_PORT</http_port>
  <tcp_port>$STACK_CLICKHOUSE_TCP_PORT</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>$CH_DIR/data/</path>
  <tmp_path>$CH_DIR/tmp/</tmp_path>
  <user_files_path>$CH_DIR/user_files/</user_files_path>
  <format_schema_path>$CH_DIR/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
EOF
    cat >"$CH_DIR/users.xml" <<EOF
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
EOF
}

clickhouse_ping() { http_ok "http://127.0.0.1:$STACK_CLICKHOUSE_PORT/ping"; }

start_clickhouse() {
    local pid bin
    if pid="$(component_pid clickhouse)"; then
        log "clickhouse: already running (pid $pid)"
        return
    fi
    remove_stale_pidfile clickhouse
    require_free_ports clickhouse "$STACK_CLICKHOUSE_PORT" "$STACK_CLICKHOUSE_TCP_PORT"
    write_clickhouse_conf
    bin="$(command -v clickhouse-server)" || die "clickhouse-server not found: run scripts/install-deps.sh"
    # Like the services: nohup, no terminal, a pid file of our own. 9>&-: see
    # take_lock.
    (cd "$CH_DIR" && exec nohup "$bin" --config-file="$CH_DIR/config.xml" </dev/null >>"$CH_LOG" 2>&1 9>&-) &
    pid=$!
    echo "$pid" >"$PID_DIR/clickhouse.pid"
    wait_until clickhouse "$CH_LOG" "$pid" clickhouse_ping || die "clickhouse failed to start"
    log "clickhouse: started on 127.0.0.1:$STACK_CLICKHOUSE_PORT (pid $pid)"
}

stop_clickhouse() {
    local pid
    if pid="$(component_pid clickhouse)"; then
        stop_pid clickhouse "$pid" TERM
    fi
    rm -f "$(component_pidfile clickhouse)"
}

# The country database for the sink; without it (no npm registry reachable)
# the stack still runs, with empty countries.
fetch_geoip() {
    if ! "$ROOT/scripts/fetch-geoip.sh" "$GEOIP_DIR"; then
        warn "no country database: analytics will have empty countries"
    fi
}

# ---------------------------------------------------------------------------
# Services

service_ports() {
    case "$1" in
        keygen) echo "$KEYGEN_PORT $KEYGEN_GRPC_PORT" ;;
        control-plane) echo "$CONTROL_PLANE_PORT" ;;
        edge-redirect) echo "$EDGE_PORT $EDGE_ADMIN_PORT" ;;
        analytics-sink) echo "$ANALYTICS_PORT" ;;
    esac
}

service_ready_url() {
    case "$1" in
        keygen) echo "http://127.0.0.1:$KEYGEN_PORT/readyz" ;;
        control-plane) echo "http://127.0.0.1:$CONTROL_PLANE_PORT/readyz" ;;
        edge-redirect) echo "http://127.0.0.1:$EDGE_ADMIN_PORT/readyz" ;;
        analytics-sink) echo "http://127.0.0.1:$ANALYTICS_PORT/readyz" ;;
    esac
}

# Fills the array named by $2 with NAME=VALUE pairs for service $1.
service_env() {
    local -n out="$2"
    out=(
        "LOG_FORMAT=${LOG_FORMAT:-text}"
        "RUST_LOG=${RUST_LOG:-info}"
        "REDIS_URL=redis://127.0.0.1:$STACK_REDIS_PORT"
        "DATABASE_URL=postgres://postgres@127.0.0.1:$STACK_PG_PORT/shortener"
        "ADMIN_API_KEY=$ADMIN_API_KEY"
        "PUBLIC_BASE_URL=http://127.0.0.1:$GATEWAY_PORT"
    )
    case "$1" in
        keygen)
            out+=(
                "KEYGEN_HTTP_ADDR=127.0.0.1:$KEYGEN_PORT"
                "KEYGEN_GRPC_ADDR=127.0.0.1:$KEYGEN_GRPC_PORT"
                "KEYGEN_SECRET_FILE=$SECRETS_DIR/keygen_secret"
            )
            ;;
        edge-redirect)
            out+=(
                "EDGE_HTTP_ADDR=127.0.0.1:$EDGE_PORT"
                "EDGE_ADMIN_ADDR=127.0.0.1:$EDGE_ADMIN_PORT"
                "CONTROL_PLANE_URL=http://127.0.0.1:$CONTROL_PLANE_PORT"
                # Clicks survive a killed edge; a restart ships what is left.
                "EDGE_CLICK_JOURNAL_DIR=$LOCAL/edge-journal"
            )
            ;;
        control-plane)
            out+=(
                "CONTROL_PLANE_ADDR=127.0.0.1:$CONTROL_PLANE_PORT"
                "KEYGEN_GRPC_URL=http://127.0.0.1:$KEYGEN_GRPC_PORT"
                # `up` runs `control-plane migrate` once, before any replica.
                "RUN_MIGRATIONS=false"
            )
            ;;
        analytics-sink)
            out+=(
                "ANALYTICS_ADDR=127.0.0.1:$ANALYTICS_PORT"
                "CLICKHOUSE_URL=http://127.0.0.1:$STACK_CLICKHOUSE_PORT"
                "CLICKHOUSE_DATABASE=shortener"
                "CONTROL_PLANE_URL=http://127.0.0.1:$CONTROL_PLANE_PORT"
                "ANALYTICS_VISITOR_SECRET_FILE=$SECRETS_DIR/analytics_visitor_secret"
                "SINK_CONSUMER=local-1"
            )
            if [[ -s "$GEOIP_DIR/geo-whois-asn-country.mmdb" ]]; then
                out+=("GEOIP_DB=$GEOIP_DIR/geo-whois-asn-country.mmdb")
            fi
            ;;
    esac
}

build_services() {
    if [[ "${STACK_SKIP_BUILD:-0}" == 1 ]]; then
        log "build: skipped (STACK_SKIP_BUILD=1)"
        return
    fi
    log "build: cargo build --release --workspace"
    (cd "$ROOT" && cargo build --release --workspace)
}

run_migrations() {
    local bin="$BIN_DIR/control-plane"
    if [[ ! -x "$bin" ]]; then
        log "migrate: skipped (${bin#"$ROOT"/} not built)"
        return
    fi
    local -a env_vars
    service_env control-plane env_vars
    log "migrate: control-plane migrate"
    env "${env_vars[@]}" "$bin" migrate
    bin="$BIN_DIR/analytics-sink"
    if [[ -x "$bin" ]]; then
        service_env analytics-sink env_vars
        log "migrate: analytics-sink migrate"
        env "${env_vars[@]}" "$bin" migrate
    fi
}

start_service() {
    local name="$1" bin="$BIN_DIR/$1" pid
    if [[ ! -x "$bin" ]]; then
        log "$name: skipped (${bin#"$ROOT"/} not built)"
        return
    fi
    if pid="$(component_pid "$name")"; then
        log "$name: already running (pid $pid)"
        return
    fi
    remove_stale_pidfile "$name"
    # Word splitting of the port list is intended.
    # shellcheck disable=SC2046
    require_free_ports "$name" $(service_ports "$name")

    local -a env_vars
    service_env "$name" env_vars
    local logfile="$LOG_DIR/$name.log"
    # nohup + no terminal on stdin keep the service alive after this shell and
    # its terminal go away; `env` and `nohup` exec, so $! is the service.
    # 9>&-: see take_lock.
    env "${env_vars[@]}" nohup "$bin" </dev/null >>"$logfile" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PID_DIR/$name.pid"

    if ! wait_until "$name" "$logfile" "$pid" http_ok "$(service_ready_url "$name")"; then
        # A half-started service would make the next `up` skip it as
        # "already running"; stop it so a re-run retries from scratch.
        stop_service "$name" >/dev/null
        die "$name failed to start (log: ${logfile#"$ROOT"/})"
    fi
    log "$name: ready (pid $pid)"
}

stop_service() {
    local name="$1" pid
    if pid="$(component_pid "$name")"; then
        stop_pid "$name" "$pid" TERM
    fi
    rm -f "$(component_pidfile "$name")"
}

# ---------------------------------------------------------------------------
# nginx gateway

start_nginx() {
    local pid
    if pid="$(component_pid nginx)"; then
        log "gateway: already running (pid $pid)"
        return
    fi
    remove_stale_pidfile nginx
    require_free_ports gateway "$GATEWAY_PORT"
    mkdir -p "$NGINX_DIR"
    render_gateway_conf "$NGINX_CONF" "$NGINX_DIR" "$LOG_DIR"
    nginx_test "$NGINX_CONF" "$NGINX_ERROR_LOG" || die "gateway config invalid: $NGINX_CONF"
    nginx -e "$NGINX_ERROR_LOG" -c "$NGINX_CONF" 9>&- || {
        show_log_tail "$NGINX_ERROR_LOG"
        die "nginx failed to start"
    }
    # `location = /` is answered by nginx itself, so this works before any
    # service is up.
    wait_until gateway "$NGINX_ERROR_LOG" "" http_ok "http://127.0.0.1:$GATEWAY_PORT/" ||
        die "gateway failed to start"
    log "gateway: started on 127.0.0.1:$GATEWAY_PORT (pid $(component_pid nginx || echo '?'))"
}

stop_nginx() {
    local pid
    if pid="$(component_pid nginx)"; then
        # SIGQUIT is nginx's graceful shutdown: in-flight requests finish.
        stop_pid gateway "$pid" QUIT
    fi
    rm -f "$NGINX_PID"
}

# ---------------------------------------------------------------------------
# Commands

# Serialises up/down so two of them cannot race over the same pid files.
# Every long-lived process we start gets `9>&-`: otherwise it inherits the
# lock descriptor and holds the lock for as long as it runs.
take_lock() {
    mkdir -p "$LOCAL"
    exec 9>"$LOCAL/.stack.lock"
    flock -n 9 || die "another scripts/stack.sh up/down is running"
}

cmd_up() {
    "$ROOT/scripts/install-deps.sh"
    take_lock
    mkdir -p "$LOG_DIR" "$PID_DIR" "$SECRETS_DIR"
    chmod 700 "$SECRETS_DIR"

    ensure_secret "$SECRETS_DIR/keygen_secret"
    ensure_secret "$SECRETS_DIR/analytics_visitor_secret"
    if [[ -z "${ADMIN_API_KEY:-}" ]]; then
        ensure_secret "$SECRETS_DIR/admin_api_key"
        ADMIN_API_KEY="$(cat "$SECRETS_DIR/admin_api_key")"
    fi

    start_postgres
    ensure_database
    start_redis
    start_clickhouse
    fetch_geoip
    build_services
    run_migrations
    local svc
    for svc in "${SERVICES[@]}"; do
        start_service "$svc"
    done
    start_nginx
    print_summary
}

cmd_down() {
    take_lock
    stop_nginx
    local i
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        stop_service "${SERVICES[i]}"
    done
    local pid
    if pid="$(component_pid redis)"; then
        stop_pid redis "$pid" TERM
    fi
    rm -f "$REDIS_PID"
    stop_clickhouse
    stop_postgres
}

cmd_status() {
    local c pid
    for c in postgres redis clickhouse "${SERVICES[@]}" nginx; do
        if pid="$(component_pid "$c")"; then
            printf '%-15s running (pid %s)\n' "$c" "$pid"
        else
            printf '%-15s stopped\n' "$c"
        fi
    done
}

cmd_logs() {
    mkdir -p "$LOG_DIR"
    local -a files=()
    local f
    for f in "$LOG_DIR"/*.log "$NGINX_ERROR_LOG"; do
        [[ -e "$f" ]] && files+=("$f")
    done
    ((${#files[@]} > 0)) || die "no logs yet in $LOG_DIR: run '$0 up' first"
    exec tail -n 50 -F "${files[@]}"
}

summary_line() {
    local label="$1" url="$2" component="$3" note=""
    component_pid "$component" >/dev/null || note="  (not running)"
    printf '  %-16s %s%s\n' "$label" "$url" "$note"
}

print_summary() {
    local key="$ADMIN_API_KEY"
    echo
    echo "Local stack:"
    summary_line "gateway" "http://127.0.0.1:$GATEWAY_PORT" nginx
    summary_line "edge-redirect" "http://127.0.0.1:$EDGE_PORT" edge-redirect
    summary_line "edge admin" "http://127.0.0.1:$EDGE_ADMIN_PORT" edge-redirect
    summary_line "control-plane" "http://127.0.0.1:$CONTROL_PLANE_PORT" control-plane
    summary_line "keygen HTTP" "http://127.0.0.1:$KEYGEN_PORT" keygen
    summary_line "keygen gRPC" "http://127.0.0.1:$KEYGEN_GRPC_PORT" keygen
    summary_line "analytics-sink" "http://127.0.0.1:$ANALYTICS_PORT" analytics-sink
    summary_line "postgres" "postgres://postgres@127.0.0.1:$STACK_PG_PORT/shortener" postgres
    summary_line "redis" "redis://127.0.0.1:$STACK_REDIS_PORT" redis
    summary_line "clickhouse" "http://127.0.0.1:$STACK_CLICKHOUSE_PORT" clickhouse
    echo
    echo "Admin API key: $key"
    echo
    echo "Try:"
    echo "  curl -s -X POST http://127.0.0.1:$GATEWAY_PORT/shorten -H \"Authorization: Bearer $key\" -H 'Content-Type: application/json' -d '{\"url\":\"https://example.com\"}'"
    echo "  curl -s http://127.0.0.1:$GATEWAY_PORT/analytics/CODE -H \"Authorization: Bearer $key\""
    echo "  clickhouse-client --port $STACK_CLICKHOUSE_TCP_PORT -d shortener -q 'SELECT code, count() FROM clicks GROUP BY code'"
    echo "  curl -s http://127.0.0.1:$KEYGEN_PORT/generate-key"
}

usage() {
    echo "usage: $0 {up|down|logs|status}" >&2
    exit 2
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    logs) cmd_logs ;;
    status) cmd_status ;;
    *) usage ;;
esac
