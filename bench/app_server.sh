#!/usr/bin/env bash
# bench/app_server.sh: idem and nginx in front of uWSGI --http-socket, the incident's app
# server, which closes every connection a few milliseconds after its response without
# announcing it (tests/apps/wsgi_app.py spends 2 ms after each response, as Django does).
#
#   bench/app_server.sh        # after `cargo build --release` and `scripts/test-deps`
#
# Starts on free loopback ports: uWSGI (--http-socket, 2 processes), nginx with its default
# upstream (a new connection per request), nginx with `keepalive 16` upstream, and idem
# (threads = 2) with a keyed route. Then, for each proxy, N back-to-back GETs and N
# back-to-back POSTs each with its own Idempotency-Key, from one keep-alive client (wrk -t1
# -c1, the incident's serial client), and the same with 8 connections. Reports requests per
# second and failures (non-2xx answers and socket errors) per row. N is bounded by time:
# DURATION seconds per row (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-5}
OUT=${OUT:-bench/app_server.md}
IDEM=$ROOT/target/release/idem
BURST=$ROOT/target/release/examples/burst
for tool in wrk nginx "$ROOT/.venv/bin/uwsgi" "$IDEM" "$BURST"; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (wrk, nginx; scripts/test-deps; cargo build --release --example burst)" >&2; exit 1; }
done

TMP=$(mktemp -d /tmp/idem-appbench.XXXXXX)
PIDS=()
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
trap stop_all EXIT
trap 'exit 130' INT TERM

mapfile -t PORTS < <("$BURST" free-ports 5)
APP=${PORTS[0]} NGX=${PORTS[1]} NGX_KA=${PORTS[2]} IDEM_PORT=${PORTS[3]} IDEM_METRICS=${PORTS[4]}

APP_EXEC_LOG=$TMP/exec.log "$ROOT/.venv/bin/uwsgi" --strict --master --processes 2 \
  --http-socket "127.0.0.1:$APP" --wsgi-file "$ROOT/tests/apps/wsgi_app.py" --callable app \
  --need-app --disable-logging >"$TMP/uwsgi.log" 2>&1 &
PIDS+=($!)

nginx_conf() { # name, upstream extra, location extra
  local user=""
  [ "$(id -u)" = 0 ] && user="user root;"
  mkdir -p "$TMP/$1"
  cat >"$TMP/$1/nginx.conf" <<EOF
$user
worker_processes 2;
daemon off;
pid $TMP/$1/nginx.pid;
error_log $TMP/$1/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $TMP/$1/body;
  proxy_temp_path $TMP/$1/proxy;
  upstream app { server 127.0.0.1:$APP; $2 }
  server { listen 127.0.0.1:$4; location / { proxy_pass http://app; $3 } }
}
EOF
  nginx -p "$TMP/$1" -c "$TMP/$1/nginx.conf" -e "$TMP/$1/error.log" &
  PIDS+=($!)
}
nginx_conf nginx "" "" "$NGX"
nginx_conf nginx-ka "keepalive 16;" "proxy_http_version 1.1; proxy_set_header Connection \"\";" "$NGX_KA"

cat >"$TMP/idem.toml" <<EOF
[server]
listen = "127.0.0.1:$IDEM_PORT"
threads = 2
[upstream]
backends = ["127.0.0.1:$APP"]
[metrics]
listen = "127.0.0.1:$IDEM_METRICS"
EOF
IDEM_LOG=warn "$IDEM" --config "$TMP/idem.toml" >"$TMP/idem.out" 2>"$TMP/idem.err" &
PIDS+=($!)
# uWSGI takes longer to start: 20 s each.
for p in "$APP" "$NGX" "$NGX_KA" "$IDEM_PORT"; do wait_port "$p" 400; done

# wrk's summary: requests/sec, and failures = non-2xx/3xx answers + socket errors.
run() { # url, script, connections
  local out
  out=$(wrk -t1 -c"$3" -d"${DURATION}s" -s "bench/$2" "$1" -- "$RANDOM$RANDOM" 2>&1)
  local rps non2xx errors
  rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx or 3xx responses/ {print $5}' <<<"$out")
  errors=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' <<<"$out")
  local total
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  echo "${rps:-0}|${total:-0}|$(( ${non2xx:-0} + ${errors:-0} ))"
}

{
  echo "# idem and nginx in front of uWSGI --http-socket"
  echo
  echo "$(date -u +%F) · $(nproc) cores · load $(cut -d' ' -f1-3 /proc/loadavg) · ${DURATION}s per row · uWSGI 2 processes, app 2 ms of work after each response"
  echo
  echo "| proxy | request | connections | req/s | requests | failed |"
  echo "| --- | --- | ---: | ---: | ---: | ---: |"
  for c in 1 8; do
    for row in "nginx (default upstream)|$NGX" "nginx (keepalive upstream)|$NGX_KA" "idem|$IDEM_PORT"; do
      name=${row%%|*} port=${row##*|}
      IFS='|' read -r rps total failed < <(run "http://127.0.0.1:$port/work" get.lua "$c")
      echo "| $name | GET | $c | $rps | $total | $failed |"
      IFS='|' read -r rps total failed < <(run "http://127.0.0.1:$port/work" post_fresh.lua "$c")
      echo "| $name | keyed POST | $c | $rps | $total | $failed |"
    done
  done
} | tee "$OUT"
