"""A gRPC server for idem's integration tests (tests/it/grpc.rs).

Raw-bytes methods on a generic handler, so no .proto or code generation is needed:

  /idem.test.Echo/Unary         reply b"echo:" + request + b"#N"
  /idem.test.Echo/ServerStream  reply b"K:" + request for K in 0..count

N is the execution number of that method in this process, so a replayed response (N of
the first execution) is told apart from a second execution (N + 1). Request metadata steers
each call:

  x-mode: fail        abort with INVALID_ARGUMENT, details "bad request #N"
  x-mode: sleep       sleep x-sleep-ms (default 10000) unless cancelled first
  x-count, x-interval-ms   ServerStream: messages and pause between them

Replies carry initial metadata `x-initial: <method>` and trailing metadata
`x-trailer: tN` and `x-trailer-bin: bytes([N, 0, 255])`.

Every execution appends lines to --log (one write per line, O_APPEND, so concurrent
handlers never interleave): `<method> start N <idempotency-key or ->`, then
`<method> done N` or `<method> cancelled N`. The Rust test counts the `start` lines.

Prints `listening PORT` once the server accepts connections. --port 0 picks a free port;
a given port is bound with SO_REUSEPORT (grpc's default), so the test may hold the port
bound (not listening) beforehand to keep it from other processes.
"""

import argparse
import os
import sys
import threading
import time
from concurrent import futures

try:
    import grpc
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"missing Python module ({e}): run scripts/test-deps")

SERVICE = "idem.test.Echo"


class Log:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lock = threading.Lock()
        self.counts = {}

    def start(self, method, key):
        with self.lock:
            n = self.counts.get(method, 0) + 1
            self.counts[method] = n
        self.line(f"{method} start {n} {key or '-'}")
        return n

    def line(self, text):
        os.write(self.fd, (text + "\n").encode())


def metadata(context):
    return {k: v for k, v in context.invocation_metadata()}


def trailers(n):
    return (("x-trailer", f"t{n}"), ("x-trailer-bin", bytes([n % 256, 0, 255])))


def wait_or_cancel(context, seconds):
    """Sleeps `seconds`; False if the call was cancelled (or its deadline passed) first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not context.is_active():
            return False
        time.sleep(0.01)
    return context.is_active()


def make_unary(log):
    def unary(request, context):
        md = metadata(context)
        n = log.start("Unary", md.get("idempotency-key"))
        context.send_initial_metadata((("x-initial", "Unary"),))
        mode = md.get("x-mode", "")
        if mode == "sleep":
            if not wait_or_cancel(context, int(md.get("x-sleep-ms", "10000")) / 1000):
                log.line(f"Unary cancelled {n}")
                return b""
        context.set_trailing_metadata(trailers(n))
        if mode == "fail":
            log.line(f"Unary done {n}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request #{n}")
        log.line(f"Unary done {n}")
        return b"echo:" + request + f"#{n}".encode()

    return unary


def make_stream(log):
    def server_stream(request, context):
        md = metadata(context)
        n = log.start("ServerStream", md.get("idempotency-key"))
        context.send_initial_metadata((("x-initial", "ServerStream"),))
        count = int(md.get("x-count", "3"))
        pause = int(md.get("x-interval-ms", "0")) / 1000
        for k in range(count):
            if k and pause and not wait_or_cancel(context, pause):
                log.line(f"ServerStream cancelled {n}")
                return
            if not context.is_active():
                log.line(f"ServerStream cancelled {n}")
                return
            yield f"{k}:".encode() + request
        context.set_trailing_metadata(trailers(n))
        log.line(f"ServerStream done {n}")

    return server_stream


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    log = Log(args.log)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                make_unary(log), request_deserializer=None, response_serializer=None
            ),
            "ServerStream": grpc.unary_stream_rpc_method_handler(
                make_stream(log), request_deserializer=None, response_serializer=None
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        sys.exit(f"cannot bind 127.0.0.1:{args.port}")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
