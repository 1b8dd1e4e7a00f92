#!/usr/bin/env bash
# A/B of the README's three throughput runs (issue 14, "No slower on the hot
# path"): `chatbench direct` with 100 and 1,000 clients and `chatbench
# fanout` to 1,000 clients, on an old and a new chatserver build in
# alternating rounds; prints every run's deliveries/s and server CPU per
# delivery, their medians, and new/old as a percentage.
#
# Usage:
#   benches/scripts/hotpath-ab.sh [OPTIONS] OLD_SERVER NEW_SERVER
#
# Options:
#   --rounds N      rounds (default 3); each runs every workload on both builds
#   --secs S        seconds measured per run (default 10, after a 2 s warm-up)
#   --chatbench P   the chatbench binary (default:
#                   ${CARGO_TARGET_DIR:-target}/release/chatbench)
#   --only W        run one workload only: direct100, direct1000 or fanout1000
#
# The servers are binaries, not commits: build the old one apart and copy
# it, so that rebuilding the tree cannot change it between rounds (see
# mixed-ab.sh). The order of old and new turns each round. A run that fails
# makes the script exit 1 after the summary.
set -euo pipefail

usage() { # usage STATUS: the comment above, as help
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "$1"
}
die() {
    echo "hotpath-ab: $*" >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/../.." && pwd)
rounds=3
secs=10
only=""
chatbench="${CARGO_TARGET_DIR:-$repo/target}/release/chatbench"
positional=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) [ $# -ge 2 ] || die "--rounds needs a value"; rounds=$2; shift 2 ;;
        --secs) [ $# -ge 2 ] || die "--secs needs a value"; secs=$2; shift 2 ;;
        --chatbench) [ $# -ge 2 ] || die "--chatbench needs a value"; chatbench=$2; shift 2 ;;
        --only) [ $# -ge 2 ] || die "--only needs a value"; only=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} -eq 2 ] || die "give OLD_SERVER and NEW_SERVER (see --help)"
builds=("${positional[0]}" "${positional[1]}")
labels=(old new)
for n in "$rounds" "$secs"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--rounds and --secs take a positive whole number, not '$n'"
done
for bin in "${builds[@]}"; do
    [ -x "$bin" ] && [ -f "$bin" ] || die "$bin: not an executable file"
done
[ -x "$chatbench" ] || die "$chatbench: not found; build it (cargo build --release -p chatproto-benches) or give --chatbench"

workloads=(direct100 direct1000 fanout1000)
declare -A args=(
    [direct100]="direct --clients 100 --window 4 --text-bytes 64"
    [direct1000]="direct --clients 1000 --window 4 --text-bytes 64"
    [fanout1000]="fanout --clients 1000 --senders 1 --window 4 --text-bytes 64"
)
if [ -n "$only" ]; then
    [ -n "${args[$only]:-}" ] || die "--only takes direct100, direct1000 or fanout1000, not '$only'"
    workloads=("$only")
fi

field() { # field JSON NAME: a number field of a flat JSON line
    sed -n "s/.*\"$2\":\([-0-9.][-0-9.e]*\).*/\1/p" <<<"$1"
}
median() { # median VALUES...
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
        END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2];
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# Figures per workload and build: space-separated lists, one value per run.
declare -A rate cpu
failed=0
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= rounds; r++)); do
    for w in "${workloads[@]}"; do
        for ((i = 0; i < 2; i++)); do
            b=$(((i + r) % 2)) # old first on even rounds, new first on odd
            # shellcheck disable=SC2086 # the workload's arguments split on purpose
            if out=$("$chatbench" ${args[$w]} --secs "$secs" --spawn "${builds[b]}" 2>&1) &&
                json=$(grep '^{' <<<"$out" | tail -1) && [ -n "$json" ]; then
                d=$(field "$json" deliveries_per_sec)
                c=$(field "$json" server_cpu_us_per_delivery)
                lost=$(field "$json" lost)
                printf 'round %d %-10s %-3s %10s deliveries/s  %6s µs CPU/delivery  lost %s\n' \
                    "$r" "$w" "${labels[b]}" "$d" "${c:-n/a}" "$lost"
                rate[$w.$b]="${rate[$w.$b]:-} $d"
                [ -n "$c" ] && cpu[$w.$b]="${cpu[$w.$b]:-} $c"
                [ "$lost" = 0 ] || failed=1
            else
                echo "round $r $w ${labels[b]}: FAILED" >&2
                tail -5 <<<"$out" >&2
                failed=1
            fi
        done
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
printf '%-10s %14s %14s %8s %12s %12s %8s\n' workload "old deliv/s" "new deliv/s" "new/old" "old µs CPU" "new µs CPU" "new/old"
for w in "${workloads[@]}"; do
    # shellcheck disable=SC2086 # the lists split on purpose
    ro=$(median ${rate[$w.0]:-}) rn=$(median ${rate[$w.1]:-})
    # shellcheck disable=SC2086
    co=$(median ${cpu[$w.0]:-}) cn=$(median ${cpu[$w.1]:-})
    pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == 0 || b == "n/a") print "n/a"; else printf "%+.1f%%", (b / a - 1) * 100 }'; }
    printf '%-10s %14s %14s %8s %12s %12s %8s\n' "$w" "$ro" "$rn" "$(pct "$ro" "$rn")" "$co" "$cn" "$(pct "$co" "$cn")"
done
exit "$failed"
