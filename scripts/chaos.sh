#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317 # functions run from traps
# Chaos run: the projector under kills, stops and PostgreSQL restarts, then an exactness check.
#
# Usage: scripts/chaos.sh [-n EVENTS] [-d MINUTES] [--layout-changes] [--auto] [-h]
#   -n EVENTS         events seeded before the run (default 1000000)
#   -d MINUTES        how long the chaos lasts (default 5)
#   --layout-changes  also change the layout (4 -> 3 -> 5 -> 4; with --auto 12 -> 8 -> 10 -> 12)
#   --auto            processes share 12 partitions (--partition-key auto): 3 start, and members
#                     join and leave (cleanly or killed) besides the other faults
#   -h, --help        this help
#
# Starts a throw-away PostgreSQL server of its own, seeds EVENTS events, runs one
# `projector --projection aggregate-stats` process per partition (4), and keeps 4 writers
# appending (some transactions held open for seconds, ~10 % rolled back) while, every 1-3 s,
# it SIGKILLs a random process and restarts it, SIGSTOPs one for a few seconds, or restarts
# PostgreSQL (-m fast or -m immediate). Then it waits until the projector has caught up and
# compares aggregate_stats with the events table. Exits 1 on any lost, doubled or out-of-order
# event, or when the projector does not catch up; 2 on bad usage. Not part of CI.
set -euo pipefail

usage() {
    sed -n '5,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

events=1000000
minutes=5
layout_changes=0
auto=0
while [[ $# -gt 0 ]]; do
    case $1 in
    -n | -d)
        if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
            printf '%s needs a positive whole number\n' "$1" >&2
            usage >&2
            exit 2
        fi
        if [[ $1 == -n ]]; then events=$2; else minutes=$2; fi
        shift 2
        ;;
    --layout-changes)
        layout_changes=1
        shift
        ;;
    --auto)
        auto=1
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        printf 'unknown argument: %s\n' "$1" >&2
        usage >&2
        exit 2
        ;;
    esac
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
source "$here/lib/pg.sh"
cd "$root"

bin=$root/target/release/projector
# Flags say everything; stray settings from the environment must not change the run.
unset PROJECTOR_SCHEMA PARTITION_KEY TOTAL_PARTITIONS
export RUST_LOG=${RUST_LOG:-info}
projection=aggregate-stats
writers=4
total=4
work=$(mktemp -d "${TMPDIR:-/tmp}/projector-chaos.XXXXXX")
stopfile=$work/stop-writers
pids=() # projector process per partition slot
waited=
r=0
writer_pids=()
kills=0 stops=0 restarts_fast=0 restarts_immediate=0 layouts=0 exits=0 joins=0 leaves=0
if ((auto)); then
    total=12
fi
recoveries=()

