#!/usr/bin/env bash
# A/B of `chatbench mixed` (issue 14, "Durable mode does not stall the event
# loop"): an old and a new chatserver build in alternating rounds, each run
# on a new SQLite database, and with --no-db also the new build without a
# database; prints every run's figures, the medians of stored messages/s
# and of the online messages' p99, and the issue's two goals.
#
# Usage:
#   benches/scripts/mixed-ab.sh [OPTIONS] OLD_SERVER NEW_SERVER [-- MIXED_ARGS...]
#
# Options:
#   --rounds N      rounds (default 3); each runs every variant once
#   --secs S        seconds measured per run (default 10, after a 2 s warm-up)
#   --no-db         each round also runs the new build with --no-db (the
#                   goal "new p99 <= 2 x the same run with --no-db" needs it)
#   --wait S        before each run, wait up to S seconds (default 300) for
#                   other chatbench processes on the machine to end (0: no wait)
#   --chatbench P   the chatbench binary (default:
#                   ${CARGO_TARGET_DIR:-target}/release/chatbench)
# MIXED_ARGS go to every `chatbench mixed` run (e.g. --store-rate 10000).
#
# The servers are binaries, not commits: build the old one apart and copy
# it, so that rebuilding the tree cannot change it between rounds:
#   git worktree add /tmp/chat-old OLD_COMMIT
#   (cd /tmp/chat-old && cargo build --release -p chatserver)
#   cp /tmp/chat-old/target/release/chatserver /tmp/chatserver-old
#   cargo build --release -p chatserver -p chatproto-benches
#   benches/scripts/mixed-ab.sh --no-db /tmp/chatserver-old target/release/chatserver
#
# The order of the variants turns by one each round, so that none always
# runs first (after an idle spell) or right after another. A run that
# fails or reports errors is shown, left out of the medians, and makes the
# script exit 1.
set -euo pipefail

