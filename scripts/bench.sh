#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR disable=SC2317 # cleanup runs from a trap
# The benchmarks against a database of their own: catch-up (benches/catch_up/), several
# projections (benches/projections.rs), latency (benches/latency.rs: from append to read
# model, and read-your-writes waits), the park policy (benches/park.rs: one poison
# aggregate among 10,000), sharing partitions (benches/sharing.rs: 4 processes with
# --partition-key auto against 4 with explicit keys, and the take-over after a SIGKILL) and
# the read replica (benches/replica.rs: the primary's CPU time during a catch-up without and
# with --read-replica-url, on a primary and a pg_basebackup -R replica started for it), and
# versions (benches/versions/: a live version's latency while a new version rebuilds beside
# it in the same process, and the rebuild's time against a rebuild alone).
#
# Usage: scripts/bench.sh [--events N] [--big-events N] [--rounds N] [--quick] [--only BENCH]
#   --events N      events in the main runs (default 1000000)
#   --big-events N  events for the second peak-memory run (default 5000000, 0 skips it)
#   --rounds N      rounds of catch_up, replica and versions, every other one in reverse
#                   order; their ratios are medians over the rounds (default 3)
#   --quick         smoke run: 100000 events, no big run, scaling at 1, 4 and 16 partitions,
#                   latency for 3 s per mode instead of 10, park 3 rounds instead of 7,
#                   1 round of catch_up, replica and versions (unless --rounds is given)
#   --only BENCH    run one benchmark: catch_up, projections, latency, park, sharing,
#                   replica or versions
#
# catch_up, replica and versions each end with a summary line per ratio
# (ratio|key|median|min|max|rounds|what); the script gathers them from the benchmarks' output
# and ends with one table of every ratio.
#
# Without DATABASE_URL, a throw-away PostgreSQL server is started for the run. Either way a
# database projector_bench_<pid>_<time> is created on the server and dropped at the end. The
# replica benchmark always runs on a throw-away primary and replica of its own (fsync on),
# both on this machine, since it reads their processes' CPU time from /proc.
# Numbers are reported, not asserted: the script exits 0 unless something fails to run.
set -euo pipefail

