"""``paramserve serve --workers N``: N server processes on one port.

One Python process tops out at one core of gRPC and Python work per request. With
SO_REUSEPORT, N processes listen on the same address and the kernel spreads incoming
connections over them. Each worker is a whole server (its own loaded models, batchers and
compute thread) over the one registry and blob directory, kept consistent like replicas are:
a change made through one worker is served by the others within ``--sync-interval-s``.

The supervisor (this process) holds the port, creates the registry schema once, starts the
workers, restarts one that dies, and on SIGTERM/SIGINT stops them all gracefully.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
import socket
import sys
import time

from .config import ServerConfig, join_address, split_address

RESTART_DELAY_S = 1.0
START_TIMEOUT_S = 300.0


def reserve_port(config: ServerConfig) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: it fixes the port when 0 was asked for and
    keeps any other user's process off it; only listening sockets are handed connections."""
    host, port = split_address(config.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        _refuse_if_taken(family, host, port, config.listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {config.listen}: {err.strerror}") from None
    return sock


def _refuse_if_taken(family, host: str, port: int, listen: str) -> None:
    """SO_REUSEPORT would let a second server of the same user join a port already serving
    and silently take half its connections: probe with a plain bind first."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(f"cannot listen on {listen}: {err.strerror} (another server?)") from None


def worker_config(config: ServerConfig, index: int, port: int) -> ServerConfig:
    """Worker ``index``'s settings: the shared port; metrics on their own port each
    (base + index), since a scrape must reach one process and see all of its counters."""
    listen = join_address(split_address(config.listen)[0], port)
    metrics = config.metrics_listen
    if metrics != "off":
        metrics_host, metrics_port = split_address(metrics)
        if metrics_port:
            metrics = join_address(metrics_host, metrics_port + index)
    return dataclasses.replace(config, listen=listen, metrics_listen=metrics)


def _worker_main(config: ServerConfig, index: int, ready) -> None:
    import asyncio

    from .server import configure_logging, serve

    _stop_with_supervisor()
    configure_logging(f"worker {index} ")

    def announce(running) -> None:
        ready.send(running.metrics_port)
        ready.close()

    asyncio.run(serve(config, reuse_port=True, on_ready=announce))


def _stop_with_supervisor() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self.port_socket = reserve_port(config)
        self.port = self.port_socket.getsockname()[1]
        self.workers: dict[int, multiprocessing.Process] = {}
        self.stopping = False

    def start_worker(self, index: int) -> int | None:
        """Start worker ``index`` and wait until it serves; returns its metrics port."""
        from .server import metrics_label
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main, name=f"paramserve-worker-{index}", daemon=False,
            args=(worker_config(self.config, index, self.port), index, send))
        process.start()
        send.close()
        self.workers[index] = process
        if not receive.poll(START_TIMEOUT_S):
            raise RuntimeError(f"worker {index} did not start within {START_TIMEOUT_S:g} s")
        try:
            metrics_port = receive.recv()
        except EOFError:
            process.join(10)
            raise RuntimeError(f"worker {index} exited with code {process.exitcode} before "
                               "serving; its error is above") from None
        print(f"paramserve: worker {index} (pid {process.pid}) serving; metrics "
              f"{metrics_label(self.config, metrics_port)}", file=sys.stderr, flush=True)
        return metrics_port

    def run(self) -> int:
        from .server import listening_line

        self._prepare_registry()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            metrics_ports = [self.start_worker(i) for i in range(self.config.workers)]
        except RuntimeError as err:
            print(f"paramserve: {err}", file=sys.stderr, flush=True)
            self._stop_all()
            return 1
        line = listening_line(self.config, self.port, metrics_ports[0],
                              f", {self.config.workers} workers")
        print(f"paramserve listening on {line}", flush=True)
        while not self.stopping:
            time.sleep(0.2)
            for index, process in list(self.workers.items()):
                if process.is_alive() or self.stopping:
                    continue
                print(f"paramserve: worker {index} exited with code {process.exitcode}; "
                      "restarting it", file=sys.stderr, flush=True)
                time.sleep(RESTART_DELAY_S)
                try:
                    self.start_worker(index)
                except RuntimeError as err:
                    print(f"paramserve: {err}", file=sys.stderr, flush=True)
        self._stop_all()
        print("paramserve: stopped", file=sys.stderr, flush=True)
        return 0

    def _prepare_registry(self) -> None:
        """Create or check the schema once, here, rather than N workers racing to."""
        from paramserve.registry import Store

        Store(self.config.registry_url, data_dir=self.config.data_dir).close()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        for process in self.workers.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: each worker finishes its in-flight requests
        deadline = time.monotonic() + self.config.grace_s + 5
        for process in self.workers.values():
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.port_socket.close()


def serve_workers(config: ServerConfig) -> int:
    return Supervisor(config).run()
