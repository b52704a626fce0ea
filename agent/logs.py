"""Logging set-up: one line per event. Plain text without timestamps for journald (it adds its own),
with timestamps on a terminal, or JSON lines when asked."""

from __future__ import annotations

import json
import logging
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                 f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif fmt == "text" or (fmt == "auto" and sys.stderr.isatty()):
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:  # journald: it timestamps every line itself
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosqlite logs every statement with its parameters (whole payloads) at debug: never useful.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # pymodbus is loud and duplicates what the agent reports itself.
    if level.lower() != "debug":
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.WARNING)
