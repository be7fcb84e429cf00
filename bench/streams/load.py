"""A load process: keep-alive connections that each submit a job and read it back, over and over.

    python -m bench.streams.load PORT SECONDS CONNECTIONS [API_KEY]  ->  {"requests": n, "errors": n, "seconds": s}

Bare asyncio sockets and a minimal HTTP/1.1 reader, so that the load costs far less CPU than the server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

BODY = b'{"type": "square_sum", "input": {"data": [1, 2, 3]}}'


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def connection(port: int, until: float, counts: list[int], auth: bytes) -> None:
    submit = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: bench\r\n%bcontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
    )
    submit %= (auth, len(BODY), BODY)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            writer.write(submit)
            status, body = await _answer(reader)
            if status != 202:
                counts[1] += 1
                continue
            job_id = json.loads(body)["id"]
            writer.write(b"GET /v1/jobs/%b HTTP/1.1\r\nHost: bench\r\n%b\r\n" % (job_id.encode(), auth))
            status, _ = await _answer(reader)
            counts[0] += 2 if status == 200 else 1
            counts[1] += status != 200
    finally:
        writer.close()


async def main(port: int, seconds: float, connections: int, api_key: str) -> None:
    auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
    counts = [0, 0]
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(*(connection(port, until, counts, auth) for _ in range(connections)))
    elapsed = time.monotonic() - started
    print(json.dumps({"requests": counts[0], "errors": counts[1], "seconds": elapsed}), flush=True)


if __name__ == "__main__":
    port, seconds, connections = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    api_key = sys.argv[4] if len(sys.argv) > 4 else ""
    try:
        import uvloop

        uvloop.run(main(port, seconds, connections, api_key))
    except ImportError:
        asyncio.run(main(port, seconds, connections, api_key))
