#!/usr/bin/env bash
# bench/callgrind.sh: instructions per request of one path, under callgrind (repeatable where
# wall-clock numbers on a shared machine are not).
#
#   bench/callgrind.sh get|post|replay|bare|bare-respond [BINARY]
#
# Starts the tiny backend (`burst backend`), then idem (or BINARY, another idem build; `bare`
# runs examples/pingora_bare.rs; `bare-respond` the same answering every request itself,
# BARE_RESPOND=1, the ceiling for a replay) under `valgrind --tool=callgrind`, drives it with wrk
# (-t1 -c8 -d${DURATION:-12}s: callgrind runs the program about 50 times slower), and prints
# the instructions per request (start-up included, about 4 M instructions, under 1 %) and
# the 25 functions with the most instructions of their own. The raw profile stays in
# target/callgrind.SCENARIO.out (callgrind_annotate or kcachegrind read it).
# Run `cargo build --release --example burst --example pingora_bare` first.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:?usage: bench/callgrind.sh get|post|replay|bare|bare-respond [BINARY]}
BIN=${2:-target/release/idem}
DURATION=${DURATION:-12}
BURST=target/release/examples/burst
TMP=$(mktemp -d /tmp/idem-callgrind.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

mapfile -t PORTS < <("$BURST" free-ports 3)
"$BURST" backend "127.0.0.1:${PORTS[0]}" &
PIDS+=($!)
OUT=target/callgrind.$SCENARIO.out
if [ "$SCENARIO" = bare ] || [ "$SCENARIO" = bare-respond ]; then
  [ "$SCENARIO" = bare-respond ] && export BARE_RESPOND=1
  valgrind --tool=callgrind --callgrind-out-file="$OUT" target/release/examples/pingora_bare \
    "127.0.0.1:${PORTS[1]}" "127.0.0.1:${PORTS[0]}" >/dev/null 2>"$TMP/valgrind.log" &
else
  cat >"$TMP/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:${PORTS[1]}"
threads = 2
[upstream]
backends = ["127.0.0.1:${PORTS[0]}"]
[metrics]
listen = "127.0.0.1:${PORTS[2]}"
EOF
  IDEM_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" "$BIN" --config "$TMP/proxy.toml" \
    >/dev/null 2>"$TMP/valgrind.log" &
fi
VG=$!
for _ in $(seq 1 300); do
  (exec 3<>"/dev/tcp/127.0.0.1/${PORTS[1]}") 2>/dev/null && break
  sleep 0.1
done
case $SCENARIO in
  get | bare | bare-respond) args=(-s bench/get.lua "http://127.0.0.1:${PORTS[1]}/") ;;
  post) args=(-s bench/post_fresh.lua "http://127.0.0.1:${PORTS[1]}/orders" -- "cg$RANDOM") ;;
  replay) args=(-s bench/post_replay.lua "http://127.0.0.1:${PORTS[1]}/orders") ;;
  *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
esac
result=$(wrk -t1 -c8 -d"${DURATION}"s "${args[@]}" | grep '^RESULT')
kill -INT "$VG" # idem and Pingora exit at once on SIGINT; callgrind then writes its file
# A few runs (3 in about 20) never exited after SIGINT under callgrind, spinning in Pingora's
# fast shutdown (BENCHMARKS.md; idem now exits on SIGINT itself, the bare example does not).
# Give up after a minute rather than hang.
for _ in $(seq 1 600); do
  kill -0 "$VG" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$VG" 2>/dev/null; then
  kill -KILL "$VG"
  echo "callgrind.sh: the program did not exit after SIGINT; no profile, run again" >&2
  exit 1
fi
wait "$VG" || true
requests=$(echo "$result" | sed 's/.*requests=\([0-9]*\).*/\1/')
total=$(grep -m1 'Collected' "$TMP/valgrind.log" | awk '{ gsub(",", "", $4); print $4 }')
echo "$SCENARIO: $requests requests, $total instructions, $((total / requests)) per request"
callgrind_annotate "$OUT" 2>/dev/null | sed -n '/^Ir /,$p' | sed -n '3,27p' | cut -c1-160
