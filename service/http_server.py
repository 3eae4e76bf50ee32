"""KServe v2 HTTP/REST on ``--http-listen``, from the process and model manager that serve
gRPC (the routes: service/http_routes.py).

The stack is aiohttp.web: its server runs inside the gRPC asyncio event loop (AppRunner and
TCPSite start in the running loop, no thread and no second loop), parses HTTP in C (llhttp),
and bounds what a client sends where the bytes arrive: the body (``client_max_size``, also
after gzip/deflate decoding), request line and header sizes, header count, idle keep-alive.
On stop it closes the port, lets requests being served finish within the grace, then closes
the connections.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .errors import Edge
from .http_routes import HttpFrontEnd, HttpSettings

# What aiohttp itself bounds per request (its defaults, written here so they are chosen).
MAX_LINE_BYTES = 8190  # the request line (method, path, query)
MAX_HEADER_BYTES = 8190  # one header field
MAX_HEADERS = 128


@dataclass
class HttpServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within the grace, then close."""
        await self.runner.cleanup()


async def start_http(
    host: str, port: int, front_end: HttpFrontEnd, reuse_port: bool = False
) -> HttpServer:
    """Serve ``front_end`` on host:port in the running loop; port 0 picks a free one."""
    settings = front_end.settings
    runner = web.AppRunner(
        front_end.app(),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.grace_s,
        keepalive_timeout=settings.keepalive_timeout_s,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_HEADER_BYTES,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    return HttpServer(runner, server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]


async def serve_http(config, core, edge: Edge, metrics, tokens, reuse_port: bool) -> HttpServer:
    """The REST port of ``config`` (``--http-*`` settings) over the gRPC port's core, edge
    (one in-flight count) and tokens; one line naming the address when it cannot be had."""
    from .config import split_address

    settings = HttpSettings(
        max_body_bytes=(config.http_max_body_mb or config.max_message_mb) << 20,
        max_json_bytes=config.http_max_json_mb << 20,
        keepalive_timeout_s=config.http_keepalive_timeout_s,
        body_timeout_s=config.stream_idle_timeout_s,
        grace_s=config.grace_s,
        limits=config.limits,
        max_status_chars=config.max_status_chars,
    )
    front_end = HttpFrontEnd(core, settings, edge, metrics, tokens, config.auth_open_reads)
    host, port = split_address(config.http_listen)
    try:
        server = await start_http(host, port, front_end, reuse_port)
    except OSError as err:
        raise OSError(
            f"cannot serve HTTP on {config.http_listen}: {err.strerror or err} "
            "(pick another with --http-listen, or 'off')"
        ) from None
    core.rest_served = True  # ServerMetadata lists binary_tensor_data
    return server
