#!/usr/bin/env bash
# Cluster throughput (issue 15, "Performance"): the README's direct/100 and
# fanout/1000 loads, and a login storm (logins100: 32 connections logging
# in and out in a loop while 100 users stay online), on one chatserver
# alone (--no-db), then on N nodes of one cluster (PostgreSQL and NATS)
# with every direct message crossing nodes (--cross-node), in alternating
# rounds; prints each run's deliveries/s (logins/s for logins100) and CPU
# per delivery (per login) (the lone server's; for the cluster, every
# chatserver, nats-server and postgres process on the machine together),
# their medians, and cluster/alone.
#
# Usage:
#   benches/scripts/cluster-bench.sh [OPTIONS]
#
# Options:
#   --rounds N      rounds (default 3)
#   --secs S        seconds measured per run (default 10, after a 2 s warm-up)
#   --nodes N       cluster nodes (default 3)
#   --server P      the chatserver binary (default: target/release/chatserver)
#   --chatbench P   the chatbench binary (default: target/release/chatbench)
#   --pg CONN       a libpq connection string of a role that may create
#                   databases (default: $CHATSERVER_TEST_PG, or
#                   "host=127.0.0.1 user=postgres"); each round gets a
#                   database of its own, dropped after
#   --nats URL      a NATS server (default: $CHATSERVER_TEST_NATS, or a
#                   private nats-server on a free port)
#   --only W        one workload only: direct100, fanout1000 or logins100
#
# During each cluster direct run, `chatbench presence` also times a login
# on the first node reaching a user on the second as a presence notice
# (100 logins, starting 3 s into the run): its p99 is printed too.
#
# CPU is counted over every process named chatserver, nats-server and
# postgres: run it on a machine where nothing else uses them.
set -euo pipefail

usage() { # usage STATUS: the comment above, as help
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "$1"
}
die() {
    echo "cluster-bench: $*" >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/../.." && pwd)
target="${CARGO_TARGET_DIR:-$repo/target}/release"
rounds=3
secs=10
nodes=3
only=""
server="$target/chatserver"
chatbench="$target/chatbench"
pg="${CHATSERVER_TEST_PG:-host=127.0.0.1 user=postgres}"
nats="${CHATSERVER_TEST_NATS:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds | --secs | --nodes | --server | --chatbench | --pg | --nats | --only)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --rounds) rounds=$2 ;;
                --secs) secs=$2 ;;
                --nodes) nodes=$2 ;;
                --server) server=$2 ;;
                --chatbench) chatbench=$2 ;;
                --pg) pg=$2 ;;
                --nats) nats=$2 ;;
                --only) only=$2 ;;
            esac
            shift 2
            ;;
        -h | --help) usage 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
for n in "$rounds" "$secs" "$nodes"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--rounds, --secs and --nodes take a positive whole number, not '$n'"
done
[ "$nodes" -ge 2 ] || die "--nodes must be 2 or more"
for bin in "$server" "$chatbench"; do
    [ -x "$bin" ] && [ -f "$bin" ] || die "$bin: not found; cargo build --release -p chatserver -p chatproto-benches"
done
command -v psql >/dev/null || die "psql is needed to create each round's database"

workloads=(direct100 fanout1000 logins100)
declare -A load=(
    [direct100]="direct --clients 100 --window 4 --text-bytes 64"
    [fanout1000]="fanout --clients 1000 --senders 1 --window 4 --text-bytes 64"
    [logins100]="logins --online 100 --workers 32"
)
declare -A cross=([direct100]="--cross-node" [fanout1000]="" [logins100]="")
# What each workload counts: its JSON rate and CPU fields, and their unit.
declare -A rate_field=([direct100]=deliveries_per_sec [fanout1000]=deliveries_per_sec
    [logins100]=logins_per_sec)
declare -A cpu_field=([direct100]=server_cpu_us_per_delivery
    [fanout1000]=server_cpu_us_per_delivery [logins100]=cpu_us_per_login)
declare -A unit=([direct100]=delivery [fanout1000]=delivery [logins100]=login)
if [ -n "$only" ]; then
    [ -n "${load[$only]:-}" ] || die "--only takes direct100, fanout1000 or logins100, not '$only'"
    workloads=("$only")
fi
# What `chatbench --spawn` lifts too: the per-connection rate limit, the
# output a fast sender may pile up, and the per-address limits (every
# client comes from one loopback address).
limits_off=(--no-rate-limit --max-output-bytes 268435456
    --max-connections-per-ip 0 --max-unauthenticated-percent 0
    --max-pending-checks-per-ip 0 --login-rate-per-ip 0 --login-rate-per-name 0)

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$chatbench" credentials 1000 >"$work/credentials.txt"

if [ -z "$nats" ]; then
    command -v nats-server >/dev/null || die "no --nats and no nats-server to start"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    nats-server -a 127.0.0.1 -p "$port" >"$work/nats.log" 2>&1 &
    pids+=($!)
    nats="nats://127.0.0.1:$port"
    sleep 0.5
fi

