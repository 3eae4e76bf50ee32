"""The event loop a server process runs on (``--event-loop``).

The standard library's loop is the default. uvloop (libuv, in C) runs the loop's callbacks
and socket polling without Python frames: on the 2-core machine, serving the 20→256→10 MLP
to perf_analyzer, it gave ~5% more throughput at concurrency 4 and 16 and on streams, but a
lone client's latency rose from 0.59 to 0.76 ms (p50), so it is a choice, not the default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from paramserve.registry.errors import InvalidArgument


def run(main: Coroutine[Any, Any, Any], kind: str) -> Any:
    """``asyncio.run(main)`` on the loop ``kind`` names ("asyncio" or "uvloop")."""
    if kind == "asyncio":
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        main.close()
        raise InvalidArgument(
            "--event-loop uvloop needs the uvloop package "
            "(pip install 'paramserve[uvloop]'), or run with --event-loop asyncio"
        ) from None
    return uvloop.run(main)
