#!/usr/bin/env bash
# bench/run.sh: idem against nginx on loopback, side by side, in one run.
#
#   bench/run.sh                      # from anywhere; about 9 minutes with the defaults, plus the release build
#
# Builds the release binary (`cargo build --release`) and the helper `examples/burst.rs`, then:
#   1. starts, from configs generated in a temp dir, on free loopback ports:
#      - the backend: nginx `return 200 "ok\n"` (2 workers) when nginx is installed, else
#        `burst backend` (a tiny tokio backend from this repo);
#      - the peer: nginx `proxy_pass` to the backend through an upstream with `keepalive 64`
#        (2 workers), when nginx is installed;
#      - idem (threads = 2) in front of the backend, access log off (IDEM_LOG=warn), and a
#        second idem with the access log on (text, info level, to a file);
#      - a bare Pingora proxy (`examples/pingora_bare.rs`, same threads, runtime, allocator
#        and buffers as idem, no logic): the ceiling of a Pingora-based proxy here; and the
#        same answering every request itself (BARE_RESPOND=1): the ceiling of a replay;
#      - when redis-server is installed: a private redis-server (no persistence) and a third
#        idem with `[store] kind = "redis"`;
#   2. runs wrk (-t$THREADS -c$CONNECTIONS -d$DURATION) against each scenario, one after the
#      other, ROUNDS times, alternating nginx and idem (A B A B), the order reversed every
#      other round; each measurement follows a 1 s warm-up; reports the median of the rounds:
#        backend        GET  the backend alone
#        nginx GET      GET  through nginx proxy_pass
#        pingora GET    GET  through the bare Pingora proxy (reference)
#        pingora respond POST answered by bare Pingora itself, body read (replay ceiling)
#        idem GET       GET  through idem (pass-through, streamed)
#        idem GET+log   GET  through idem with its access log on
#        nginx POST     POST through nginx proxy_pass (the body and key headers of idem POST)
#        idem POST      POST with a fresh Idempotency-Key per request (every request a leader)
#        idem replay    POST with one key and body (every request after the first a replay)
#        idem POST redis, idem replay redis: the same with the Redis store (when installed)
#        nginx TLS GET, idem TLS GET   GET over TLS on kept-alive connections (nginx
#                       `listen ssl` and an idem with `[server.tls]`, the same ECDSA P-256
#                       certificate made with openssl; when nginx and openssl are installed)
#        nginx TLS new, idem TLS new   GET with `Connection: close`: one full handshake per
#                       request (req/s = handshakes/s)
#   3. the coalescing burst (`burst coalesce`): BURST_N identical concurrent keyless POSTs
#      against a gated backend: backend executions, peak RSS, memory per waiter;
#   4. the stored-entry cost (`burst entries`): RSS slope per stored entry minus its accounted
#      (serialized) size.
# Prints a markdown table and writes it to $OUT. Every process it starts is stopped on exit.
#
# Environment: DURATION=10 (s per measurement), ROUNDS=3, CONNECTIONS=64, THREADS=2 (wrk),
#   BURST_N=10000, ENTRIES_M=100000, SKIP_BUILD=1 (use the binaries already built),
#   SKIP_BURST=1, SKIP_WRK=1, OUT=bench/results.md,
#   BASELINE=path/to/another/idem: also measure that binary (rows "base GET", "base POST",
#   "base replay", same config) for a before/after comparison in the same run.
# Quick check: DURATION=2 ROUNDS=1 BURST_N=1000 ENTRIES_M=10000 bench/run.sh
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
BURST_N=${BURST_N:-10000}
ENTRIES_M=${ENTRIES_M:-100000}
OUT=${OUT:-bench/results.md}

command -v wrk >/dev/null || { echo "bench: wrk is required (apt-get install wrk)" >&2; exit 1; }
HAVE_NGINX=0
command -v nginx >/dev/null && HAVE_NGINX=1

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "bench: cargo build --release" >&2
  cargo build --release --quiet
  cargo build --release --quiet --example burst --example pingora_bare