wait_for_line() { # wait_for_line FILE TEXT: up to 20 s
    for _ in $(seq 200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no '$2' in $1:" >&2
    tail -20 "$1" >&2
    return 1
}

# start_cluster ROUND: starts the nodes on a new database; sets `addrs`.
start_cluster() {
    local n log addr
    db="chatbench_cluster_$$_$1"
    psql "$pg" -qAtc "CREATE DATABASE $db" >/dev/null
    addrs=""
    for ((n = 0; n < nodes; n++)); do
        log="$work/node$n.log"
        "$server" --credentials "$work/credentials.txt" --listen 127.0.0.1:0 \
            --db "$pg dbname=$db" --nats "$nats" --cluster-name "bench$$r$1" \
            --node-name "n$n" "${limits_off[@]}" >"$log" 2>&1 &
        pids+=($!)
        node_pids+=($!)
        wait_for_line "$log" "connected to NATS"
        addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log" | head -1)
        addrs="${addrs:+$addrs,}$addr"
    done
}
stop_cluster() {
    for pid in "${node_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${node_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    node_pids=()
    psql "$pg" -qAtc "DROP DATABASE IF EXISTS $db" >/dev/null
}

field() { # field JSON NAME: a number field of a flat JSON line
    sed -n "s/.*\"$2\":\([-0-9.][-0-9.e]*\).*/\1/p" <<<"$1"
}
median() { # median VALUES...
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
        END { if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2];
              else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

declare -A rate cpu
labels=(alone cluster)
failed=0
node_pids=()
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= rounds; r++)); do
    for w in "${workloads[@]}"; do
        for ((i = 0; i < 2; i++)); do
            b=$(((i + r) % 2)) # which goes first turns each round
            if [ "$b" = 0 ]; then
                # shellcheck disable=SC2086 # the load's arguments split on purpose
                out=$("$chatbench" ${load[$w]} --secs "$secs" --spawn "$server" 2>&1) || true
            else
                start_cluster "$r"
                probe=""
                if [ "$w" = direct100 ]; then
                    (sleep 3 && "$chatbench" presence --count 100 --addr "$addrs" \
                        >"$work/presence.out" 2>&1) &
                    probe=$!
                fi
                # shellcheck disable=SC2086
                out=$("$chatbench" ${load[$w]} ${cross[$w]} --secs "$secs" --addr "$addrs" \
                    --cpu-of chatserver --cpu-of nats-server --cpu-of postgres 2>&1) || true
                if [ -n "$probe" ]; then
                    wait "$probe" || true
                    p=$(grep '^{' "$work/presence.out" | tail -1 || true)
                    if [ -n "$p" ]; then
                        p99=$(field "$p" p99_ms)
                        echo "round $r presence during direct100: p50 $(field "$p" p50_ms) ms, p99 $p99 ms"
                        presence_p99="${presence_p99:-} $p99"
                    else
                        echo "round $r presence: FAILED" >&2
                        tail -3 "$work/presence.out" >&2
                        failed=1
                    fi
                fi
                stop_cluster
            fi
            json=$(grep '^{' <<<"$out" | tail -1 || true)
            if [ -n "$json" ]; then
                d=$(field "$json" "${rate_field[$w]}")
                c=$(field "$json" "${cpu_field[$w]}")
                u=${unit[$w]}
                if [ "$u" = login ]; then
                    # Every login is waited for: nothing is lost, a failure
                    # ends the run without its JSON line.
                    printf 'round %d %-10s %-7s %10s logins/s      %6s µs CPU/login     p99 %s ms\n' \
                        "$r" "$w" "${labels[b]}" "$d" "${c:-n/a}" "$(field "$json" p99_ms)"
                else
                    lost=$(field "$json" lost)
                    printf 'round %d %-10s %-7s %10s deliveries/s  %6s µs CPU/delivery  lost %s\n' \
                        "$r" "$w" "${labels[b]}" "$d" "${c:-n/a}" "$lost"
                    [ "$lost" = 0 ] || failed=1
                fi
                rate[$w.$b]="${rate[$w.$b]:-} $d"
                [ -n "$c" ] && cpu[$w.$b]="${cpu[$w.$b]:-} $c"
            else
                echo "round $r $w ${labels[b]}: FAILED" >&2
                tail -5 <<<"$out" >&2
                failed=1
            fi
        done
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "${presence_p99:-}" ]; then
    # shellcheck disable=SC2086 # the list splits on purpose
    echo "presence propagation p99 during the cross-node direct load, median of rounds: $(median $presence_p99) ms"
fi

echo
printf '%-10s %14s %14s %9s %12s %12s %9s  %s\n' workload "alone /s" "cluster" "cl/alone" "alone µs CPU" "cluster" "cl/alone" "per"
for w in "${workloads[@]}"; do
    # shellcheck disable=SC2086 # the lists split on purpose
    ra=$(median ${rate[$w.0]:-}) rc=$(median ${rate[$w.1]:-})
    # shellcheck disable=SC2086
    ca=$(median ${cpu[$w.0]:-}) cc=$(median ${cpu[$w.1]:-})
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == 0 || b == "n/a") print "n/a"; else printf "%.2f", b / a }'; }
    printf '%-10s %14s %14s %9s %12s %12s %9s  %s\n' "$w" "$ra" "$rc" "$(ratio "$ra" "$rc")" "$ca" "$cc" "$(ratio "$ca" "$cc")" "${unit[$w]}"
done
exit "$failed"
