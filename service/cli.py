"""The ``paramserve`` command's entry point: parse (``cli_parser``), set up logging, run the
command (``cli_commands``: a thin layer over the client; ``cli_serve``: the server, ``check``,
``db upgrade``), and turn a deliberate error into one line and an exit status.

Startup is kept lean: the parser imports only the standard library, a client command imports
the gRPC client (numpy, no torch), ``health`` only grpc.
"""

from __future__ import annotations

import sys

from .cli_parser import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, build_parser
from .settings import SettingError

__all__ = ["main", "build_parser", "EXIT_ERROR", "EXIT_USAGE", "EXIT_UNREACHABLE"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    from .logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # one clear line, never a traceback, for known errors
        if not _known(err):
            raise
        text = str(err)
        if isinstance(err, OSError) and err.filename and text.startswith("[Errno"):
            text = f"{err.filename}: {err.strerror}"  # the path first, no errno
        message = " | ".join(line.strip() for line in text.splitlines() if line.strip())
        print(f"paramserve: error: {message}", file=sys.stderr)
        if isinstance(err, SettingError):
            return EXIT_USAGE
        return (
            EXIT_UNREACHABLE
            if _status_name(err) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            else EXIT_ERROR
        )


def _known(err: Exception) -> bool:
    """A deliberate error: the core's classes (looked up without importing the core, which
    a lean command never loaded), OS errors, bad values."""
    errors = sys.modules.get("paramserve.registry.errors")
    if errors is not None and isinstance(err, errors.ParamserveError):
        return True
    return isinstance(err, (OSError, ValueError))


def _status_name(err: Exception) -> str:
    """The gRPC status an error came back as: ``ServerError.code``, or the class the client
    turned the status into (DEADLINE_EXCEEDED comes back as ``DeadlineExceeded``)."""
    code = getattr(err, "code", None)
    if code is not None:
        return getattr(code, "name", "")
    errors = sys.modules.get("paramserve.registry.errors")
    if errors is None or not isinstance(err, errors.ParamserveError):
        return ""
    from .status import code_of  # not .errors: that one imports torch

    code = code_of(err)
    return code.name if code else ""


if __name__ == "__main__":
    sys.exit(main())
