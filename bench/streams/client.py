"""A process that holds many event streams open and notes when each numbered event reaches each of them.

Driven over stdin/stdout by the benchmark, one JSON object per line:
  {"open": {"port": P, "paths": [...], "concurrency": C}}  -> {"opened": n, "failed": n} once every stream got
                                                               its first event (so the server finished setting it up)
  {"report": true}   -> {"delivered": {"<marker>": [monotonic times]}, "ended": n}
  {"count": true}    -> {"delivered": {"<marker>": n}, "ended": n}: the same, without the times (cheap to poll)
  {"close": true}    -> closes every stream and exits
Events carry a marker `#<n>#` in their data; times are time.monotonic(), which is system-wide on Linux, so the
benchmark can compare them with the time it published each event.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import defaultdict
from typing import Any

MARKER = re.compile(rb"#(\d+)#")


class Streams:
    def __init__(self) -> None:
        self.delivered: dict[int, list[float]] = defaultdict(list)
        self.ended = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def open_one(self, port: int, path: str, ready: asyncio.Event, opened: list[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writers.append(writer)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:200].decode(errors="replace"))
        await reader.readuntil(b"\n\n")  # the first event: the server has set the stream up
        opened[0] += 1
        ready.set()
        task = asyncio.create_task(self.read(reader))
        self.tasks.add(task)

    async def read(self, reader: asyncio.StreamReader) -> None:
        seen: set[int] = set()
        tail = b""
        while chunk := await reader.read(65536):
            now = time.monotonic()
            for match in MARKER.finditer(tail + chunk):
                marker = int(match.group(1))
                if marker not in seen:
                    seen.add(marker)
                    self.delivered[marker].append(now)
            tail = chunk[-24:]
        self.ended += 1

    async def open(self, port: int, paths: list[str], concurrency: int) -> dict[str, int]:
        limit = asyncio.Semaphore(concurrency)
        opened, failed = [0], [0]
        ready = asyncio.Event()

        async def one(path: str) -> None:
            async with limit:
                try:
                    await asyncio.wait_for(self.open_one(port, path, ready, opened), 60)
                except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    failed[0] += 1
                    print(f"open {path}: {exc!r}", file=sys.stderr)

        await asyncio.gather(*(one(path) for path in paths))
        return {"opened": opened[0], "failed": failed[0]}


async def main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=2**26)  # an `open` command lists thousands of paths
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    streams = Streams()
    while line := await stdin.readline():
        command: dict[str, Any] = json.loads(line)
        if "open" in command:
            spec = command["open"]
            reply: dict[str, Any] = await streams.open(spec["port"], spec["paths"], spec.get("concurrency", 64))
        elif "report" in command:
            reply = {"delivered": {str(k): v for k, v in streams.delivered.items()}, "ended": streams.ended}
        elif "count" in command:
            reply = {"delivered": {str(k): len(v) for k, v in streams.delivered.items()}, "ended": streams.ended}
        else:
            for writer in streams.writers:
                writer.transport.abort()
            break
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
