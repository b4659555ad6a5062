"""A gRPC client for idem's integration tests: runs a list of calls on one channel and
prints one JSON document with what each call returned, for the Rust test to assert on.

  client.py TARGET CALLS_JSON

CALLS_JSON is a list of {"method": "Unary" | "ServerStream", "request": str,
"metadata": [[k, v], ...], "timeout": seconds | null, "cancel_after": int | null}.
`cancel_after` (ServerStream) cancels the call once that many messages have arrived.

Each result: {"code": "OK" | status name, "details": str | null, "initial_metadata":
[[k, v], ...], "trailing_metadata": [[k, v], ...], "responses": [str, ...]}. Binary
(`-bin`) metadata values are written as "hex:..." and messages as UTF-8.
"""

import json
import sys

try:
    import grpc
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"missing Python module ({e}): run scripts/test-deps")

SERVICE = "/idem.test.Echo/"


def pairs(md):
    out = []
    for k, v in md or ():
        if isinstance(v, bytes):
            v = "hex:" + v.hex()
        out.append([k, v])
    return out


def result(call, responses, code=None):
    return {
        "code": (code or call.code()).name,
        "details": call.details(),
        "initial_metadata": pairs(call.initial_metadata()),
        "trailing_metadata": pairs(call.trailing_metadata()),
        "responses": [r.decode("utf-8", "backslashreplace") for r in responses],
    }


def run(channel, spec):
    method = spec["method"]
    request = spec.get("request", "").encode()
    metadata = [tuple(p) for p in spec.get("metadata", [])]
    timeout = spec.get("timeout")
    if method == "Unary":
        stub = channel.unary_unary(
            SERVICE + method, request_serializer=None, response_deserializer=None
        )
        try:
            response, call = stub.with_call(request, metadata=metadata, timeout=timeout)
            return result(call, [response])
        except grpc.RpcError as call:
            return result(call, [])
    stub = channel.unary_stream(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )
    call = stub(request, metadata=metadata, timeout=timeout)
    responses = []
    cancel_after = spec.get("cancel_after")
    try:
        for message in call:
            responses.append(message)
            if cancel_after is not None and len(responses) >= cancel_after:
                call.cancel()
    except grpc.RpcError:
        pass
    return result(call, responses)


def main():
    target, calls = sys.argv[1], json.loads(sys.argv[2])
    with grpc.insecure_channel(target) as channel:
        results = [run(channel, spec) for spec in calls]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
