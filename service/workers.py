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
import multiprocessing.connection
import multiprocessing.process
import signal
import socket
import sys
import time
from dataclasses import dataclass

from .config import ServerConfig, join_address, split_address

RESTART_DELAY_S = 1.0  # after a first crash; doubled for each further one in a row
MAX_RESTART_DELAY_S = 60.0
STEADY_S = 60.0  # a worker that dies after serving this long starts a new count
START_TIMEOUT_S = 300.0
POLL_S = 0.2


def reserve_port(config: ServerConfig, address: str | None = None) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: it fixes the port when 0 was asked for and
    keeps any other user's process off it; only listening sockets are handed connections.
    ``address``: another port the workers share (``--http-listen``); default ``--listen``."""
    address = address or config.listen
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        refuse_if_taken(host, port, address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {address}: {err.strerror}") from None
    return sock


def refuse_if_taken(host: str, port: int, listen: str) -> None:
    """SO_REUSEPORT would let a second server of the same user join a port already serving
    and silently take half its connections: probe with a plain bind first. (The server's own
    bind probes too: gRPC would log a multi-line error of its own before failing.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(
                f"cannot listen on {listen}: {err.strerror} (another server? pick "
                "another port with --listen)"
            ) from None


def worker_config(
    config: ServerConfig, index: int, port: int, http_port: int | None = None
) -> ServerConfig:
    """Worker ``index``'s settings: the shared ports (gRPC, HTTP); metrics on their own port
    each (base + index), since a scrape must reach one process and see all of its counters."""
    listen = join_address(split_address(config.listen)[0], port)
    if http_port is not None:
        config = dataclasses.replace(
            config, http_listen=join_address(split_address(config.http_listen)[0], http_port)
        )
    metrics = config.metrics_listen
    if metrics != "off":
        metrics_host, metrics_port = split_address(metrics)
        if metrics_port:
            metrics = join_address(metrics_host, metrics_port + index)
    return dataclasses.replace(config, listen=listen, metrics_listen=metrics)


def _worker_main(config: ServerConfig, index: int, ready) -> None:
    from . import event_loop
    from .server import configure_logging, serve

    _stop_with_supervisor()
    configure_logging(f"worker {index} ", config)

    def announce(running) -> None:
        ready.send(running.metrics_port)
        ready.close()

    event_loop.run(serve(config, reuse_port=True, on_ready=announce), config.event_loop)


def _stop_with_supervisor() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class _Worker:
    """One worker slot: its process while it runs, and its record of crashes."""

    index: int
    process: multiprocessing.process.BaseProcess | None = None
    # the pipe end it announces itself on, until it serves
    ready: multiprocessing.connection.Connection | None = None
    started_at: float = 0.0
    crashes: int = 0  # in a row, each within STEADY_S of starting
    restart_at: float | None = None  # when to start it again after a crash
    metrics_port: int | None = None


class Supervisor:
    """Starts, watches and restarts the workers without ever blocking on one: a worker that
    takes minutes to start does not delay noticing that another died, nor a SIGTERM. A
    worker that keeps crashing is restarted after 1, 2, 4 … (at most 60) seconds, and after
    ``--worker-restart-limit`` crashes in a row the supervisor gives up and exits 1."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self.port_socket = reserve_port(config)
        self.port = self.port_socket.getsockname()[1]
        self.http_socket, self.http_port = None, None
        if config.http_listen != "off":
            self.http_socket = reserve_port(config, config.http_listen)
            self.http_port = self.http_socket.getsockname()[1]
        self.workers = [_Worker(i) for i in range(config.workers)]
        self.stopping = False

    def launch(self, worker: _Worker) -> None:
        """Start ``worker``'s process; it reports on its pipe once it serves."""
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_worker_main,
            name=f"paramserve-worker-{worker.index}",
            daemon=False,
            args=(
                worker_config(self.config, worker.index, self.port, self.http_port),
                worker.index,
                send,
            ),
        )
        process.start()
        send.close()
        worker.process, worker.ready = process, receive
        worker.started_at, worker.restart_at = time.monotonic(), None

    def check(self, worker: _Worker, now: float) -> str | None:
        """Look at ``worker`` without waiting: a line saying why it stopped, or None while it
        starts or serves. Announces a worker that has just begun to serve."""
        from .server import metrics_label

        process = worker.process
        assert process is not None  # only launched workers are checked
        if worker.ready is not None:
            if worker.ready.poll(0):  # a message, or the end of the pipe: it died
                receive, worker.ready = worker.ready, None
                try:
                    worker.metrics_port = receive.recv()
                except EOFError:
                    process.join(2)  # it is exiting: the pipe closed with it
                    return (
                        f"worker {worker.index} exited with code {process.exitcode} before "
                        "serving; its error is above"
                    )
                finally:
                    receive.close()
                print(
                    f"paramserve: worker {worker.index} (pid {process.pid}) serving; metrics "
                    f"{metrics_label(self.config, worker.metrics_port)}",
                    file=sys.stderr,
                    flush=True,
                )
                return None
            if now - worker.started_at > START_TIMEOUT_S:
                process.kill()
                process.join()
                worker.ready.close()
                worker.ready = None
                return f"worker {worker.index} did not start within {START_TIMEOUT_S:g} s"
            return None
        if process.is_alive():
            return None
        return f"worker {worker.index} exited with code {process.exitcode}"

    def crashed(self, worker: _Worker, why: str, now: float) -> str | None:
        """Schedule ``worker``'s restart after a growing delay; returns the line giving up
        when it has crashed ``--worker-restart-limit`` times in a row."""
        worker.crashes = worker.crashes + 1 if now - worker.started_at < STEADY_S else 1
        worker.metrics_port = None
        limit = self.config.worker_restart_limit
        if limit and worker.crashes >= limit:
            return (
                f"{why}; it crashed {worker.crashes} times in a row, each within "
                f"{STEADY_S:g} s of starting: giving up (--worker-restart-limit {limit}); "
                "fix the cause and start again"
            )
        delay_s = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (worker.crashes - 1))
        worker.restart_at = now + delay_s
        print(f"paramserve: {why}; restarting it in {delay_s:g} s", file=sys.stderr, flush=True)
        return None

    def run(self) -> int:
        from .server import listening_line

        self._prepare_registry()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for worker in self.workers:
            self.launch(worker)
        failed = self._wait_until_all_serve()
        if failed is not None:
            print(f"paramserve: {failed}", file=sys.stderr, flush=True)
            self._stop_all()
            return 1
        if not self.stopping:
            line = listening_line(
                self.config,
                self.port,
                self.workers[0].metrics_port,
                f", {self.config.workers} workers",
                http_port=self.http_port,
            )
            print(f"paramserve listening on {line}", flush=True)
        gave_up = self._supervise()
        self._stop_all()
        if gave_up is not None:
            print(f"paramserve: {gave_up}", file=sys.stderr, flush=True)
            return 1
        print("paramserve: stopped", file=sys.stderr, flush=True)
        return 0

    def _wait_until_all_serve(self) -> str | None:
        """The first start: any worker that fails it stops the server (a bad setting, most
        likely, that a restart would only repeat)."""
        while not self.stopping and any(w.ready is not None for w in self.workers):
            time.sleep(POLL_S)
            for worker in self.workers:
                if worker.ready is not None:
                    failed = self.check(worker, time.monotonic())
                    if failed is not None:
                        return failed
        return None

    def _supervise(self) -> str | None:
        """Until SIGTERM: restart what died, when its delay is over; None, or why it gave up."""
        while not self.stopping:
            time.sleep(POLL_S)
            now = time.monotonic()
            for worker in self.workers:
                if self.stopping:
                    break
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self.launch(worker)
                    continue
                stopped = self.check(worker, now)
                if stopped is not None:
                    gave_up = self.crashed(worker, stopped, now)
                    if gave_up is not None:
                        return gave_up
        return None

    def _prepare_registry(self) -> None:
        """Create or check the schema once, here, rather than N workers racing to."""
        from paramserve.registry import Store

        Store(self.config.registry_url, data_dir=self.config.data_dir).close()

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        processes = [w.process for w in self.workers if w.process is not None]
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: each worker finishes its in-flight requests
        deadline = time.monotonic() + self.config.grace_s + 5
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.port_socket.close()
        if self.http_socket is not None:
            self.http_socket.close()


def serve_workers(config: ServerConfig) -> int:
    if config.auth_token_file:  # refused here, once, rather than by every worker
        from .auth import Tokens

        Tokens.from_file(config.auth_token_file)
    return Supervisor(config).run()