fi
IDEM=$ROOT/target/release/idem
BURST=$ROOT/target/release/examples/burst
BARE=$ROOT/target/release/examples/pingora_bare
HAVE_REDIS=0
command -v redis-server >/dev/null && HAVE_REDIS=1

TMP=$(mktemp -d /tmp/idem-bench.XXXXXX)
PIDS=()
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
trap stop_all EXIT
trap 'exit 130' INT TERM

# Allow many connections for the burst (as far as the hard limit goes).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

mapfile -t PORTS < <("$BURST" free-ports 17)
BACKEND_PORT=${PORTS[0]} NGINX_PORT=${PORTS[1]}
IDEM_PORT=${PORTS[2]} IDEM_METRICS=${PORTS[3]} IDEM_LOG_PORT=${PORTS[4]} IDEM_LOG_METRICS=${PORTS[5]}
BARE_PORT=${PORTS[6]} REDIS_PORT=${PORTS[7]} IDEM_REDIS_PORT=${PORTS[8]} IDEM_REDIS_METRICS=${PORTS[9]}
BASE_PORT=${PORTS[10]} BASE_METRICS=${PORTS[11]} BARE_RESPOND_PORT=${PORTS[12]}
NGINX_TLS_PORT=${PORTS[13]} IDEM_TLS_PORT=${PORTS[14]} IDEM_TLS_PLAIN=${PORTS[15]} IDEM_TLS_METRICS=${PORTS[16]}
HAVE_TLS=0
if [ "$HAVE_NGINX" = 1 ] && command -v openssl >/dev/null; then
  HAVE_TLS=1
  mkdir -p "$TMP/tls"
  (
    cd "$TMP/tls"
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 -days 2 -subj "/CN=idem bench CA" "${ec[@]}" -keyout ca.key -out ca.pem
    openssl req -subj /CN=localhost "${ec[@]}" -keyout leaf.key -out leaf.csr
    echo "subjectAltName=IP:127.0.0.1,DNS:localhost" >leaf.ext
    openssl x509 -req -days 2 -in leaf.csr -CA ca.pem -CAkey ca.key -set_serial 1 -extfile leaf.ext -out leaf.pem
    cat leaf.pem ca.pem >chain.pem
  ) >/dev/null 2>&1
fi

if [ "$HAVE_TLS" = 1 ]; then
  # nginx's defaults for an HTTPS site: TLS 1.2 and 1.3, session tickets on, no shared cache.
  TLS_SERVER="server { listen 127.0.0.1:$NGINX_TLS_PORT ssl; ssl_certificate $TMP/tls/chain.pem; ssl_certificate_key $TMP/tls/leaf.key; ssl_protocols TLSv1.2 TLSv1.3; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
fi
if [ "$HAVE_NGINX" = 1 ]; then
  nginx_conf backend "server { listen 127.0.0.1:$BACKEND_PORT; location / { default_type text/plain; return 200 \"ok\\n\"; } }"
  nginx -p "$TMP/backend" -c "$TMP/backend/nginx.conf" -e "$TMP/backend/error.log" &
  PIDS+=($!)
  nginx_conf proxy "upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
  server { listen 127.0.0.1:$NGINX_PORT; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }
  ${TLS_SERVER:-}"
  nginx -p "$TMP/proxy" -c "$TMP/proxy/nginx.conf" -e "$TMP/proxy/error.log" &
  PIDS+=($!)
  NGINX_PROXY_PID=$!
  BACKEND_KIND="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') return 200, 2 workers"
else
  "$BURST" backend "127.0.0.1:$BACKEND_PORT" &
  PIDS+=($!)
  BACKEND_KIND="examples/burst.rs backend (nginx not installed)"
fi
wait_port "$BACKEND_PORT"

