# shellcheck shell=bash
# Helpers for running a throw-away local PostgreSQL server.
#
# Source this file, then:
#   pg_bindir            print the directory holding initdb and pg_ctl
#   pg_start DATA_DIR    initialise (if needed) and start a server on
#                        127.0.0.1, on the port it had last time when that is
#                        free (kept in DATA_DIR/port), else on a free one; or
#                        reuse one already running there; exports DATABASE_URL
#                        (also written to DATA_DIR/url) and sets PG_STARTED=1
#                        when this call started the server (0 when reused)
#   pg_stop DATA_DIR     stop the server running on DATA_DIR, if any
#
# PG_FAST=1 turns off fsync, synchronous_commit and full_page_writes (data
# may be lost on a crash; meant for disposable test clusters).
# When run as root, server commands run as the `postgres` user.
#
# Run directly, `scripts/lib/pg.sh start DATA_DIR` starts the server on
# DATA_DIR again (same port when free) and prints its DATABASE_URL;
# `scripts/lib/pg.sh stop DATA_DIR` stops it.

set -euo pipefail

_pg_err() {
    printf 'pg: %s\n' "$*" >&2
}

# Runs a command as the owner of the cluster: `postgres` when root, else the
# current user. Commands run from / so an unreadable cwd does not matter.
pg_as_owner() {
    if [[ ${EUID} -eq 0 ]]; then
        if ! id -u postgres >/dev/null 2>&1; then
            _pg_err "running as root but there is no 'postgres' user to run the server as"
            return 1
        fi
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

_pg_has_server_bins() {
    [[ -n $1 && -x $1/initdb && -x $1/pg_ctl ]]
}

pg_bindir() {
    local candidates=() p dir
    if p=$(command -v pg_ctl 2>/dev/null); then
        candidates+=("$(dirname "$p")")
        # A symlinked pg_ctl (e.g. /usr/local/bin) points into the real bindir.
        candidates+=("$(dirname "$(readlink -f "$p")")")
    fi
    if p=$(command -v initdb 2>/dev/null); then
        candidates+=("$(dirname "$p")")
    fi
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    while IFS= read -r dir; do
        candidates+=("$dir")
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -rV)

    for dir in "${candidates[@]}"; do
        if _pg_has_server_bins "$dir"; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    _pg_err "PostgreSQL server binaries not found: install postgresql (e.g. apt-get install postgresql)"
    return 1
}

# Prints a TCP port on 127.0.0.1 that nothing is listening on.
_pg_free_port() {
    local port i
    if command -v python3 >/dev/null 2>&1 &&
        port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null) && [[ -n $port ]]; then
        printf '%s\n' "$port"
        return 0
    fi
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + RANDOM % 30000))
        # A refused connection means the port is free.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    _pg_err "could not find a free TCP port on 127.0.0.1"
    return 1
}

# True when nothing listens on 127.0.0.1:$1.
_pg_port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints line N of DATA_DIR/postmaster.pid (4 = port, 5 = socket directory).
_pg_pidfile_line() {
    local file=$1/postmaster.pid
    [[ -r $file ]] || return 1
    sed -n "${2}p" "$file"
}

_pg_running() {
    pg_as_owner "$1/pg_ctl" status -D "$2" >/dev/null 2>&1
}

# Makes sure the `postgres` user can reach DATA_DIR by adding the search (x)
# permission to any ancestor directory that lacks it for others.
_pg_make_traversable() {
    local dir
    dir=$(dirname "$1")
    while [[ $dir != / ]]; do
        if ! runuser -u postgres -- test -x "$dir" 2>/dev/null; then
            printf 'pg: adding o+x to %s so the postgres user can reach the data directory\n' "$dir" >&2
            chmod o+x "$dir"
        fi
        dir=$(dirname "$dir")
    done
}

_pg_log_tail() {
    local log=$1
    if [[ -r $log ]]; then
        printf -- '--- last lines of %s ---\n' "$log" >&2
        tail -n 40 "$log" >&2
        printf -- '---\n' >&2
    fi
}

