"""The ``paramserve`` command. Only a placeholder until the gRPC service lands."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paramserve",
        description="Serve PyTorch modules and their versioned parameters over gRPC.")
    parser.add_argument("command", nargs="?", default="serve", help="serve (not built yet)")
    parser.parse_args(argv)
    print("paramserve: the gRPC server is not built yet; use the core from Python "
          "(see README: `from paramserve.registry import Store`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
