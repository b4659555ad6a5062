"""A WebSocket echo server for idem's integration tests (tests/it/protocols.rs).

Echoes every message back unchanged, text as text and binary as binary. Prints
`listening PORT` once it accepts connections (port 0: the kernel picks it). Each
handshake's request path and `Upgrade` header go to stderr, for failure messages.
"""

import asyncio
import sys

try:
    from websockets.asyncio.server import serve
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"missing Python module ({e}): run scripts/test-deps")


async def echo(ws):
    req = ws.request
    print(f"handshake {req.path} upgrade={req.headers.get('Upgrade')}", file=sys.stderr, flush=True)
    async for message in ws:
        await ws.send(message)


async def main():
    # No size limit: the tests send one large message on purpose.
    async with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
