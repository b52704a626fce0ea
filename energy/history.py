"""The gateway's own record of its windows, kept 14 months apart from the buffer (which empties as the
broker acknowledges), so a technician can answer "what was our peak this month, and when?" on the gateway:
`edge-agent demand --config F`.

One SQLite file beside the buffer (`energy-history.db`), one row per meter or group and window, keyed by
(meter, start): a window written again (an outbox replayed after a crash, energy/stage.py) is the same
row, the first value is kept. Rows more than `KEEP_DAYS` older than the newest window are deleted when a
window is added, at most once a day. Size per meter: docs/benchmarks.md.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from energy.windows import WindowRecord, flag_text

KEEP_DAYS = 430  # 14 months: the current month and the 12 before it, always whole
_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    meter       TEXT NOT NULL,
    start       REAL NOT NULL,  -- UTC epoch seconds of the start edge
    month       TEXT NOT NULL,  -- local YYYY-MM of the start edge (the tariff's month)
    start_local TEXT NOT NULL,
    window_s    INTEGER NOT NULL,
    energy_kwh  REAL NOT NULL,
    demand_kw   REAL NOT NULL,
    export_kwh  REAL,
    coverage    REAL NOT NULL,
    longest_gap REAL NOT NULL,
    flags       TEXT NOT NULL,
    PRIMARY KEY (meter, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS windows_month ON windows (meter, month, demand_kw);
"""


@dataclass(frozen=True, slots=True)
class Peak:
    meter: str
    month: str
    demand_kw: float
    start_local: str
    flags: str


@dataclass(frozen=True, slots=True)
class StoredWindow:
    meter: str
    start_local: str
    energy_kwh: float
    demand_kw: float
    coverage: float
    longest_gap_s: float
    flags: str


class History:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._pruned = 0.0

    def close(self) -> None:
        self._db.close()

    def add(self, record: WindowRecord, zone: ZoneInfo) -> None:
        month = datetime.fromtimestamp(record.start, zone).strftime("%Y-%m")
        self._db.execute(
            "INSERT OR IGNORE INTO windows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.meter, record.start, month, record.start_local, record.window_s, record.energy_kwh,
             record.demand_kw, record.export_kwh, record.coverage, record.longest_gap_s, flag_text(record.flags)))
        # Age is counted back from the newest window, not from the wall clock: a clock set years ahead by
        # mistake must not wipe the history.
        now = record.end
        if now - self._pruned > 86400:
            self._pruned = now
            self._db.execute("DELETE FROM windows WHERE start < ?", (now - KEEP_DAYS * 86400,))

    def peaks(self, months: list[str]) -> list[Peak]:
        """The highest window of each meter in each of `months` (local YYYY-MM), the earliest if tied."""
        marks = ",".join("?" * len(months))
        rows = self._db.execute(
            f"SELECT meter, month, demand_kw, start_local, flags FROM ("
            f" SELECT *, row_number() OVER (PARTITION BY meter, month ORDER BY demand_kw DESC, start) AS rank"
            f" FROM windows WHERE month IN ({marks})) WHERE rank = 1 ORDER BY meter, month DESC",
            months).fetchall()
        return [Peak(*row) for row in rows]

    def latest(self, limit: int = 8) -> list[StoredWindow]:
        """The last windows of each meter, newest first."""
        rows = self._db.execute(
            "SELECT meter, start_local, energy_kwh, demand_kw, coverage, longest_gap, flags FROM ("
            " SELECT *, row_number() OVER (PARTITION BY meter ORDER BY start DESC) AS rank FROM windows)"
            " WHERE rank <= ? ORDER BY meter, start DESC", (limit,)).fetchall()
        return [StoredWindow(*row) for row in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM windows").fetchone()[0])


def last_months(now: float, zone: ZoneInfo, count: int = 13) -> list[str]:
    """This month and the `count - 1` before it, local YYYY-MM, newest first."""
    today = datetime.fromtimestamp(now, zone)
    year, month = today.year, today.month
    out = []
    for _ in range(count):
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return out


def report(history: History, zone: ZoneInfo, now: float | None = None, latest: int = 8) -> str:
    """What `edge-agent demand` prints: each meter's peak this month and in each of the 12 before it, with
    its window; then the last windows with their flags."""
    months = last_months(time.time() if now is None else now, zone)
    peaks = history.peaks(months)
    lines = ["Maximum demand (highest window average) per month, this month first:"]
    if not peaks:
        lines.append("  no windows recorded yet")
    meter = None
    for peak in peaks:
        if peak.meter != meter:
            meter = peak.meter
            lines.append(f"  {meter}")
        mark = "  [" + peak.flags + "]" if peak.flags else ""
        lines.append(f"    {peak.month}  {peak.demand_kw:10.1f} kW  window from {peak.start_local}{mark}")
    lines.append("")
    lines.append(f"Last windows (up to {latest} per meter; flags in brackets):")
    for window in history.latest(latest):
        mark = f"  [{window.flags}]" if window.flags else ""
        gaps = "" if window.coverage >= 0.999 else f"  coverage {window.coverage:.0%}, longest gap " \
                                                  f"{window.longest_gap_s:.0f} s"
        lines.append(f"  {window.meter:<20} {window.start_local}  {window.demand_kw:10.1f} kW  "
                     f"{window.energy_kwh:10.3f} kWh{gaps}{mark}")
    return "\n".join(lines)
