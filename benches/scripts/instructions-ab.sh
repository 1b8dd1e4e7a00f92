#!/usr/bin/env bash
# A/B of the core's hot paths by instructions executed (valgrind's
# cachegrind), not time: on a shared machine criterion's times move by a
# fifth between runs, an instruction count by a few instructions. Runs the
# `core_counts` example of each checkout (benches/examples/core_counts.rs)
# with ITERATIONS and with 0 iterations, and prints the difference per
# iteration, old and new.
#
# Usage:
#   benches/scripts/instructions-ab.sh [--iterations N] OLD_DIR NEW_DIR
#
#   OLD_DIR, NEW_DIR  checkouts, each with benches/examples/core_counts.rs
#                     (copy it into an older one; it needs only the public
#                     API); built in DIR/target/criterion-ab
#   --iterations N    per workload (default 2000)
#
# Instructions are not time (a cache miss or a stall costs cycles the
# count does not show), so confirm a change with criterion as well.
set -euo pipefail

usage() { # usage STATUS: the comment above, as help
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "$1"
}
die() {
    echo "instructions-ab: $*" >&2
    exit 2
}

iterations=2000
dirs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --iterations) [ $# -ge 2 ] || die "--iterations needs a value"; iterations=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) dirs+=("$1"); shift ;;
    esac
done
[ ${#dirs[@]} -eq 2 ] || die "give OLD_DIR and NEW_DIR (see --help)"
[[ "$iterations" =~ ^[1-9][0-9]*$ ]] || die "--iterations takes a positive whole number, not '$iterations'"
command -v valgrind >/dev/null || die "needs valgrind (apt-get install valgrind)"

labels=(old new)
bins=()
for i in 0 1; do
    dir=${dirs[i]}
    [ -f "$dir/benches/examples/core_counts.rs" ] ||
        die "$dir: no benches/examples/core_counts.rs (copy it from the new checkout)"
    echo "building core_counts in $dir" >&2
    (cd "$dir" && CARGO_TARGET_DIR="$dir/target/criterion-ab" \
        cargo build -q --release -p chatproto-benches --example core_counts) ||
        die "cannot build core_counts in $dir"
    bins+=("$dir/target/criterion-ab/release/examples/core_counts")
done

instructions() { # instructions BINARY WORKLOAD ITERATIONS: instructions executed
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$@" 2>&1 |
        sed -n 's/.*I *refs: *\([0-9,]*\).*/\1/p' | tr -d ,
}

printf '%-15s %14s %14s %8s\n' workload "old instr/it" "new instr/it" "new/old"
for workload in inline json batch64 broadcast1000; do
    per=()
    for b in 0 1; do
        full=$(instructions "${bins[b]}" "$workload" "$iterations")
        base=$(instructions "${bins[b]}" "$workload" 0)
        [ -n "$full" ] && [ -n "$base" ] || die "${labels[b]} $workload: no count from valgrind"
        per+=("$(((full - base) / iterations))")
    done
    printf '%-15s %14s %14s %8s\n' "$workload" "${per[0]}" "${per[1]}" \
        "$(awk -v a="${per[0]}" -v b="${per[1]}" 'BEGIN { printf "%+.1f%%", (b / a - 1) * 100 }')"
done
