#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The project's test command: formatting, lints, builds and all tests.
#
# Usage: scripts/test.sh [ARGS...]
# ARGS go to `cargo test` of the library, binary, tests and examples (e.g. a
# test-name filter). Benchmarks are built by clippy here but run only by scripts/bench.sh.
# Without DATABASE_URL, a throw-away PostgreSQL server is started for the run.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
source "$here/lib/pg.sh"

cd "$root"

trap pg_stop_temp EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -z ${DATABASE_URL:-} ]]; then
    pg_start_temp projector-test-pg
fi

step() {
    printf '\n==> %s\n' "$*"
    if ! "$@"; then
        printf '\n==> FAILED: %s\n' "$*" >&2
        exit 1
    fi
}

step cargo fmt --all -- --check
step cargo clippy --all-targets --all-features -- -D warnings
step cargo build --no-default-features
step cargo test --lib --bins --tests --examples "$@"
step cargo test --doc
step env RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items

printf '\n==> All checks passed\n'
