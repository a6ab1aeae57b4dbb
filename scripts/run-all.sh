#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317 # functions run from traps
# Runs one projector process per partition against PostgreSQL; or, with --auto, K processes
# that share the partitions among themselves.
#
# Usage: scripts/run-all.sh [N] [PROJECTOR_ARGS...]
#        scripts/run-all.sh --auto K [PROJECTOR_ARGS...]
#        scripts/run-all.sh --add | --remove
#   N               number of partitions / processes (default 4)
#   --auto K        K processes started with --partition-key auto share the partitions
#                   (12, or --total-partitions among PROJECTOR_ARGS) and rebalance as
#                   processes come and go
#   --add           (while an --auto run goes on, from another terminal) one more process
#   --remove        (likewise) the newest process stops; its partitions go to the others
#   PROJECTOR_ARGS  passed to every process (e.g. --projection aggregate-stats)
#
# Without DATABASE_URL, a local server is run from .pgdata/ at the repository
# root (on the same port each run when it is free; its URL is in .pgdata/url)
# and stopped on exit, unless KEEP_DB=1; `scripts/lib/pg.sh start .pgdata`
# starts it again to look at the data. Each output line is prefixed with
# `[pK/N]`; the prefixers ignore Ctrl-C and end with their process's output,
# so the processes' stop summaries are shown.
# Ctrl-C or SIGTERM stops all processes. Process ids are kept in
# .run-all.pids; a new run first stops the processes of an earlier one.
# Before starting the processes, `projector repartition --to N` moves every
# projection they run (each of the --projection lists and each one the
# --projection-file files and folders define; users when neither is given) to N
# partitions, exactly (nothing when it already has N), so a run with another N
# after an earlier run just works: `run-all.sh 3` after `run-all.sh 4`.
#
# PROJECTOR_BIN=path runs that binary instead of building target/release/projector;
# RUN_ALL_PIDFILE=path keeps the process ids there instead (runs with different
# pid files do not stop each other).
set -euo pipefail

usage() {
    echo "usage: $(basename "$0") [N] [PROJECTOR_ARGS...]   (N: positive integer, default 4)"
    echo "       $(basename "$0") --auto K [PROJECTOR_ARGS...]   (K processes share the partitions)"
    echo "       $(basename "$0") --add | --remove   (one process more or less in a running --auto run)"
}

n=4
auto=0
if [[ $# -gt 0 ]]; then
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --add | --remove)
        # Asks the running --auto run (the first pid in its pid file) for a process more or less.
        here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
        pidfile=${RUN_ALL_PIDFILE:-$(cd "$here/.." && pwd)/.run-all.pids}
        runner=$(head -n 1 "$pidfile" 2>/dev/null || true)
        if [[ ! $runner =~ ^[0-9]+$ ]] || ! ps -o args= -p "$runner" 2>/dev/null | grep -q 'run-all.sh'; then
            echo "run-all: no run is going on (no live script in ${pidfile})" >&2
            exit 1
        fi
        if [[ $1 == --add ]]; then kill -USR1 "$runner"; else kill -USR2 "$runner"; fi
        exit 0
        ;;
    --auto)
        if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]{0,2}$ ]]; then
            usage >&2
            exit 2
        fi
        auto=$2
        shift 2
        ;;
    --*) ;; # no N given: everything is projector arguments
    *)
        if [[ ! $1 =~ ^[1-9][0-9]{0,3}$ ]]; then
            usage >&2
            exit 2
        fi
        n=$1
        shift
        ;;
    esac