# Sets `r` to a random whole number below $1. Not $RANDOM: its low bits repeat in short
# cycles, so drawing several numbers per round (sleep, partition, action) skipped some actions
# for good.
roll() {
    local x=${SRANDOM:-}
    if [[ -z $x ]]; then
        x=$(od -An -N4 -tu4 /dev/urandom)
        x=${x//[^0-9]/}
    fi
    r=$((x % $1))
}

say() {
    printf 'chaos %s %s\n' "$(date +%T)" "$*" >&2
}

cleanup() {
    trap '' INT TERM
    touch "$stopfile"
    local pid
    for pid in "${pids[@]}" "${writer_pids[@]}"; do
        [[ -n $pid ]] || continue
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}" "${writer_pids[@]}"; do
        if [[ -n $pid ]]; then wait "$pid" 2>/dev/null || true; fi
    done
    pg_stop_temp
    say "logs kept in $work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ ! -x $bin ]]; then
    say "building target/release/projector"
    cargo build --release --quiet --bin projector
fi
psql_cmd=$(command -v psql 2>/dev/null || true)
if [[ -z $psql_cmd ]]; then
    psql_cmd=$(pg_bindir)/psql
fi
if command -v jq >/dev/null 2>&1; then
    json=jq
elif command -v python3 >/dev/null 2>&1; then
    json=python3
else
    say "needs jq or python3 to read \`projector status --json\`"
    exit 2
fi

# A server of its own, as pg_start_temp starts one but with synchronous_commit left on: off,
# a crash (-m immediate) could lose commits that were acknowledged, which no projector can
# make up for. fsync off loses nothing while only the server goes down.
PG_TEMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/projector-chaos-pg.XXXXXX")
if [[ ${EUID} -eq 0 ]]; then
    chown postgres: "$PG_TEMP_DIR"
fi
PG_FAST=0 pg_start "$PG_TEMP_DIR"
url=$DATABASE_URL
bindir=$(pg_bindir)

sql() {
    "$psql_cmd" "$url" -qAtX -v ON_ERROR_STOP=1 "$@"
}

sql -c "ALTER SYSTEM SET fsync = off" -c "SELECT pg_reload_conf()" >/dev/null
say "PostgreSQL at $url (data in $PG_TEMP_DIR)"

# --- the store -------------------------------------------------------------------------------

"$bin" migrate >&2
aggregates=$(((events + 99) / 100))
say "seeding $events events over $aggregates aggregates"
sql -c "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version,
            event_id, event_type, payload)
        SELECT 'chaos', 'Thing', 'seed-' || (n % $aggregates), n / $aggregates + 1,
            gen_random_uuid(), 'Happened', convert_to('{\"n\":' || n || '}', 'UTF8')
        FROM generate_series(0, $events - 1) n ORDER BY n"

# --- projector processes ---------------------------------------------------------------------

# Starts the process of partition $1 of $total into slot $1, its output appended to a log;
# with --auto, a process that shares the partitions into slot $1.
start_process() {
    local key=$1 keys=$1
    ((auto)) && keys=auto
    "$bin" --partition-key "$keys" --total-partitions "$total" --projection "$projection" \
        >>"$work/p$key.log" 2>&1 &
    pids[key]=$!
}

# --auto: a new member joins, in the first free slot (at most 5 members).
join_member() {
    local slot=0
    while [[ -n ${pids[slot]:-} ]]; do slot=$((slot + 1)); done
    ((slot < 5)) || return 0
    say "member joins (slot $slot)"
    start_process "$slot"
    joins=$((joins + 1))
}

