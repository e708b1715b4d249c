#!/usr/bin/env bash
# Size and speed of the release build per opt-level (figures in docs/install.md):
#
#   packaging/measure-opt-levels.sh [LEVEL...]      (default: z s 3)
#
# Size: the stripped release binary (host target; the arm64 one scales alike). Speed:
# the CPU-bound unit tests (money, station, engine::machine: parsing, validation, the
# charge state machine, with their property tests) built with the release profile,
# best of 3 runs. Its own target dir, so the normal build is not disturbed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/opt-measure}
levels=("$@")
[[ ${#levels[@]} -gt 0 ]] || levels=(z s 3)
for level in "${levels[@]}"; do
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=$level
    cargo build --release --locked --bin pointgate >&2
    size=$(stat -c %s "$CARGO_TARGET_DIR/release/pointgate")
    test_bin=$(cargo test --release --locked --lib --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    best=
    for _ in 1 2 3; do
        start=$(date +%s.%N)
        "$test_bin" --quiet --test-threads 1 money station engine::machine >/dev/null
        t=$(echo "$(date +%s.%N) - $start" | bc)
        if [[ -z "$best" ]] || (($(echo "$t < $best" | bc))); then best=$t; fi
    done
    printf 'opt-level=%s  binary %s bytes  cpu-bound unit tests %.2f s\n' "$level" "$size" "$best"
done
