"""Process-wide set-up shared by the proxy and the quickstart: structured logging and the uvloop event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                                    "logger": record.name, "msg": record.getMessage()}
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text", worker: int | None = None) -> None:
    """Log to stderr; a worker process (`worker` its index) says which it is on every line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        label = "" if worker is None else f"worker={worker} "
        formatter = logging.Formatter(f"ts=%(asctime)s level=%(levelname)s logger=%(name)s {label}%(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def install_event_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the asyncio loop still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
