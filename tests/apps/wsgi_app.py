"""The WSGI test app, served by gunicorn and uWSGI in tests/it/app_servers.rs.

See README.md beside this file for the endpoints and the environment it reads.
"""

import json
import os
import time
from urllib.parse import parse_qs

EXEC_LOG = os.environ["APP_EXEC_LOG"]
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h.strip()]
POST_RESPONSE_SECONDS = int(os.environ.get("APP_POST_RESPONSE_MS", "2")) / 1000


def field(value):
    # One log line is split on spaces, so a value never contains one.
    return "".join(value.split()) or "-"


def record(method, target, key, host, status):
    line = f"{field(method)} {field(target)} {field(key)} {field(host)} {status} {os.getpid()}\n"
    # O_APPEND and one write() of a short line: lines from concurrent workers never interleave,
    # so the test counts executions exactly.
    fd = os.open(EXEC_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def host_allowed(host):
    if not ALLOWED_HOSTS:
        return True
    # Like Django's ALLOWED_HOSTS: the port does not take part.
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in ALLOWED_HOSTS


class Body:
    """The response body. Its close() runs after the server has sent the response, as
    Django's request_finished handlers (closing database connections) do: the server is
    busy a moment longer before it reads the next request or closes the connection."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        time.sleep(POST_RESPONSE_SECONDS)


def app(environ, start_response):
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    target = path + ("?" + query if query else "")
    key = environ.get("HTTP_IDEMPOTENCY_KEY", "")
    host = environ.get("HTTP_HOST", "")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    endpoint = path.rstrip("/").rsplit("/", 1)[-1]

    if not host_allowed(host):
        status = 400
    elif endpoint in ("healthz", "work", "slow"):
        status = 200
    else:
        status = 404
    # Recorded before the work, so an execution still running counts too.
    record(method, target, key, host, status)

    if status == 400:
        payload = {"error": "DisallowedHost", "host": host}
    elif status == 404:
        payload = {"error": "no such endpoint", "path": path}
    elif endpoint == "healthz":
        payload = {"ok": True}
    else:
        if endpoint == "slow":
            time.sleep(int(parse_qs(query).get("ms", ["1500"])[0]) / 1000)
        payload = {
            "method": method,
            "path": path,
            "query": query,
            "key": key,
            "body": body.decode("utf-8", "replace"),
            "pid": os.getpid(),
        }

    data = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    start_response(
        f"{status} {reason}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
    )
    return Body([data])