usage() { # usage STATUS: the comment above, as help
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "$1"
}
die() {
    echo "mixed-ab: $*" >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/../.." && pwd)
rounds=3
secs=10
no_db=0
wait_secs=300
chatbench="${CARGO_TARGET_DIR:-$repo/target}/release/chatbench"
positional=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) [ $# -ge 2 ] || die "--rounds needs a value"; rounds=$2; shift 2 ;;
        --secs) [ $# -ge 2 ] || die "--secs needs a value"; secs=$2; shift 2 ;;
        --no-db) no_db=1; shift ;;
        --wait) [ $# -ge 2 ] || die "--wait needs a value"; wait_secs=$2; shift 2 ;;
        --chatbench) [ $# -ge 2 ] || die "--chatbench needs a value"; chatbench=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[ ${#positional[@]} -eq 2 ] || die "give OLD_SERVER and NEW_SERVER (see --help)"
old=${positional[0]}
new=${positional[1]}
for n in "$rounds" "$secs"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--rounds and --secs take a positive whole number, not '$n'"
done
[[ "$wait_secs" =~ ^[0-9]+$ ]] || die "--wait takes a whole number of seconds, not '$wait_secs'"
for bin in "$old" "$new"; do
    [ -x "$bin" ] && [ -f "$bin" ] || die "$bin: not an executable file"
done
[ -x "$chatbench" ] || die "$chatbench: not found; build it (cargo build --release -p chatproto-benches) or give --chatbench"

# Variants: a label, a server, and whether it runs with --no-db.
labels=(old new)
servers=("$old" "$new")
nodb=(0 0)
if [ "$no_db" -eq 1 ]; then
    labels+=("new --no-db")
    servers+=("$new")
    nodb+=(1)
fi
count=${#labels[@]}

# Figures per variant: space-separated lists, one value per good run.
declare -a stored p99 lag
for ((v = 0; v < count; v++)); do
    stored[v]=""
    p99[v]=""
    lag[v]=""
done
failed=0
offered=""

field() { # field JSON NAME: a number field of a flat JSON line
    sed -n "s/.*\"$2\":\([-0-9.][-0-9.e]*\).*/\1/p" <<<"$1"
}

median() { # median VALUES...
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
        END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2];
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# On a shared machine another benchmark's load would pass for the server's
# latency: wait (a while) for other chatbench processes to end first.
wait_for_others() {
    local waited=0 others
    while others=$(pgrep -x 'chatbench.*' | tr '\n' ' ') && [ -n "$others" ]; do
        if [ "$waited" -ge "$wait_secs" ]; then
            echo "mixed-ab: WARNING: other chatbench processes ($others) still run after ${waited} s; going on, but their load disturbs this run" >&2
            return
        fi
        [ "$waited" -eq 0 ] && echo "mixed-ab: waiting for other chatbench processes ($others) to end" >&2
        sleep 5
        waited=$((waited + 5))
    done
}

echo "mixed-ab: old $old, new $new; $rounds rounds of ${secs} s runs; chatbench $chatbench ${extra[*]:-}"
for ((round = 1; round <= rounds; round++)); do
    for ((k = 0; k < count; k++)); do
        v=$(((round - 1 + k) % count))
        args=(mixed --spawn "${servers[v]}" --secs "$secs" --json)
        [ "${nodb[v]}" -eq 1 ] && args+=(--no-db)
        args+=("${extra[@]}")
        wait_for_others
        echo "round $round, ${labels[v]}: $chatbench ${args[*]} (load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"
        status=0
        # The readable report (stderr) is shown indented; the JSON line
        # (stdout) is kept.
        line=$("$chatbench" "${args[@]}" 2> >(sed 's/^/    /' >&2) | tail -n 1) || status=$?
        # Let the indented stderr catch up before the next line.
        sleep 0.2
        errors=$(field "$line" errors)
        if [ "$status" -ne 0 ] || [ -z "$errors" ] || [ "$errors" != 0 ]; then
            echo "!!! round $round, ${labels[v]}: FAILED (exit $status, errors ${errors:-unknown}); left out of the medians" >&2
            failed=$((failed + 1))
            continue
        fi
        echo "    json: $line"
        offered=$(field "$line" store_rate)
        stored[v]+=" $(field "$line" stored_per_sec)"
        p99[v]+=" $(field "$line" online_p99_us)"
        lag[v]+=" $(field "$line" send_lag_p99_us)"
    done
done

echo
# The load generator's lateness (p99) says whether the machine let it keep
# its schedule: when it is high, the latencies are the machine's.
printf '%-12s %-30s %-38s %s\n' variant "stored/s: median (runs)" "online p99 µs: median (runs)" "generator late p99 µs (runs)"
declare -a med_stored med_p99
for ((v = 0; v < count; v++)); do
    # Word splitting of the lists is wanted here.
    # shellcheck disable=SC2086
    med_stored[v]=$(median ${stored[v]})
    # shellcheck disable=SC2086
    med_p99[v]=$(median ${p99[v]})
    printf '%-12s %-30s %-38s %s\n' "${labels[v]}" "${med_stored[v]} (${stored[v]# })" "${med_p99[v]} (${p99[v]# })" "${lag[v]# }"
done

echo
goal() { # goal DESCRIPTION AWK_CONDITION
    local verdict
    verdict=$(awk "BEGIN { print ($2) ? \"met\" : \"not met\" }" 2>/dev/null || echo "n/a")
    echo "goal: $1: $verdict"
}
if [ "${med_stored[0]}" != n/a ] && [ "${med_stored[1]}" != n/a ]; then
    goal "new stored/s (${med_stored[1]}) >= old stored/s (${med_stored[0]})" "${med_stored[1]} >= ${med_stored[0]}"
    # A server that keeps up acknowledges what is offered, give or take
    # the acknowledgements that cross the window's edges: then the two
    # medians differ by noise, and the comparison says little.
    awk -v o="${med_stored[0]}" -v n="${med_stored[1]}" -v r="$offered" 'BEGIN {
        printf "      new/old %+.1f%%", (n / o - 1) * 100
        if (o >= 0.99 * r && n >= 0.99 * r)
            printf "; both within 1%% of the %d/s offered: neither fell behind, raise --store-rate to find their limits", r
        printf "\n" }'
fi
if [ "$no_db" -eq 1 ] && [ "${med_p99[1]}" != n/a ] && [ "${med_p99[2]}" != n/a ]; then
    goal "new online p99 (${med_p99[1]} µs) <= 2 x new --no-db p99 (${med_p99[2]} µs)" "${med_p99[1]} <= 2 * ${med_p99[2]}"
fi
if [ "$failed" -gt 0 ]; then
    echo "mixed-ab: $failed runs FAILED or had errors (see the !!! lines above)" >&2
    exit 1
fi