usage() {
    sed -n '13,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

events=1000000
big_events=5000000
scale=1,2,4,8,16
events_set=0
big_set=0
rounds=3
rounds_set=0
quick=0
only=
latency_seconds=10
park_rounds=7
sharing_rounds=5
while [[ $# -gt 0 ]]; do
    case $1 in
    --events | --big-events)
        if [[ $# -lt 2 || ! $2 =~ ^(0|[1-9][0-9]*)$ ]]; then
            printf '%s needs a whole number\n' "$1" >&2
            usage >&2
            exit 2
        fi
        if [[ $1 == --events ]]; then
            events=$2 events_set=1
        else
            big_events=$2 big_set=1
        fi
        shift 2
        ;;
    --rounds)
        if [[ $# -lt 2 || ! $2 =~ ^[1-9][0-9]*$ ]]; then
            printf '%s needs a whole number of at least 1\n' "$1" >&2
            usage >&2
            exit 2
        fi
        rounds=$2 rounds_set=1
        shift 2
        ;;
    --quick)
        quick=1
        shift
        ;;
    --only)
        if [[ $# -lt 2 || ! $2 =~ ^(catch_up|projections|latency|park|sharing|replica|versions)$ ]]; then
            printf '%s needs catch_up, projections, latency, park, sharing, replica or versions\n' "$1" >&2
            usage >&2
            exit 2
        fi
        only=$2
        shift 2
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
if ((quick)); then
    ((events_set)) || events=100000
    ((big_set)) || big_events=0
    ((rounds_set)) || rounds=1
    scale=1,4,16
    latency_seconds=3
    park_rounds=3
    sharing_rounds=1
fi
if ((events < 1)) || ((big_events != 0 && big_events <= events)); then
    printf 'need --events >= 1 and --big-events 0 or above --events (got %s and %s)\n' \
        "$events" "$big_events" >&2
    exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
source "$here/lib/pg.sh"
cd "$root"

# The URL with any password replaced by ***.
redact() {
    sed -E 's#^([a-z]+://[^:/@?]*):[^@/?]*@#\1:***@#' <<<"$1"
}

# Prints a command (passwords in URLs hidden, words quoted where needed), then runs it.
run() {
    local line='' word
    for word in "$@"; do
        word=$(redact "$word")
        [[ $word =~ ^[A-Za-z0-9_./:=@,%+-]+$ ]] || word=${word@Q}
        line+=${line:+ }$word
    done
    printf '\n$ %s\n' "$line"
    "$@"
}

# The URL of database $2 on the server of URL $1 (any query string kept).
with_database() {
    local url=$1 db=$2 base query rest scheme authority
    base=${url%%\?*}
    query=${url#"$base"}
    scheme=${base%%://*}
    rest=${base#*://}
    authority=${rest%%/*}
    printf '%s://%s/%s%s\n' "$scheme" "$authority" "$db" "$query"
}

psql_bin() {
    if command -v psql >/dev/null 2>&1; then
        command -v psql
    elif [[ -x $(pg_bindir)/psql ]]; then
        printf '%s/psql\n' "$(pg_bindir)"
    else
        printf 'pg: psql not found\n' >&2
        return 1
    fi
}

admin_url=
bench_db=
pair_dirs=()
output=
finished=0
cleanup() {
    if [[ -n $bench_db ]]; then
        run "$psql" "$admin_url" -qX -v ON_ERROR_STOP=1 \
            -c "DROP DATABASE IF EXISTS $bench_db WITH (FORCE)" || true
    fi
    local dir
    for dir in "${pair_dirs[@]}"; do
        pg_stop "$dir" || true
        rm -rf -- "$dir"
    done
    pg_stop_temp
    # Last, after the servers' clean-up, once every benchmark has run.
    if [[ -n $output ]]; then
        ((finished == 0)) || print_ratios
        rm -f -- "$output"
    fi
}

# Starts a throw-away primary and a streaming replica of it (pg_basebackup -R), each in a new
# temporary directory, and sets pair_primary_url and pair_replica_url.
start_replica_pair() {
    local primary_dir replica_dir saved=${DATABASE_URL-}
    primary_dir=$(mktemp -d "${TMPDIR:-/tmp}/projector-bench-primary.XXXXXX")
    replica_dir=$(mktemp -d "${TMPDIR:-/tmp}/projector-bench-replica.XXXXXX")
    # The replica is stopped first.
    pair_dirs=("$replica_dir" "$primary_dir")
    if [[ ${EUID} -eq 0 ]]; then
        chown postgres: "$primary_dir" "$replica_dir"
    fi
    # Durable settings (fsync and synchronous_commit on, as in production): with
    # synchronous_commit off, commits reach the replica only at the WAL writer's next flush.
    PG_FAST=0 pg_start "$primary_dir"
    pair_primary_url=$DATABASE_URL
    # Beside the server binaries (a symlinked pg_ctl points at them), else on PATH.
    local basebackup
    basebackup=$(dirname "$(readlink -f "$(pg_bindir)/pg_ctl")")/pg_basebackup
    [[ -x $basebackup ]] || basebackup=$(command -v pg_basebackup)
    run pg_as_owner "$basebackup" -h 127.0.0.1 -p "$(cat "$primary_dir/port")" \
        -U postgres -D "$replica_dir" -R -X stream --no-sync
    # The copy holds the primary's port and URL files: the replica picks a port of its own.
    rm -f "$replica_dir/port" "$replica_dir/url" "$replica_dir/server.log"
    PG_FAST=0 pg_start "$replica_dir"
    pair_replica_url=$DATABASE_URL
    DATABASE_URL=$saved
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# What catch_up, replica and versions print (shown as they run), for their summary lines.
output=$(mktemp "${TMPDIR:-/tmp}/projector-bench-output.XXXXXX")

# At exit (from cleanup): one table of the summary lines in $output
# (ratio|key|median|min|max|rounds|what).
print_ratios() {
    local tag key median min max count what plural=s
    grep -q '^ratio|' "$output" || return 0
    ((rounds == 1)) && plural=
    printf '\n## Every ratio (median of %s round%s, alternating order)\n\n' "$rounds" "$plural"
    printf '| ratio | median | min–max | rounds | target/what |\n'
    printf '|---|---:|---:|---:|---|\n'
    while IFS='|' read -r tag key median min max count what; do
        [[ $tag == ratio ]] || continue
        printf '| %s | %s | %s–%s | %s | %s |\n' "$key" "$median" "$min" "$max" "$count" "$what"
    done <"$output"
}

# The replica benchmark alone needs no server but the pair it starts.
shared_server=1
[[ $only == replica ]] && shared_server=0
if ((shared_server)) && [[ -z ${DATABASE_URL:-} ]]; then
    pg_start_temp projector-bench-pg
fi
if ((shared_server)) && [[ $DATABASE_URL != *://* ]]; then
    printf 'DATABASE_URL must be a URL (postgres://user@host:port/db), got: %s\n' \
        "$(redact "$DATABASE_URL")" >&2
    exit 2
fi
admin_url=${DATABASE_URL-}
psql=$(psql_bin)

run nproc
run cargo build --release
run cargo bench --no-run --bench catch_up --bench projections --bench latency --bench park \
    --bench sharing --bench replica --bench versions

if ((shared_server)); then
    bench_db=projector_bench_$$_$(date +%s)
    run "$psql" "$admin_url" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE $bench_db"
fi

if [[ -z $only || $only == catch_up ]]; then
    run cargo bench --bench catch_up -- \
        --database-url "$(with_database "$admin_url" "$bench_db")" \
        --events "$events" --big-events "$big_events" --scale "$scale" --rounds "$rounds" |
        tee -a "$output"
fi
if [[ -z $only || $only == projections ]]; then
    run cargo bench --bench projections -- \
        --database-url "$(with_database "$admin_url" "$bench_db")" --events "$events"
fi
if [[ -z $only || $only == latency ]]; then
    run cargo bench --bench latency -- \
        --database-url "$(with_database "$admin_url" "$bench_db")" --seconds "$latency_seconds"
fi
if [[ -z $only || $only == park ]]; then
    run cargo bench --bench park -- \
        --database-url "$(with_database "$admin_url" "$bench_db")" --events "$events" \
        --rounds "$park_rounds"
fi
if [[ -z $only || $only == sharing ]]; then
    run cargo bench --bench sharing -- \
        --database-url "$(with_database "$admin_url" "$bench_db")" --events "$events" \
        --rounds "$sharing_rounds" --kills 5
fi
if [[ -z $only || $only == replica ]]; then
    start_replica_pair
    run cargo bench --bench replica -- --database-url "$pair_primary_url" \
        --replica-url "$pair_replica_url" --events "$events" --rounds "$rounds" |
        tee -a "$output"
fi
if [[ -z $only || $only == versions ]]; then
    run cargo bench --bench versions -- \
        --database-url "$(with_database "$admin_url" "$bench_db")" --events "$events" \
        --seconds "$latency_seconds" --rounds "$rounds" | tee -a "$output"
fi
finished=1
