#!/usr/bin/env bash
# bench/kernel.sh: the kernel side of a request, counted exactly with `perf stat`: system
# calls (the raw_syscalls:sys_enter tracepoint, every call: recv, send, epoll_wait, futex...)
# and context switches, per request, of the proxy's processes only, while wrk drives
# GET, POST with fresh keys and POST replayed (wrk -t2 -c64, ${DURATION:-5} s each).
#
#   bench/kernel.sh [IDEM_BINARY...]     # default: target/release/idem
#
# Each binary runs with threads = 2 in front of nginx `return 200` (2 workers), beside nginx
# `proxy_pass` with `keepalive 64` as the reference (its workers counted). Needs perf (root,
# or perf_event_paranoid <= 1 and tracefs readable), wrk, nginx; run `cargo build --release
# --example burst` first (free ports). Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-5}
BINS=("$@")
[ ${#BINS[@]} = 0 ] && BINS=("$ROOT/target/release/idem")
BURST=$ROOT/target/release/examples/burst
for t in perf wrk nginx; do command -v $t >/dev/null || { echo "kernel.sh: $t is required" >&2; exit 1; }; done
TMP=$(mktemp -d /tmp/idem-kernel.XXXXXX)
PIDS=()
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
trap stop_all EXIT
mapfile -t PORTS < <("$BURST" free-ports $((2 + 2 * ${#BINS[@]})))
BACKEND_PORT=${PORTS[0]} NGINX_PORT=${PORTS[1]}
nginx_conf backend "server { listen 127.0.0.1:$BACKEND_PORT; location / { default_type text/plain; return 200 \"ok\\n\"; } }"
nginx -p "$TMP/backend" -c "$TMP/backend/nginx.conf" -e "$TMP/backend/error.log" &
PIDS+=($!)
nginx_conf proxy "upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
  server { listen 127.0.0.1:$NGINX_PORT; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx -p "$TMP/proxy" -c "$TMP/proxy/nginx.conf" -e "$TMP/proxy/error.log" &
NGINX_PID=$!
PIDS+=($NGINX_PID)
wait_port "$BACKEND_PORT"
wait_port "$NGINX_PORT"
declare -a TARGETS # "label|port|pids"
workers=$(cat /proc/"$NGINX_PID"/task/*/children | tr -s ' ' ',' | sed 's/,$//')
TARGETS+=("nginx proxy_pass|$NGINX_PORT|$workers")
i=2
for bin in "${BINS[@]}"; do
  port=${PORTS[$i]} metrics=${PORTS[$((i + 1))]}
  i=$((i + 2))
  cat >"$TMP/idem-$port.toml" <<EOC
[server]
listen = "127.0.0.1:$port"
threads = 2
[upstream]
backends = ["127.0.0.1:$BACKEND_PORT"]
[metrics]
listen = "127.0.0.1:$metrics"
EOC
  IDEM_LOG=warn "$bin" --config "$TMP/idem-$port.toml" >/dev/null 2>"$TMP/idem-$port.err" &
  PIDS+=($!)
  wait_port "$port"
  TARGETS+=("$bin|$port|$!")
done

echo "| proxy | path | req/s | syscalls / req | context switches / req |"
echo "| --- | --- | ---: | ---: | ---: |"
for t in "${TARGETS[@]}"; do
  IFS='|' read -r label port pids <<<"$t"
  for s in "GET|/|get.lua" "POST fresh key|/orders|post_fresh.lua" "POST replayed|/orders|post_replay.lua"; do
    IFS='|' read -r name path script <<<"$s"
    [[ $label == nginx* && $name == "POST replayed" ]] && continue
    nonce="k$RANDOM$RANDOM"
    wrk -t2 -c64 -d1s -s "bench/$script" "http://127.0.0.1:$port$path" -- "warm-$nonce" >/dev/null
    perf stat -x, -o "$TMP/perf.csv" -e raw_syscalls:sys_enter,context-switches -p "$pids" -- \
      wrk -t2 -c64 -d"${DURATION}"s -s "bench/$script" "http://127.0.0.1:$port$path" -- "$nonce" >"$TMP/wrk.out"
    reqs=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' "$TMP/wrk.out")
    rps=$(sed -n 's/^RESULT rps=\([0-9]*\).*/\1/p' "$TMP/wrk.out")
    sys=$(awk -F, '/raw_syscalls:sys_enter/ { print $1 }' "$TMP/perf.csv")
    cs=$(awk -F, '/context-switches/ { print $1 }' "$TMP/perf.csv")
    per() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
    echo "| $label | $name | $rps | $(per "$sys" "$reqs") | $(per "$cs" "$reqs") |"
  done
done