# --auto: member $1 leaves, cleanly (TERM) or killed (KILL) as $2 says; the last one stays.
leave_member() {
    local slot=$1 how=$2
    ((${#pids[@]} > 1)) || return 0
    say "member in slot $slot leaves (SIG$how, pid ${pids[slot]})"
    kill "-$how" "${pids[slot]}" 2>/dev/null || true
    wait "${pids[slot]}" 2>/dev/null || true
    unset "pids[slot]"
    leaves=$((leaves + 1))
    [[ $how == KILL ]] && kills=$((kills + 1))
    return 0
}

# Restarts any process that has exited by itself, counting it.
restart_exited() {
    local key rc
    for key in "${!pids[@]}"; do
        if ! kill -0 "${pids[key]}" 2>/dev/null; then
            rc=0
            wait "${pids[key]}" 2>/dev/null || rc=$?
            exits=$((exits + 1))
            say "partition $key/$total exited by itself (status $rc); restarting it"
            start_process "$key"
        fi
    done
}

stop_all_processes() {
    local pid
    for pid in "${pids[@]}"; do
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}

if ((auto)); then
    for ((k = 0; k < 3; k++)); do
        start_process "$k"
    done
else
    for ((k = 0; k < total; k++)); do
        start_process "$k"
    done
fi

# --- writers ---------------------------------------------------------------------------------

# Writer $1 appends to its own 10 aggregates in transactions of 1-5 events, holding about one
# in ten open for 1-3 s and rolling about one in ten back, until the stop file appears. After a
# failed transaction (the server restarting) it reads its versions back before going on.
writer() {
    local w=$1 k c i sql_text versions=() rc r
    for ((k = 0; k < 10; k++)); do versions[k]=0; done
    while [[ ! -e $stopfile ]]; do
        roll 10
        k=$r
        roll 5
        c=$((r + 1))
        sql_text="BEGIN; INSERT INTO events (bounded_context, aggregate_type, aggregate_id,
            aggregate_version, event_id, event_type, payload) VALUES "
        for ((i = 1; i <= c; i++)); do
            ((i > 1)) && sql_text+=", "
            sql_text+="('chaos', 'Thing', 'w$w-$k', $((versions[k] + i)), gen_random_uuid(), 'Happened', '\\x7b7d')"
        done
        sql_text+=";"
        roll 10
        if ((r == 0)); then
            roll 3
            sql_text+=" SELECT pg_sleep($((r + 1)));"
            echo held >>"$work/writes.log"
        fi
        roll 10
        if ((r == 0)); then
            sql_text+=" ROLLBACK;"
            sql -c "$sql_text" >/dev/null 2>&1 || true
            echo rolled-back >>"$work/writes.log"
            continue
        fi
        sql_text+=" COMMIT;"
        rc=0
        sql -c "$sql_text" >/dev/null 2>&1 || rc=$?
        if ((rc == 0)); then
            versions[k]=$((versions[k] + c))
            echo committed >>"$work/writes.log"
        else
            # Whether it committed is unknown: read the versions back once the server answers.
            echo failed >>"$work/writes.log"
            sleep 0.2
            for ((k = 0; k < 10; k++)); do
                versions[k]=$(sql -c "SELECT COALESCE(MAX(aggregate_version), 0) FROM events
                                      WHERE aggregate_id = 'w$w-$k'" 2>/dev/null) || {
                    sleep 0.3
                    k=-1
                    [[ -e $stopfile ]] && return 0
                    continue
                }
            done
        fi
        roll 5
        sleep "0.0$r"
    done
}

for ((w = 0; w < writers; w++)); do
    writer "$w" &
    writer_pids+=("$!")
done

# --- where the projector stands --------------------------------------------------------------

# Prints "HEAD MIN_CHECKPOINT" from `projector status --json` (nothing when unavailable).
standing() {
    local doc
    doc=$("$bin" status --projection "$projection" --json 2>/dev/null) || return 0
    if [[ $json == jq ]]; then
        jq -r --arg p "$projection" \
            '[.head_position, ([.projections[] | select(.projection == $p) | .partitions[].checkpoint] | min // 0)] | @tsv' \
            <<<"$doc"
    else
        python3 -c 'import json, sys
d = json.load(sys.stdin)
c = [p["checkpoint"] for j in d["projections"] if j["projection"] == sys.argv[1] for p in j["partitions"]]
print(d["head_position"], min(c) if c else 0)' "$projection" <<<"$doc"
    fi
}

# Waits until every partition's checkpoint reaches position $1 (up to $2 seconds), restarting
# processes that exit meanwhile; sets `waited` to the seconds it took, or fails. (Not run in a
# command substitution: the processes it restarts must be this shell's children.)
wait_for_checkpoints() {
    local target=$1 limit=$2 start now line head low
    waited=
    start=$(date +%s.%N)
    while true; do
        restart_exited
        line=$(standing)
        read -r head low <<<"${line:-0 0}"
        : "$head"
        if ((low >= target)); then
            now=$(date +%s.%N)
            waited=$(awk -v a="$start" -v b="$now" 'BEGIN { printf "%.2f", b - a }')
            return 0
        fi
        now=$(date +%s.%N)
        if awk -v a="$start" -v b="$now" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            return 1
        fi
        sleep 0.2
    done
}

# --- chaos -----------------------------------------------------------------------------------

restart_pg() {
    local mode=$1 head
    say "restarting PostgreSQL -m $mode"
    pg_as_owner "$bindir/pg_ctl" restart -D "$PG_TEMP_DIR" -m "$mode" -w -t 60 -s \
        -l "$PG_TEMP_DIR/server.log" >/dev/null
    if [[ $mode == fast ]]; then
        restarts_fast=$((restarts_fast + 1))
    else
        restarts_immediate=$((restarts_immediate + 1))
    fi
    # Recovered: everything committed before the server came back is applied.
    head=$(sql -c "SELECT COALESCE(MAX(global_position), 0) FROM events")
    if wait_for_checkpoints "$head" 120; then
        recoveries+=("$waited")
        say "recovered in ${waited} s"
    else
        say "not recovered within 120 s of the restart"
        recoveries+=(120)
    fi
}

layout_sequence=(3 5 4)
((auto)) && layout_sequence=(8 10 12)
layout_next=0
repartition_available=0
if ((layout_changes)); then
    if "$bin" repartition --help >/dev/null 2>&1; then
        repartition_available=1
    else
        say "layout changes unavailable: this projector has no \`repartition\` command"
    fi
fi

change_layout() {
    local to=${layout_sequence[layout_next]}
    layout_next=$(((layout_next + 1) % ${#layout_sequence[@]}))
    say "changing the layout $total -> $to"
    if ((auto)); then
        # Sharing processes follow the new layout while they run.
        if "$bin" repartition --projection "$projection" --to "$to" >>"$work/repartition.log" 2>&1; then
            total=$to
            layouts=$((layouts + 1))
        else
            say "projector repartition --to $to failed (see $work/repartition.log)"
        fi
        return 0
    fi
    stop_all_processes
    if "$bin" repartition --projection "$projection" --to "$to" >>"$work/repartition.log" 2>&1; then
        total=$to
        layouts=$((layouts + 1))
    else
        say "projector repartition --to $to failed (see $work/repartition.log)"
    fi
    for ((k = 0; k < total; k++)); do
        start_process "$k"
    done
}

say "chaos for $minutes minute(s); work files in $work"
deadline=$((SECONDS + minutes * 60))
next_layout=$((SECONDS + 30))
while ((SECONDS < deadline)); do
    roll 3
    sleep "$((r + 1))"
    restart_exited
    if ((repartition_available && SECONDS >= next_layout)); then
        change_layout
        next_layout=$((SECONDS + 30))
        continue
    fi
    if ((auto)); then
        slots=("${!pids[@]}")
        roll "${#slots[@]}"
        key=${slots[r]}
        roll 6
        case $r in
        0) leave_member "$key" KILL ;;
        1)
            say "SIGSTOP member in slot $key (pid ${pids[key]})"
            kill -STOP "${pids[key]}" 2>/dev/null || true
            roll 3
            sleep "$((r + 2))"
            kill -CONT "${pids[key]}" 2>/dev/null || true
            stops=$((stops + 1))
            ;;
        2) restart_pg fast ;;
        3) restart_pg immediate ;;
        4) join_member ;;
        5) leave_member "$key" TERM ;;
        esac
        continue
    fi
    roll "$total"
    key=$r
    roll 4
    case $r in
    0)
        say "SIGKILL partition $key/$total (pid ${pids[key]})"
        kill -KILL "${pids[key]}" 2>/dev/null || true
        wait "${pids[key]}" 2>/dev/null || true
        start_process "$key"
        kills=$((kills + 1))
        ;;
    1)
        say "SIGSTOP partition $key/$total (pid ${pids[key]})"
        kill -STOP "${pids[key]}" 2>/dev/null || true
        roll 3
        sleep "$((r + 2))"
        kill -CONT "${pids[key]}" 2>/dev/null || true
        stops=$((stops + 1))
        ;;
    2) restart_pg fast ;;
    3) restart_pg immediate ;;
    esac
