"""Logging set-up: one line per event. Plain text without timestamps for journald (it adds its own),
with timestamps on a terminal, or JSON lines when asked.

Under journald every line starts with its syslog priority, `<3>` for ERROR (sd-daemon(3)): without it
journald files every line at priority info, and `journalctl -p warning`, and every alert built on it,
sees nothing. The agent is under journald when JOURNAL_STREAM names the device and inode of its stderr
(systemd.exec(5)); a stderr redirected elsewhere (a file, a pipe to another program) gets no prefix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

# sd-daemon(3): SD_CRIT 2, SD_ERR 3, SD_WARNING 4, SD_NOTICE 5, SD_INFO 6, SD_DEBUG 7.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level; levels in between take the next more severe one's."""
    for level, priority in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


def under_journald(stream: object = None, environ: Mapping[str, str] = os.environ) -> bool:
    """True when `stream` (default stderr) is the journal stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        fd = (stream or sys.stderr).fileno()  # type: ignore[attr-defined]
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def error_lines(text: str) -> str:
    """`text` for stderr as an error: each line prefixed `<3>` under journald (a refused config at start-up,
    printed before logging is set up, must reach `journalctl -p err` too), unchanged elsewhere."""
    if not under_journald(sys.stderr):
        return text
    return "\n".join(f"<{syslog_priority(logging.ERROR)}>{line}" for line in text.split("\n"))


class _JournalPrefix(logging.Formatter):
    """Puts `<N>` before every line of a record, a traceback's lines included: journald reads each line as
    an entry of its own, and a line without a prefix would be filed at info."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


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
    formatter: logging.Formatter
    if fmt == "json":
        formatter = _JsonFormatter()  # one JSON document per line, parsed as such: never prefixed
    elif fmt == "text" or (fmt == "auto" and sys.stderr.isatty()):
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:  # journald: it timestamps every line itself
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    if fmt != "json" and under_journald(sys.stderr):
        formatter = _JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosqlite logs every statement with its parameters (whole payloads) at debug: never useful.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # pymodbus is loud and duplicates what the agent reports itself.
    if level.lower() != "debug":
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.WARNING)
