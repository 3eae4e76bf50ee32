"""The event loop a server process runs on (``--event-loop``).

uvloop (libuv, in C) runs the loop's callbacks, timers and socket polling without Python frames;
gRPC's asyncio server schedules several of each per call, so on a small model a call costs
roughly half the CPU it does on the standard library's loop (benchmarks/throughput.py). The
standard loop stays a choice: it is what a debugger or a platform without uvloop has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from paramserve.registry.errors import InvalidArgument


def run(main: Coroutine[Any, Any, Any], kind: str) -> Any:
    """``asyncio.run(main)`` on the loop ``kind`` names ("uvloop" or "asyncio")."""
    if kind == "asyncio":
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        main.close()
        raise InvalidArgument(
            "--event-loop uvloop needs the uvloop package (pip install uvloop), "
            "or run with --event-loop asyncio"
        ) from None
    return uvloop.run(main)