done

say "stopping the writers"
touch "$stopfile"
for pid in "${writer_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
done
writer_pids=()

head=$(sql -c "SELECT COALESCE(MAX(global_position), 0) FROM events")
say "waiting for the projector to catch up with position $head"
caught_up=1
catch_up_seconds=">600"
if wait_for_checkpoints "$head" 600; then
    catch_up_seconds=$waited
else
    caught_up=0
fi

# --- the verdict -----------------------------------------------------------------------------

read -r committed applied lost doubled disordered <<<"$(sql -F ' ' -c "
    WITH e AS (
        SELECT bounded_context, aggregate_type, aggregate_id, COUNT(*) AS n,
            MAX(aggregate_version) AS v, MAX(global_position) AS p
        FROM events GROUP BY 1, 2, 3),
    j AS (SELECT e.n, s.events_applied AS a, e.v, s.last_version AS sv, e.p,
              s.last_global_position AS sp
          FROM e FULL JOIN aggregate_stats s
              USING (bounded_context, aggregate_type, aggregate_id))
    SELECT (SELECT COUNT(*) FROM events),
        (SELECT COALESCE(SUM(events_applied), 0) FROM aggregate_stats),
        COALESCE(SUM(GREATEST(COALESCE(n, 0) - COALESCE(a, 0), 0)), 0),
        COALESCE(SUM(GREATEST(COALESCE(a, 0) - COALESCE(n, 0), 0)), 0),
        COUNT(*) FILTER (WHERE n = a AND (v IS DISTINCT FROM sv OR p IS DISTINCT FROM sp))
    FROM j")"

