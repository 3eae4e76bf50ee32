"""The commands of ``paramserve`` that run here, not against a server: ``serve``, ``check``
and ``db upgrade``. Each imports the core (and torch) only when it runs."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

EXIT_ERROR, EXIT_USAGE = 1, 2


def cmd_serve(args) -> int:
    from paramserve.registry.errors import InvalidArgument

    from . import event_loop
    from .config import ServerConfig
    from .errors import one_line
    from .server import serve

    try:
        config = ServerConfig.from_args(args)
        if config.workers > 1:
            from .workers import serve_workers

            return serve_workers(config)
        event_loop.run(serve(config), config.event_loop)
    except (InvalidArgument, ValueError) as err:  # a bad flag or flag file: before serving
        print(f"paramserve: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_check(args) -> int:
    from paramserve.registry.check import check, open_existing

    with open_existing(
        args.registry_url, args.data_dir, args.blob_url, args.s3_endpoint_url
    ) as store:
        report = check(store, repair=args.repair, min_age_s=args.min_age_s)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        print(
            f"checked {report.versions_checked} versions: {'OK' if report.ok else 'PROBLEMS FOUND'}"
        )
        for label, items in (
            ("missing blob", report.missing_blobs),
            ("corrupt blob", report.corrupt_blobs),
            ("dangling alias", report.dangling_aliases),
            ("orphaned blob", report.orphan_blobs),
            ("held blob (an upload in flight)", report.held_blobs),
            ("temporary file", report.temp_files),
            ("removed", report.removed),
        ):
            for item in items:
                print(f"  {label}: {item}")
    return 0 if report.ok else EXIT_ERROR


def cmd_db_upgrade(args) -> int:
    from pathlib import Path

    from sqlalchemy.exc import DBAPIError

    from paramserve.registry.database import cannot_open, make_engine, upgrade
    from paramserve.registry.store import default_url

    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    url = args.registry_url or default_url(args.data_dir)
    engine = make_engine(url)
    try:
        upgrade(engine, url)
    except DBAPIError as err:
        raise cannot_open(engine, err) from err
    finally:
        engine.dispose()
    print(f"registry at {engine.url.render_as_string(hide_password=True)} is at the newest schema")
    return 0
