"""A WebSocket client for idem's integration tests: connects to URL, sends each message of
MESSAGES_JSON in turn and reads its echo, then closes cleanly. Prints one JSON document:
{"sent": [...], "received": [...], "close_code": int}. Messages are
{"text": str} or {"binary_hex": str}, in both lists.
"""

import asyncio
import json
import sys

try:
    from websockets.asyncio.client import connect
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"missing Python module ({e}): run scripts/test-deps")


def encode(message):
    if isinstance(message, bytes):
        return {"binary_hex": message.hex()}
    return {"text": message}


async def main():
    url, specs = sys.argv[1], json.loads(sys.argv[2])
    messages = [bytes.fromhex(m["binary_hex"]) if "binary_hex" in m else m["text"] for m in specs]
    received = []
    # No proxy from the environment, no compression: what is sent is what crosses idem.
    async with connect(url, max_size=None, compression=None, proxy=None, open_timeout=20) as ws:
        for message in messages:
            await ws.send(message)
            received.append(encode(await asyncio.wait_for(ws.recv(), 20)))
        await ws.close()
        code = ws.close_code
    print(json.dumps({"sent": [encode(m) for m in messages], "received": received, "close_code": code}))


if __name__ == "__main__":
    asyncio.run(main())