percentiles() {
    if (($# == 0)); then
        echo "- / -"
        return
    fi
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f s / %.2f s\n", v[int((NR + 1) / 2)], v[NR] }'
}
tally() {
    grep -cx "$1" "$work/writes.log" 2>/dev/null || true
}
# env_logger writes `[TIME LEVEL] message`, the level padded to five characters.
warnings=$(cat "$work"/p*.log | grep -cE '^\[[^]]* WARN *\]' || true)
errors=$(cat "$work"/p*.log | grep -cE '^\[[^]]* ERROR *\]' || true)

layout_row=$layouts
if ((!layout_changes)); then
    layout_row="off (--layout-changes)"
elif ((!repartition_available)); then
    layout_row="unavailable"
fi
printf '\n'
printf '%-44s %s\n' \
    "events seeded" "$events" \
    "chaos minutes" "$minutes" \
    "events committed (seeded + writers)" "$committed" \
    "writer transactions committed / rolled back" "$(tally committed) / $(tally rolled-back)" \
    "  held open 1-3 s / failed (server down)" "$(tally held) / $(tally failed)" \
    "events applied" "$applied" \
    "lost (must be 0)" "$lost" \
    "doubled (must be 0)" "$doubled" \
    "out of order (must be 0)" "$disordered" \
    "caught up at the end" "$([[ $caught_up == 1 ]] && echo "yes, in ${catch_up_seconds} s" || echo "NO")" \
    "SIGKILLs survived" "$kills" \
    "SIGSTOPs survived" "$stops" \
    "PostgreSQL restarts -m fast" "$restarts_fast" \
    "PostgreSQL restarts -m immediate" "$restarts_immediate" \
    "layout changes" "$layout_row" \
    "members joined / left (--auto)" "$joins / $leaves" \
    "processes that exited by themselves" "$exits" \
    "recovery after a restart (p50 / max)" "$(percentiles "${recoveries[@]}")" \
    "log lines WARN / ERROR" "$warnings / $errors"

if ((lost != 0 || doubled != 0 || disordered != 0 || caught_up != 1)); then
    printf '\nFAILED: the read model does not match the events table\n'
    exit 1
fi
printf '\nOK: every committed event applied exactly once, in order\n'
