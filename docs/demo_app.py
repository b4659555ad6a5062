"""A stand-in app server for trying idem (README, "Quick start").

It prints every POST it executes, with a running count, and answers 201 with that count;
`?sleep=N` makes a call take N seconds (a slow call, to retry while it runs). Any other
method answers 200 "ok". Standard library only:

    python3 docs/demo_app.py                                   # 127.0.0.1:8000
    gunicorn --chdir docs --bind 127.0.0.1:8000 demo_app:app   # the same app under gunicorn
"""

import itertools
import json
import time
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

executions = itertools.count(1)


def app(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
        return [b"ok\n"]
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    time.sleep(float(parse_qs(environ.get("QUERY_STRING", "")).get("sleep", ["0"])[0]))
    n = next(executions)
    print(f"app: executed POST {environ['PATH_INFO']} #{n}: {body.decode()}", flush=True)
    answer = json.dumps({"created": n}).encode() + b"\n"
    start_response(
        "201 Created",
        [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))],
    )
    return [answer]


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


if __name__ == "__main__":
    print("app: listening on 127.0.0.1:8000", flush=True)
    make_server("127.0.0.1", 8000, app, Server, Quiet).serve_forever()