idem_conf() { # file, port, metrics port, [extra toml]
  cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
threads = 2
[upstream]
backends = ["127.0.0.1:$BACKEND_PORT"]
[metrics]
listen = "127.0.0.1:$3"
${4:-}
EOF
}
idem_conf "$TMP/idem.toml" "$IDEM_PORT" "$IDEM_METRICS"
IDEM_LOG=warn "$IDEM" --config "$TMP/idem.toml" >"$TMP/idem.out" 2>"$TMP/idem.err" &
PIDS+=($!)
declare -A PROC
PROC[idem]=$!
idem_conf "$TMP/idem-log.toml" "$IDEM_LOG_PORT" "$IDEM_LOG_METRICS"
IDEM_LOG=info "$IDEM" --config "$TMP/idem-log.toml" >"$TMP/idem-log.out" 2>"$TMP/idem-access.log" &
PIDS+=($!)
PROC[idem-log]=$!
"$BARE" "127.0.0.1:$BARE_PORT" "127.0.0.1:$BACKEND_PORT" >/dev/null 2>"$TMP/bare.err" &
PIDS+=($!)
PROC[bare]=$!
BARE_RESPOND=1 "$BARE" "127.0.0.1:$BARE_RESPOND_PORT" "127.0.0.1:$BACKEND_PORT" >/dev/null 2>"$TMP/bare-respond.err" &
PIDS+=($!)
PROC[bare-respond]=$!
if [ "$HAVE_REDIS" = 1 ]; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --maxmemory-policy noeviction --dir "$TMP" >"$TMP/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$REDIS_PORT"
  idem_conf "$TMP/idem-redis.toml" "$IDEM_REDIS_PORT" "$IDEM_REDIS_METRICS" \
    "[store]
kind = \"redis\"
url = \"redis://127.0.0.1:$REDIS_PORT\"
[dedup]
secret = \"benchmark secret, not a real one\""
  IDEM_LOG=warn "$IDEM" --config "$TMP/idem-redis.toml" >"$TMP/idem-redis.out" 2>"$TMP/idem-redis.err" &
  PIDS+=($!)
  PROC[idem-redis]=$!
  wait_port "$IDEM_REDIS_PORT"
fi
if [ "$HAVE_TLS" = 1 ]; then
  idem_conf "$TMP/idem-tls.toml" "$IDEM_TLS_PLAIN" "$IDEM_TLS_METRICS" \
    "[server.tls]
listen = \"127.0.0.1:$IDEM_TLS_PORT\"
cert = \"$TMP/tls/chain.pem\"
key = \"$TMP/tls/leaf.key\""
  IDEM_LOG=warn "$IDEM" --config "$TMP/idem-tls.toml" >"$TMP/idem-tls.out" 2>"$TMP/idem-tls.err" &
  PIDS+=($!)
  PROC[idem-tls]=$!
  wait_port "$IDEM_TLS_PORT"
fi
if [ -n "${BASELINE:-}" ]; then
  idem_conf "$TMP/idem-base.toml" "$BASE_PORT" "$BASE_METRICS"
  IDEM_LOG=warn "$BASELINE" --config "$TMP/idem-base.toml" >"$TMP/idem-base.out" 2>"$TMP/idem-base.err" &
  PIDS+=($!)
  PROC[base]=$!
  wait_port "$BASE_PORT"
fi
wait_port "$IDEM_PORT"
wait_port "$IDEM_LOG_PORT"
wait_port "$BARE_PORT"
wait_port "$BARE_RESPOND_PORT"
[ "$HAVE_NGINX" = 1 ] && wait_port "$NGINX_PORT"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# name|url|script ; the nginx rows are skipped without nginx.
SCENARIOS=(
  "backend|http://127.0.0.1:$BACKEND_PORT/|get.lua"
  "nginx GET|http://127.0.0.1:$NGINX_PORT/|get.lua"
  "pingora GET|http://127.0.0.1:$BARE_PORT/|get.lua"
  "idem GET|http://127.0.0.1:$IDEM_PORT/|get.lua"
  "idem GET+log|http://127.0.0.1:$IDEM_LOG_PORT/|get.lua"
  "nginx POST|http://127.0.0.1:$NGINX_PORT/orders|post_fresh.lua"
  "pingora respond|http://127.0.0.1:$BARE_RESPOND_PORT/orders|post_replay.lua"
  "idem POST|http://127.0.0.1:$IDEM_PORT/orders|post_fresh.lua"
  "idem replay|http://127.0.0.1:$IDEM_PORT/orders|post_replay.lua"
)
if [ -n "${BASELINE:-}" ]; then
  SCENARIOS+=(
    "base GET|http://127.0.0.1:$BASE_PORT/|get.lua"
    "base POST|http://127.0.0.1:$BASE_PORT/orders|post_fresh.lua"
    "base replay|http://127.0.0.1:$BASE_PORT/orders|post_replay.lua"
  )