# Waits (up to ~30 s) until the server accepts TCP connections.
_pg_wait_ready() {
    local bindir=$1 port=$2 i isready=
    if [[ -x $bindir/pg_isready ]]; then
        isready=$bindir/pg_isready
    elif command -v pg_isready >/dev/null 2>&1; then
        isready=$(command -v pg_isready)
    fi
    for ((i = 0; i < 60; i++)); do
        if [[ -n $isready ]]; then
            "$isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres && return 0
        elif psql "postgres://postgres@127.0.0.1:$port/postgres" -qAt -c 'select 1' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

pg_start() {
    if [[ $# -ne 1 || -z $1 ]]; then
        _pg_err "usage: pg_start DATA_DIR"
        return 2
    fi
    local bindir data log port sock out attempt logsize
    bindir=$(pg_bindir) || return 1
    mkdir -p "$1"
    data=$(cd "$1" && pwd -P)
    log=$data/server.log
    # shellcheck disable=SC2034 # read by callers
    PG_STARTED=0

    if [[ ${EUID} -eq 0 ]]; then
        pg_as_owner true || return 1
        _pg_make_traversable "$data"
        chown postgres: "$data"
    fi
    chmod 700 "$data"

    if [[ ! -f $data/PG_VERSION ]]; then
        local initdb_args=(-D "$data" -A trust -U postgres -E UTF8 --no-locale)
        [[ ${PG_FAST:-0} == 1 ]] && initdb_args+=(--no-sync)
        if ! out=$(pg_as_owner "$bindir/initdb" "${initdb_args[@]}" 2>&1); then
            printf '%s\n' "$out" >&2
            _pg_err "initdb failed for $data"
            return 1
        fi
    fi

    if _pg_running "$bindir" "$data"; then
        port=$(_pg_pidfile_line "$data" 4) || port=
        if [[ ! $port =~ ^[0-9]+$ ]]; then
            _pg_err "a server is running on $data but its port is unknown"
            return 1
        fi
        printf 'pg: reusing the server already running on %s (port %s)\n' "$data" "$port" >&2
    else
        # Sockets go in the data directory unless its path is too long or
        # awkward for a socket path; then in a private temporary directory.
        sock=$data
        if ((${#sock} > 80)) || [[ ! $sock =~ ^[A-Za-z0-9/._-]+$ ]]; then
            sock=$(mktemp -d "${TMPDIR:-/tmp}/pgsock.XXXXXX")
            [[ ${EUID} -eq 0 ]] && chown postgres: "$sock"
        fi
        # Retry with another port if one gets taken between picking and binding.
        for attempt in 1 2 3; do
            port=$(cat "$data/port" 2>/dev/null) || port=
            if ((attempt > 1)) || [[ ! $port =~ ^[0-9]+$ ]] || ! _pg_port_free "$port"; then
                port=$(_pg_free_port) || return 1
            fi
            local opts="-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$sock -c max_connections=300 -c max_prepared_transactions=20"
            if [[ ${PG_FAST:-0} == 1 ]]; then
                opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            fi
            logsize=$(stat -c %s "$log" 2>/dev/null || echo 0)
            if out=$(pg_as_owner "$bindir/pg_ctl" start -D "$data" -l "$log" -w -t 30 -s -o "$opts" 2>&1); then
                # shellcheck disable=SC2034 # read by callers
                PG_STARTED=1
                break
            fi
            if ((attempt == 3)) ||
                ! tail -c +"$((logsize + 1))" "$log" 2>/dev/null | grep -q 'Address already in use'; then
                [[ -n $out ]] && printf '%s\n' "$out" >&2
                _pg_log_tail "$log"
                _pg_err "could not start PostgreSQL on $data"
                return 1
            fi
        done
    fi

    if ! _pg_wait_ready "$bindir" "$port"; then
        _pg_log_tail "$log"
        _pg_err "PostgreSQL on $data does not accept connections on 127.0.0.1:$port"
        return 1
    fi
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    printf '%s\n' "$port" >"$data/port"
    printf '%s\n' "$DATABASE_URL" >"$data/url"
}

pg_stop() {
    if [[ $# -ne 1 || -z $1 ]]; then
        _pg_err "usage: pg_stop DATA_DIR"
        return 2
    fi
    local bindir data sock
    [[ -d $1 ]] || return 0
    bindir=$(pg_bindir) || return 1
    data=$(cd "$1" && pwd -P)
    _pg_running "$bindir" "$data" || return 0
    sock=$(_pg_pidfile_line "$data" 5) || sock=
    pg_as_owner "$bindir/pg_ctl" stop -D "$data" -m fast -w -s >/dev/null 2>&1 || true
    # Remove a private socket directory made by pg_start.
    if [[ $sock == "${TMPDIR:-/tmp}"/pgsock.* && -d $sock ]]; then
        rm -rf -- "$sock"
    fi
}

# Starts a throw-away server (fast, non-durable settings) in a new temporary
# directory named after $1, and records that directory in PG_TEMP_DIR.
pg_start_temp() {
    PG_TEMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    if [[ ${EUID} -eq 0 ]]; then
        chown postgres: "$PG_TEMP_DIR"
    fi
    PG_FAST=1 pg_start "$PG_TEMP_DIR"
    printf 'Using a temporary PostgreSQL server at %s\n' "$DATABASE_URL"
}

# Stops the server pg_start_temp started, if any, and removes its directory.
pg_stop_temp() {
    if [[ -n ${PG_TEMP_DIR:-} ]]; then
        pg_stop "$PG_TEMP_DIR" || true
        rm -rf -- "$PG_TEMP_DIR"
        PG_TEMP_DIR=
    fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1:-}:${2:-} in
    start:?*)
        pg_start "$2"
        printf 'DATABASE_URL=%s\n' "$DATABASE_URL"
        ;;
    stop:?*) pg_stop "$2" ;;
    *)
        echo "usage: $0 start|stop DATA_DIR" >&2
        exit 2
        ;;
    esac
fi
