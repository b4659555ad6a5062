"""The ASGI test app, served by uvicorn in tests/it/app_servers.rs: the endpoints and the
execution log of wsgi_app.py. See README.md beside this file."""

import asyncio
import json
import os
from urllib.parse import parse_qs

EXEC_LOG = os.environ["APP_EXEC_LOG"]
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h.strip()]
POST_RESPONSE_SECONDS = int(os.environ.get("APP_POST_RESPONSE_MS", "2")) / 1000


def field(value):
    # One log line is split on spaces, so a value never contains one.
    return "".join(value.split()) or "-"


def record(method, target, key, host, status):
    line = f"{field(method)} {field(target)} {field(key)} {field(host)} {status} {os.getpid()}\n"
    # O_APPEND and one write() of a short line: lines from concurrent workers never interleave.
    fd = os.open(EXEC_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def host_allowed(host):
    if not ALLOWED_HOSTS:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in ALLOWED_HOSTS


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return

    method = scope["method"]
    path = scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + ("?" + query if query else "")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    key = headers.get("idempotency-key", "")
    host = headers.get("host", "")
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
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
            await asyncio.sleep(int(parse_qs(query).get("ms", ["1500"])[0]) / 1000)
        payload = {
            "method": method,
            "path": path,
            "query": query,
            "key": key,
            "body": body.decode("utf-8", "replace"),
            "pid": os.getpid(),
        }

    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
    # Work after the response, as Django's request_finished handlers do.
    await asyncio.sleep(POST_RESPONSE_SECONDS)