fi
extra=("$@")
if ((auto)); then
    # The partitions the processes share: --total-partitions among the arguments, else 12.
    n=12
    rest=()
    for ((i = 0; i < ${#extra[@]}; i++)); do
        if [[ ${extra[i]} == --total-partitions && $((i + 1)) -lt ${#extra[@]} ]]; then
            n=${extra[i + 1]}
            i=$((i + 1))
        else
            rest+=("${extra[i]}")
        fi
    done
    extra=("${rest[@]}")
fi
# The processes start from the repository's root: a projection file's path
# given relative to here is made absolute.
for ((i = 0; i + 1 < ${#extra[@]}; i++)); do
    if [[ ${extra[i]} == --projection-file && ${extra[i + 1]} != /* ]]; then
        extra[i + 1]=$PWD/${extra[i + 1]}
    fi
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
source "$here/lib/pg.sh"
cd "$root"

bin=${PROJECTOR_BIN:-$root/target/release/projector}
pidfile=${RUN_ALL_PIDFILE:-$root/.run-all.pids}
pgdir=
pids=()
prefixers=()
fifodir=
children_done=0
export RUST_LOG=${RUST_LOG:-info}

log() {
    printf 'run-all: %s\n' "$*" >&2
}

# True when PID is a projector process or a run-all.sh script.
is_ours() {
    local args
    args=$(ps -o args= -p "$1" 2>/dev/null) || return 1
    [[ $args == *projector* || $args == *run-all.sh* ]]
}

# Sends signal $1 to each of the other pids that is still one of ours.
signal_ours() {
    local sig=$1 pid
    shift
    for pid in "$@"; do
        if is_ours "$pid"; then
            kill "-$sig" "$pid" 2>/dev/null || true
        fi
    done
}

# Waits up to $1 tenths of a second until none of the other pids is alive.
wait_gone() {
    local tenths=$1 i pid alive
    shift
    for ((i = 0; ; i++)); do
        alive=0
        for pid in "$@"; do
            if kill -0 "$pid" 2>/dev/null; then
                alive=1
                break
            fi
        done
        ((alive)) || return 0
        ((i < tenths)) || return 1
        sleep 0.1
    done
}

# Stops the processes listed in the pid file by an earlier run. The earlier
# script is asked first (it stops its own processes and server); processes
# whose script is gone are signalled directly. Whatever is left after 10 s
# is killed.
stop_previous_run() {
    [[ -f $pidfile ]] || return 0
    local pid runner='' live=() projectors=0
    while read -r pid; do
        [[ $pid =~ ^[0-9]+$ && $pid != "$$" ]] || continue
        is_ours "$pid" || continue
        if [[ -z $runner && $(ps -o args= -p "$pid" 2>/dev/null) == *run-all.sh* ]]; then
            runner=$pid
        else
            projectors=$((projectors + 1))
        fi
        live+=("$pid")
    done <"$pidfile"
    if ((${#live[@]} > 0)); then
        if [[ -n $runner ]]; then
            log "stopping an earlier run: its script (pid $runner) and $projectors projector process(es)"
        else
            log "stopping $projectors projector process(es) of an earlier run"
        fi
        if [[ -n $runner ]]; then
            kill -TERM "$runner" 2>/dev/null || true
        else
            kill -TERM "${live[@]}" 2>/dev/null || true
        fi
        if ! wait_gone 100 "${live[@]}"; then
            log "processes from the earlier run still alive after 10 s; killing them"
            signal_ours KILL "${live[@]}"
            wait_gone 20 "${live[@]}" || true
        fi
    fi
    rm -f -- "$pidfile"
}

# Sends SIGTERM to our projector processes and waits for them (SIGKILL after
# 30 s).
stop_children() {
    ((${#pids[@]} > 0 && !children_done)) || return 0
    local pid
    kill -TERM "${pids[@]}" 2>/dev/null || true
    if ! wait_gone 300 "${pids[@]}"; then
        log "projector processes still alive after 30 s; killing them"
        signal_ours KILL "${pids[@]}"
    fi
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    children_done=1
    wait_prefixers
}

# Waits until the prefixers have passed on their processes' last lines.
wait_prefixers() {
    local pid
    for pid in "${prefixers[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    prefixers=()
}

cleanup() {
    trap '' INT TERM HUP
    stop_children
    if [[ -n $pgdir && ${KEEP_DB:-0} == 1 ]]; then
        log "PostgreSQL keeps running (KEEP_DB=1): DATABASE_URL=$DATABASE_URL $bin status;" \
            "stop it with scripts/lib/pg.sh stop .pgdata"
    elif [[ -n $pgdir ]]; then
        pg_stop "$pgdir" || true
        log "PostgreSQL stopped; its data stays in .pgdata/: scripts/lib/pg.sh start .pgdata" \
            "starts it again at $DATABASE_URL (KEEP_DB=1 $0 leaves it running)"
    fi
    if [[ -n $fifodir ]]; then
        rm -rf -- "$fifodir"
    fi
    # Remove the pid file only if it is still ours.
    if [[ -f $pidfile && $(head -n 1 "$pidfile" 2>/dev/null) == "$$" ]]; then
        rm -f -- "$pidfile"
    fi
}

on_signal() {
    trap '' INT TERM HUP
    # Those still running: one killed meanwhile may linger as a zombie until reaped.
    local running=0 pid state
    for pid in "${pids[@]}"; do
        state=$(ps -o stat= -p "$pid" 2>/dev/null) || true
        [[ -n $state && $state != Z* ]] && running=$((running + 1))
    done
    log "stopping $running projector process(es)"
    stop_children
    exit 0
}

trap cleanup EXIT
trap on_signal INT TERM HUP

if [[ -n ${PROJECTOR_BIN:-} ]]; then
    [[ -x $bin ]] || {
        log "PROJECTOR_BIN=$bin is not an executable file"
        exit 2
    }
elif command -v cargo >/dev/null 2>&1; then
    log "building target/release/projector (the first build takes a few minutes; cargo shows its progress)"
    cargo build --release --bin projector
elif [[ ! -x $bin ]]; then
    log "cargo not found and $bin does not exist"
    exit 1
fi

stop_previous_run

if [[ -z ${DATABASE_URL:-} ]]; then
    pgdir=$root/.pgdata
    pg_start "$pgdir"
    log "PostgreSQL at $DATABASE_URL (data in .pgdata/, URL in .pgdata/url)"
fi

# The projection flags and the connection flags among the extra arguments: migrate
# and seed use the connection, and changing N goes through `projector repartition`
# of every projection the processes run (the earlier run's are stopped by now).
projections=()
connection=()
for ((i = 0; i < ${#extra[@]}; i++)); do
    case ${extra[i]} in
    --projection | --projection-file)
        projections+=("${extra[i]}" "${extra[i + 1]:-}")
        ;;
    --schema | --database-url | --keepalive-timeout-secs | --session-timeout-secs | --log-format)
        connection+=("${extra[i]}" "${extra[i + 1]:-}")
        ;;
    esac
done
"$bin" "${connection[@]}" migrate
"$bin" "${connection[@]}" seed --if-empty

# Each process runs in its own session when possible, so a terminal Ctrl-C
# reaches only this script, which then sends a single SIGTERM to each.
launcher=()
if command -v setsid >/dev/null 2>&1; then
    launcher=(setsid)
fi

# Prefixes each line of stdin with $1, without buffering.
prefix_lines() {
    if ((sed_unbuffered)); then
        sed -u "s|^|$1|"
    else
        awk -v p="$1" '{ print p $0; fflush() }'
    fi
}
sed_unbuffered=0
if sed -u '' </dev/null >/dev/null 2>&1; then
    sed_unbuffered=1
fi

if ((${#projections[@]} == 0)); then
    projections=(--projection users) # a run's default
fi
"$bin" "${connection[@]}" repartition "${projections[@]}" --to "$n"

# Each process writes to a FIFO read by its prefixer. A terminal Ctrl-C reaches
# the prefixers too (they share this script's process group): they ignore it
# and end when their process's output closes, after its stop summary.
fifodir=$(mktemp -d "${TMPDIR:-/tmp}/run-all.XXXXXX")

# Starts process number $1, with `--partition-key` $2, labelled $3.
start_process() {
    local k=$1 keys=$2 label=$3
    mkfifo "$fifodir/p$k"
    (
        trap '' INT
        prefix_lines "[$label] " <"$fifodir/p$k"
    ) &
    prefixers+=("$!")
    "${launcher[@]}" "$bin" --partition-key "$keys" --total-partitions "$n" "${extra[@]}" \
        >"$fifodir/p$k" 2>&1 &
    pids+=("$!")
}

if ((auto)); then
    for ((k = 0; k < auto; k++)); do
        start_process "$k" auto "a$k"
    done
else
    for ((k = 0; k < n; k++)); do
        start_process "$k" "$k" "p$k/$n"
    done
fi
printf '%s\n' "$$" "${pids[@]}" >"$pidfile"
log "started ${#pids[@]} projector process(es): ${pids[*]}"
if [[ -n $pgdir ]]; then
    log "from another terminal: DATABASE_URL=$DATABASE_URL $bin status"
else
    log "from another terminal, with the same DATABASE_URL: $bin status"
fi

if ((auto)); then
    log "they share $n partitions; from another terminal, $0 --add starts one more and" \
        "$0 --remove stops the newest"
    # --add and --remove reach this script as SIGUSR1 and SIGUSR2.
    adding=0 removing=0 started=$auto
    trap 'adding=$((adding + 1))' USR1
    trap 'removing=$((removing + 1))' USR2
    while true; do
        live=()
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then live+=("$pid"); fi
        done
        ((${#live[@]} > 0 || adding > 0)) || break
        while ((adding > 0)); do
            adding=$((adding - 1))
            start_process "$started" auto "a$started"
            log "process a$started joins (pid ${pids[-1]})"
            started=$((started + 1))
        done
        while ((removing > 0)); do
            removing=$((removing - 1))
            if ((${#live[@]} > 1)); then
                log "stopping the newest process (pid ${live[-1]}); its partitions go to the others"
                kill -TERM "${live[-1]}" 2>/dev/null || true
                unset 'live[-1]'
            else
                log "one process left: --remove keeps it (Ctrl-C stops the run)"
            fi
        done
        printf '%s\n' "$$" "${live[@]}" >"$pidfile"
        wait -n 2>/dev/null || sleep 0.2
    done
    children_done=1
    wait_prefixers
    exit 0
fi

# Exit with the first non-zero status among the processes (in partition order).
status=0
for pid in "${pids[@]}"; do
    if wait "$pid"; then
        :
    else
        rc=$?
        ((status != 0)) || status=$rc
    fi
done
children_done=1
wait_prefixers
exit "$status"
