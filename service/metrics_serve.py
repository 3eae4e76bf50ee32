"""The metrics port: ``GET /metrics`` and nothing else (404 elsewhere), so a REST client pointed
at it by mistake gets an error instead of a 200 it would read as "ready".

wsgiref's server with prometheus_client's silent threading server class, in daemon threads off
the event loop. Bounded: at most ``MAX_CONNECTIONS`` connections at once (more are closed at
accept), each with a ``SOCKET_TIMEOUT_S`` socket timeout, so slow or idle clients cannot pile up
threads; one scrape's work is bounded by the label sets that exist (loaded model versions).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, ThreadingWSGIServer

PATH = "/metrics"
MAX_CONNECTIONS = 16
SOCKET_TIMEOUT_S = 5.0


def metrics_app(body: Callable[[], bytes]):
    """A WSGI app answering ``GET /metrics`` with ``body()`` in the text format 0.0.4 (the one
    Triton serves; OpenMetrics is not offered: it would rename Triton's counters ``*_total``)."""

    def app(environ, start_response):
        if environ.get("PATH_INFO") != PATH:
            return _plain(start_response, "404 Not Found", b"not found: only /metrics is served\n")
        if environ["REQUEST_METHOD"] != "GET":
            return _plain(
                start_response,
                "405 Method Not Allowed",
                b"only GET is allowed on /metrics\n",
                [("Allow", "GET")],
            )
        output = body()
        start_response(
            "200 OK",
            [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(output)))],
        )
        return [output]

    return app


def _plain(start_response, status: str, text: bytes, extra=()):
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(text)))]
    start_response(status, [*headers, *extra])
    return [text]


class _Handler(WSGIRequestHandler):
    timeout = SOCKET_TIMEOUT_S  # StreamRequestHandler sets it on the connection's socket

    def log_message(self, format, *args):
        """Scrapes are not logged (one every few seconds per scraper)."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most ``MAX_CONNECTIONS`` of them."""

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        """Stop serving and close the listening socket (the port is free again)."""
        super().shutdown()
        self.server_close()


def serve(host: str, port: int, body: Callable[[], bytes]):
    """Listen on ``host:port`` (0: a free port) in a daemon thread; returns
    ``(server, bound_port)``; ``server.shutdown()`` stops it."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_BoundedServer):
        address_family = family

    server = make_server(str(address[0]), port, metrics_app(body), Server, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="paramserve-metrics", daemon=True).start()
    return server, server.server_port
