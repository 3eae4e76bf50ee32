"""The ``paramserve`` command. The server and its client commands are not built yet; the
database command works on the core alone."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paramserve",
        description="Serve PyTorch modules and their versioned parameters over gRPC.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="start the gRPC server (not built yet)")
    db = commands.add_parser("db", help="registry database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the registry schema to the newest")
    upgrade.add_argument("--data-dir", default=os.environ.get("PARAMSERVE_DATA_DIR", "./data"),
                         help="data directory (default ./data; env PARAMSERVE_DATA_DIR)")
    upgrade.add_argument("--registry-url", default=os.environ.get("PARAMSERVE_REGISTRY_URL"),
                         help="SQLAlchemy URL (default sqlite:///DATA_DIR/registry.db; "
                              "env PARAMSERVE_REGISTRY_URL)")
    args = parser.parse_args(argv)
    if args.command == "db":
        return _db_upgrade(args.registry_url, args.data_dir)
    print("paramserve: the gRPC server is not built yet; use the core from Python "
          "(README: `from paramserve.registry import Store`)", file=sys.stderr)
    return 2


def _db_upgrade(url: str | None, data_dir: str) -> int:
    from pathlib import Path

    from paramserve.registry.database import make_engine, upgrade
    from paramserve.registry.store import default_url

    Path(data_dir).mkdir(parents=True, exist_ok=True)
    url = url or default_url(data_dir)
    engine = make_engine(url)
    try:
        upgrade(engine, url)
    finally:
        engine.dispose()
    print(f"registry at {engine.url.render_as_string(hide_password=True)} is at the newest schema")
    return 0


if __name__ == "__main__":
    sys.exit(main())
