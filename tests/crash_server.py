"""A real paramserve server in a child process that starts in a fraction of a second.

Children fork from a multiprocessing "forkserver" that imported paramserve (torch, grpc) once
and never opened a channel, so a crash test can SIGKILL and restart the server dozens of times.
"""

from __future__ import annotations

import asyncio
import multiprocessing

PRELOAD = ["paramserve.service.server"]


def _serve(data_dir: str, conn) -> None:
    from paramserve.service.config import ServerConfig
    from paramserve.service.server import start

    async def main():
        running = await start(ServerConfig(data_dir=data_dir, listen="127.0.0.1:0",
                                           metrics_listen="off", sync_interval_s=0))
        conn.send(running.port)
        await asyncio.Event().wait()

    asyncio.run(main())


class ForkedServer:
    _context = None

    @classmethod
    def context(cls):
        if cls._context is None:
            cls._context = multiprocessing.get_context("forkserver")
            cls._context.set_forkserver_preload(PRELOAD)
        return cls._context

    def __init__(self, data_dir: str, timeout_s: float = 60):
        ctx = self.context()
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(str(data_dir), child), daemon=True)
        self.process.start()
        if not parent.poll(timeout_s):
            self.process.kill()
            raise RuntimeError("forked server did not start")
        self.port = parent.recv()
        self.address = f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no cleanup of any kind
        self.process.join(10)
