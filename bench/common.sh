# bench/common.sh: helpers the bench scripts share (sourced; they set TMP and PIDS first,
# then `trap stop_all EXIT`).

# Stops every process in PIDS and removes TMP. SIGINT: a fast exit for all of them (on
# SIGTERM the bare Pingora proxy would drain for Pingora's default grace period, five
# minutes).
stop_all() {
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}

# Waits until something accepts on 127.0.0.1:$1, polling every 50 ms $2 times (default 200:
# 10 s); the bench exits otherwise.
wait_port() {
  for _ in $(seq 1 "${2:-200}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench: nothing listens on port $1" >&2
  exit 1
}

# Writes $TMP/$1/nginx.conf: a foreground nginx with 2 workers, no access log, its temp
# paths under $TMP/$1, and $2 inside `http { }`.
nginx_conf() { # name, http block content
  local user=""
  [ "$(id -u)" = 0 ] && user="user root;"
  mkdir -p "$TMP/$1"
  cat >"$TMP/$1/nginx.conf" <<EOC
$user
worker_processes 2;
daemon off;
pid $TMP/$1/nginx.pid;
error_log $TMP/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $TMP/$1/body;
  proxy_temp_path $TMP/$1/proxy;
  fastcgi_temp_path $TMP/$1/fastcgi;
  uwsgi_temp_path $TMP/$1/uwsgi;
  scgi_temp_path $TMP/$1/scgi;
  $2
}
EOC
}
