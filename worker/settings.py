"""`arq worker.settings.WorkerSettings`: the worker process's edge, where the environment is read once.

arq imports this module by its dotted path, so this is where the worker's Config is built and its event loop made:
arq's Worker takes the current loop. On uvloop the worker spends about a sixth less CPU per job, most of it arq's
own socket and task work (docs/performance.md); the web runs on uvloop too.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

from worker.config import from_env
from worker.options import startup, worker_options

config = from_env()

if sys.platform != "win32":
    import uvloop

    asyncio.set_event_loop(uvloop.new_event_loop())

# The collector looks at young objects after this many allocations (Python's default: 700). Thousands of running
# attempts make thousands of short-lived objects a second (reports, their events, each tick's statement); at 700 many
# live through young collections into the old generation, whose full passes walk the whole heap. A worker with a
# higher threshold spent about a fifth less CPU per running job, ad hoc (docs/performance.md §11).
GC_YOUNG_THRESHOLD = 20_000


async def _startup(ctx: dict[str, Any]) -> None:
    """The deployment's start-up, then the collector told to look less: what start-up imported and built goes to its
    permanent generation (`gc.freeze`), which no pass walks again. Here, not in startup: the tests' in-process
    workers share the test process's collector."""
    await startup(ctx)
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


WorkerSettings: dict[str, Any] = worker_options(config) | {"on_startup": _startup}
