"""`arq worker.settings.WorkerSettings`: the worker process's edge, where the environment is read once.

arq imports this module by its dotted path, so this is where the worker's Config is built and its event loop made:
arq's Worker takes the current loop. On uvloop the worker spends about a sixth less CPU per job, most of it arq's
own socket and task work (docs/performance.md); the web runs on uvloop too.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from worker.config import from_env
from worker.options import worker_options

config = from_env()

if sys.platform != "win32":
    import uvloop

    asyncio.set_event_loop(uvloop.new_event_loop())

WorkerSettings: dict[str, Any] = worker_options(config)