fi
if [ "$HAVE_TLS" = 1 ]; then
  SCENARIOS+=(
    "nginx TLS GET|https://127.0.0.1:$NGINX_TLS_PORT/|get.lua"
    "idem TLS GET|https://127.0.0.1:$IDEM_TLS_PORT/|get.lua"
    "nginx TLS new|https://127.0.0.1:$NGINX_TLS_PORT/|get_close.lua"
    "idem TLS new|https://127.0.0.1:$IDEM_TLS_PORT/|get_close.lua"
  )
fi
if [ "$HAVE_REDIS" = 1 ]; then
  SCENARIOS+=(
    "idem POST redis|http://127.0.0.1:$IDEM_REDIS_PORT/orders|post_fresh.lua"
    "idem replay redis|http://127.0.0.1:$IDEM_REDIS_PORT/orders|post_replay.lua"
  )
fi

# The processes that serve a scenario (nginx: its worker processes), for the kernel-side
# counts: context switches (voluntary and not, every thread) and read/write system calls
# (`/proc/PID/io` syscr + syscw: reads, writes, recvs, sends; not epoll_wait).
procs_of() { # scenario name
  case $1 in
    "nginx"*) [ -n "${NGINX_PROXY_PID:-}" ] && cat "/proc/$NGINX_PROXY_PID/task/"*/children 2>/dev/null | tr -s " " "\n" | grep . ;;
    "pingora GET") echo "${PROC[bare]}" ;;
    "pingora respond") echo "${PROC[bare-respond]}" ;;
    "idem GET+log") echo "${PROC[idem-log]}" ;;
    *redis) echo "${PROC[idem-redis]:-}" ;;
    "idem TLS"*) echo "${PROC[idem-tls]:-}" ;;
    "base "*) echo "${PROC[base]:-}" ;;
    "idem "*) echo "${PROC[idem]}" ;;
  esac
}
kernel_counts() { # pids... -> "context_switches rw_syscalls"
  local cs=0 sys=0 pid f
  for pid in "$@"; do
    for f in /proc/"$pid"/task/*/status; do
      cs=$((cs + $(awk '/ctxt_switches/ { n += $2 } END { print n + 0 }' "$f" 2>/dev/null || echo 0)))
    done
    sys=$((sys + $(awk '/^sysc[rw]:/ { n += $2 } END { print n + 0 }' "/proc/$pid/io" 2>/dev/null || echo 0)))
  done
  echo "$cs $sys"
}

run_wrk() { # duration url script nonce
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$1"s -s "bench/$3" "$2" -- "$4" | grep '^RESULT' || true
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"
if [ -z "${SKIP_WRK:-}" ]; then
  for round in $(seq 1 "$ROUNDS"); do
    order=("${SCENARIOS[@]}")
    if [ $((round % 2)) = 0 ]; then
      order=()
      for ((i = ${#SCENARIOS[@]} - 1; i >= 0; i--)); do order+=("${SCENARIOS[$i]}"); done
    fi
    for s in "${order[@]}"; do
      IFS='|' read -r name url script <<<"$s"
      if [ "$HAVE_NGINX" = 0 ] && [[ $name == nginx* ]]; then continue; fi
      nonce="r$round-$RANDOM$RANDOM"
      run_wrk 1 "$url" "$script" "warm-$nonce" >/dev/null
      mapfile -t procs < <(procs_of "$name")
      read -r cs0 sys0 < <(kernel_counts "${procs[@]}")
      line=$(run_wrk "$DURATION" "$url" "$script" "$nonce")
      read -r cs1 sys1 < <(kernel_counts "${procs[@]}")
      reqs=$(echo "$line" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
      if [ ${#procs[@]} -gt 0 ] && [ -n "$reqs" ] && [ "$reqs" -gt 0 ]; then
        line="$line cs_per_req_x100=$(((cs1 - cs0) * 100 / reqs)) sys_per_req_x100=$(((sys1 - sys0) * 100 / reqs))"
      fi
      echo "bench: round $round: $name: ${line#RESULT }" >&2
      # shellcheck disable=SC2001
      printf '%s\t%s\t%s\n' "$name" "$round" "$(echo "$line" | sed 's/RESULT //')" >>"$RESULTS"
    done
  done
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# median NAME FIELD: median over rounds of FIELD (rps, p50_us, p99_us, non2xx, errors).
median() {
  awk -F'\t' -v n="$1" -v f="$2" '$1 == n {
      split($3, kv, " "); for (i in kv) { split(kv[i], p, "="); if (p[1] == f) print p[2] } }' "$RESULTS" |
    sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { # a b -> a/b with 2 decimals, or -
  if [ -n "$1" ] && [ -n "$2" ] && [ "$2" != 0 ]; then awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; else echo "-"; fi
}
hundredths() { if [ -n "$1" ]; then awk -v v="$1" 'BEGIN { printf "%.2f", v / 100 }'; else echo "-"; fi; }
ms() { if [ -n "$1" ]; then awk -v u="$1" 'BEGIN { printf "%.2f", u / 1000 }'; else echo "-"; fi; }

BURST_OUT=$TMP/burst.txt
ENTRIES_OUT=$TMP/entries.txt
: >"$BURST_OUT"
: >"$ENTRIES_OUT"
if [ -z "${SKIP_BURST:-}" ]; then
  echo "bench: coalescing burst, N=$BURST_N" >&2
  "$BURST" coalesce "$IDEM" "$BURST_N" >"$BURST_OUT" || echo "bench: burst failed" >&2
  echo "bench: stored-entry cost, M=$ENTRIES_M" >&2
  "$BURST" entries "$IDEM" "$ENTRIES_M" >"$ENTRIES_OUT" || echo "bench: entries failed" >&2
fi
kv() { grep -m1 "^$2=" "$1" 2>/dev/null | cut -d= -f2 || true; }
kib() { if [ -n "$1" ]; then awk -v b="$1" 'BEGIN { printf "%.0f", b / 1024 }'; else echo "-"; fi; }
mib() { if [ -n "$1" ]; then awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; else echo "-"; fi; }

{
  echo "## Results ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+changes'))"
  echo
  echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r)."
  echo "Load average (1/5/15 min) at start: $LOAD_START; at end: $LOAD_END."
  echo "wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds alternated (order reversed every other round), medians."
  echo "Backend: $BACKEND_KIND. idem: threads = 2, access log off (IDEM_LOG=warn) except on the GET+log row (text, to a file)."
  [ "$HAVE_REDIS" = 1 ] && echo "Redis rows: $(redis-server --version | cut -d' ' -f1-3), local, no persistence."
  [ -n "${BASELINE:-}" ] && echo "base rows: $BASELINE, same configuration."
  echo
  echo "| scenario | req/s | p50 ms | p99 ms | vs nginx (req/s) | vs nginx (p99) | ctx switches / req | r/w syscalls / req | non-2xx | errors |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  ng_get=$(median "nginx GET" rps); ng_get99=$(median "nginx GET" p99_us)
  ng_post=$(median "nginx POST" rps); ng_post99=$(median "nginx POST" p99_us)
  ng_tls=$(median "nginx TLS GET" rps); ng_tls99=$(median "nginx TLS GET" p99_us)
  ng_new=$(median "nginx TLS new" rps); ng_new99=$(median "nginx TLS new" p99_us)
  for name in "backend" "nginx GET" "pingora GET" "idem GET" "idem GET+log" "nginx POST" "pingora respond" "idem POST" "idem replay" "idem POST redis" "idem replay redis" "base GET" "base POST" "base replay" "nginx TLS GET" "idem TLS GET" "nginx TLS new" "idem TLS new"; do
    rps=$(median "$name" rps)
    [ -z "$rps" ] && continue
    case $name in
      "pingora GET" | "idem GET" | "idem GET+log" | "base GET") vs=$(ratio "$rps" "$ng_get") vs99=$(ratio "$(median "$name" p99_us)" "$ng_get99") ;;
      "idem POST"* | "idem replay"* | "base POST" | "base replay" | "pingora respond") vs=$(ratio "$rps" "$ng_post") vs99=$(ratio "$(median "$name" p99_us)" "$ng_post99") ;;
      "idem TLS GET") vs=$(ratio "$rps" "$ng_tls") vs99=$(ratio "$(median "$name" p99_us)" "$ng_tls99") ;;
      "idem TLS new") vs=$(ratio "$rps" "$ng_new") vs99=$(ratio "$(median "$name" p99_us)" "$ng_new99") ;;
      *) vs="" vs99="" ;;
    esac
    echo "| $name | $rps | $(ms "$(median "$name" p50_us)") | $(ms "$(median "$name" p99_us)") | ${vs:+${vs}x} | ${vs99:+${vs99}x} | $(hundredths "$(median "$name" cs_per_req_x100)") | $(hundredths "$(median "$name" sys_per_req_x100)") | $(median "$name" non2xx) | $(median "$name" errors) |"
  done
  [ "$HAVE_REDIS" = 1 ] || echo "| idem redis | not available (redis-server not installed) | | | | | | |"
  echo
  echo "Kernel side, per request, of the serving processes only (nginx: its proxy's workers; the backend and wrk not counted): context switches (voluntary + involuntary, all threads) and read/write system calls (\`/proc/PID/io\` syscr + syscw; epoll_wait and the like are not counted)."
  echo "Ratios: req/s of idem / req/s of nginx (GET rows against nginx GET, POST rows against nginx POST, TLS rows against the same nginx TLS row); p99 of idem / p99 of nginx (lower is better)."
  [ "$HAVE_TLS" = 1 ] && echo "TLS rows: one ECDSA P-256 certificate (leaf and CA in the chain) for both servers; \"new\" rows close the connection after every response (one full handshake per request)."
  if [ -s "$BURST_OUT" ]; then
    n=$(kv "$BURST_OUT" n)
    m=$(kv "$BURST_OUT" m)
    echo
    echo "| coalescing burst | value |"
    echo "| --- | ---: |"
    echo "| identical concurrent requests (N) | $n |"
    echo "| waiters seen by idem (\`idem_waiters\`) | $(kv "$BURST_OUT" waiters) |"
    echo "| backend executions | $(kv "$BURST_OUT" backend_executions) |"
    echo "| answers 200 / other | $(kv "$BURST_OUT" answers_200) / $(kv "$BURST_OUT" answers_other) |"
    echo "| idem RSS idle / with N waiters / peak | $(mib "$(kv "$BURST_OUT" rss_idle)") / $(mib "$(kv "$BURST_OUT" rss_waiters)") / $(mib "$(kv "$BURST_OUT" rss_peak_waiters)") MiB |"
    echo "| per waiting request (RSS with N waiters - idle) / N | $(kib "$(kv "$BURST_OUT" bytes_per_waiting_request)") KiB |"
    echo "| per parked pass-through request, M = $m (RSS - idle) / M | $(kib "$(kv "$BURST_OUT" bytes_per_parked_passthrough)") KiB |"
    echo "| **memory per waiter** (difference of the two) | **$(kv "$BURST_OUT" bytes_per_waiter) bytes** |"
  fi
  if [ -s "$ENTRIES_OUT" ]; then
    echo
    echo "| stored entries | value |"
    echo "| --- | ---: |"
    echo "| entries stored | $(kv "$ENTRIES_OUT" entries) |"
    echo "| accounted size per entry (status + headers + body, \`idem_store_bytes\` / entries) | $(kv "$ENTRIES_OUT" accounted_bytes_per_entry) bytes |"
    echo "| RSS per entry (slope from M/4 to M) | $(kv "$ENTRIES_OUT" rss_bytes_per_entry) bytes |"
    echo "| **overhead per entry** (RSS per entry - accounted size) | **$(kv "$ENTRIES_OUT" overhead_bytes_per_entry) bytes** |"
  fi
} >"$TMP/table.md"

cat "$TMP/table.md"
cp "$TMP/table.md" "$OUT"
echo "bench: wrote $OUT" >&2
