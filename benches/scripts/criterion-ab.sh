#!/usr/bin/env bash
# A/B of criterion's `core` benchmarks: an old and a new checkout's bench
# binaries run alternately (old first in odd rounds), so a noisy machine
# disturbs both alike; prints each run's time and the medians.
#
# Usage:
#   benches/scripts/criterion-ab.sh [--rounds N] [--filter REGEX] OLD_DIR NEW_DIR
#
#   OLD_DIR, NEW_DIR  checkouts (e.g. `git worktree add /tmp/chat-old COMMIT`);
#                     each is built with its own target directory,
#                     DIR/target/criterion-ab, so they never share artifacts
#   --rounds N        rounds (default 3)
#   --filter REGEX    which benchmarks (default: core/direct_message|fanout/broadcast_to_1000$)
set -euo pipefail

usage() { # usage STATUS: the comment above, as help
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "$1"
}
die() {
    echo "criterion-ab: $*" >&2
    exit 2
}

rounds=3
filter='core/direct_message|fanout/broadcast_to_1000$'
dirs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) [ $# -ge 2 ] || die "--rounds needs a value"; rounds=$2; shift 2 ;;
        --filter) [ $# -ge 2 ] || die "--filter needs a value"; filter=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) dirs+=("$1"); shift ;;
    esac
done
[ ${#dirs[@]} -eq 2 ] || die "give OLD_DIR and NEW_DIR (see --help)"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "--rounds takes a positive whole number, not '$rounds'"

labels=(old new)
bins=()
for i in 0 1; do
    dir=${dirs[i]}
    [ -f "$dir/Cargo.toml" ] || die "$dir: not a checkout (no Cargo.toml)"
    echo "building the ${labels[i]} benchmarks in $dir" >&2
    bin=$(cd "$dir" && CARGO_TARGET_DIR="$dir/target/criterion-ab" \
        cargo bench -p chatproto-benches --bench core --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    [ -x "$bin" ] || die "cannot build the benchmarks in $dir"
    bins+=("$bin")
done

# Per benchmark and build: the criterion point estimates, one per run.
declare -A times
names=()
for ((r = 1; r <= rounds; r++)); do
    for ((k = 0; k < 2; k++)); do
        b=$(((k + r + 1) % 2)) # old first in odd rounds
        name=""
        while IFS= read -r line; do
            if [[ "$line" =~ ^([a-z_0-9/]+)$ ]]; then
                name=${BASH_REMATCH[1]}
            elif [[ "$line" =~ time:\ +\[[^\ ]+\ [^\ ]+\ ([0-9.]+)\ ([nµm]?s) ]] && [ -n "$name" ]; then
                value=${BASH_REMATCH[1]}
                unit=${BASH_REMATCH[2]}
                case "$unit" in # all in ns
                    ns) ns=$value ;;
                    µs) ns=$(awk -v v="$value" 'BEGIN { print v * 1000 }') ;;
                    ms) ns=$(awk -v v="$value" 'BEGIN { print v * 1000000 }') ;;
                    *) ns=$(awk -v v="$value" 'BEGIN { print v * 1000000000 }') ;;
                esac
                [ -n "${times[$name.0]+x}${times[$name.1]+x}" ] || names+=("$name")
                times[$name.$b]="${times[$name.$b]:-} $ns"
                printf 'round %d %-3s %-45s %12.1f ns\n' "$r" "${labels[b]}" "$name" "$ns"
                name=""
            fi
        done < <("${bins[b]}" --bench "$filter" --warm-up-time 1 --measurement-time 3 --noplot 2>/dev/null)
    done
done

median() { # median VALUES...
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
        END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2];
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
echo
printf '%-45s %12s %12s %8s\n' benchmark "old ns" "new ns" "new/old"
for name in "${names[@]}"; do
    # shellcheck disable=SC2086 # the lists split on purpose
    o=$(median ${times[$name.0]:-}) n=$(median ${times[$name.1]:-})
    printf '%-45s %12s %12s %8s\n' "$name" "$o" "$n" \
        "$(awk -v a="$o" -v b="$n" 'BEGIN { if (a == "n/a" || b == "n/a" || a == 0) print "n/a"; else printf "%+.1f%%", (b / a - 1) * 100 }')"
done
