"""Log records to stderr, as text or one JSON object per line (``--log-format``), at
``--log-level``. A worker's lines carry its label; alembic's chatter stays at warning."""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s {label}%(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...}``; a record's ``fields`` (a dict given
    as ``extra={"fields": ...}``) are added as keys, e.g. an access log line's status."""

    def __init__(self, label: str = ""):
        super().__init__()
        self.label = label.strip()

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.label:
            line["worker"] = self.label
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "info", fmt: str = "text", label: str = "") -> None:
    """Replace the root handlers with one on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(label)
        if fmt == "json"
        else logging.Formatter(TEXT_FORMAT.format(label=label))
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)
