"""Clock health: is the kernel's clock synchronised, and was it stepped?

Demand windows are only as good as the clock that places their edges: a controller whose window drifted
from the utility meter's is not trusted. The kernel knows whether NTP (chrony, systemd-timesyncd, ntpd)
keeps it synchronised: `adjtimex(2)` with no modes set only reads that state (no privilege needed), and
its STA_UNSYNC flag, estimated error and maximum error are what `chronyc tracking` reports from. A step
(NTP's first correction after boot, a person running `date -s`) is found by comparing how far the wall
clock moved with how far the monotonic clock did: slewing changes their rates by at most 0.05 %.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

STA_UNSYNC = 0x0040
TIME_ERROR = 5  # adjtimex's return: the clock is not synchronised
STEP_TOLERANCE_S = 1.0  # wall against monotonic drift that counts as a step (slewing is far below it)
SLEW_RATE = 0.001  # twice the kernel's largest slew (500 ppm): between far-apart checks, drift up to this is no step
READ_INTERVAL_S = 10.0  # adjtimex is read at most this often (status, /metrics, each meter poll ask)


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex (<sys/timex.h>), the same layout on every Linux architecture glibc and musl build."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int), ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


@dataclass(frozen=True, slots=True)
class ClockState:
    """What the kernel says of its clock. `known` False: it could not be asked (not Linux, a sandbox)."""

    known: bool
    synchronised: bool = False
    esterror_s: float | None = None  # estimated error
    maxerror_s: float | None = None  # maximum error

    def as_dict(self) -> dict[str, object]:
        return {"known": self.known, "synchronised": self.synchronised, "esterror_s": self.esterror_s,
                "maxerror_s": self.maxerror_s}


_adjtimex: Callable[[ctypes.Array[ctypes.c_char] | _Timex], int] | None = None


def _function() -> Callable[..., int] | None:
    global _adjtimex
    if _adjtimex is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
            function = getattr(libc, "adjtimex", None) or libc.ntp_adjtime
        except (OSError, AttributeError):
            return None
        function.argtypes = [ctypes.POINTER(_Timex)]
        function.restype = ctypes.c_int
        _adjtimex = function
    return _adjtimex


def read_clock_state() -> ClockState:
    """The kernel's view of its clock, read-only (modes = 0)."""
    function = _function()
    if function is None:
        return ClockState(known=False)
    timex = _Timex()
    result = function(ctypes.byref(timex))
    if result < 0:
        return ClockState(known=False)
    unsynced = bool(timex.status & STA_UNSYNC) or result == TIME_ERROR
    return ClockState(True, not unsynced, timex.esterror / 1e6, timex.maxerror / 1e6)


class StepDetector:
    """Finds wall-clock steps between two calls by comparing with the monotonic clock. Logs each step once,
    with its size, at WARNING: a plant's demand figures around it are flagged."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 tolerance: float = STEP_TOLERANCE_S) -> None:
        self._wall, self._monotonic, self._tolerance = wall, monotonic, tolerance
        self._last: tuple[float, float] | None = None
        self.steps = 0  # counted, for status and /metrics
        self.last_step_s = 0.0

    def check(self) -> float:
        """The step since the last call, in seconds (positive: forward), or 0.0."""
        now = (self._wall(), self._monotonic())
        last, self._last = self._last, now
        if last is None:
            return 0.0
        step = (now[0] - last[0]) - (now[1] - last[1])
        # Checked a minute or an hour apart (the status message, with no meter polled every second), a clock
        # slewed at the kernel's 500 ppm drifts further than the tolerance without ever being stepped.
        if abs(step) <= max(self._tolerance, SLEW_RATE * abs(now[1] - last[1])):
            return 0.0
        self.steps += 1
        self.last_step_s = step
        log.warning("the wall clock was stepped %+.3f s (NTP correction or a manual change); demand windows "
                    "across it are flagged clock_step", step)
        return step


class ClockWatch:
    """The gateway's clock health, one per agent: what the status message, `/metrics`, `edge-agent status` and
    the energy stage show and flag. It matters with or without energy tables: every reading's timestamp
    comes from this clock.

    `check()` is called wherever time is looked at anyway (each meter poll, each status message, each
    scrape), so a step is found at the latest at the next of them; each consumer that must react to a step
    (the energy stage flags its open windows) compares `steps` with the count it saw last."""

    def __init__(self, read: Callable[[], ClockState] = read_clock_state, detector: StepDetector | None = None,
                 monotonic: Callable[[], float] = time.monotonic, read_interval: float = READ_INTERVAL_S) -> None:
        self._read, self._monotonic, self._interval = read, monotonic, read_interval
        self.detector = detector or StepDetector(monotonic=monotonic)
        self._state = ClockState(known=False)
        self._read_at: float | None = None
        self._unsynced_logged = False

    @property
    def steps(self) -> int:
        return self.detector.steps

    def check(self) -> int:
        """Look for a step since the last check; the number of steps since the start."""
        self.detector.check()
        return self.detector.steps

    def state(self) -> ClockState:
        """The kernel's view, read again when the last reading is older than `read_interval`."""
        now = self._monotonic()
        if self._read_at is None or now - self._read_at >= self._interval:
            self._read_at = now
            self._state = self._read()
            unsynced = self._state.known and not self._state.synchronised
            if unsynced and not self._unsynced_logged:
                log.warning("the kernel reports the clock unsynchronised (adjtimex STA_UNSYNC): timestamps and "
                            "demand window edges are only as right as the clock; check chrony/timesyncd "
                            "(docs/troubleshooting.md)")
            elif not unsynced and self._unsynced_logged and self._state.known:
                log.info("the clock is synchronised again")
            self._unsynced_logged = unsynced
        return self._state

    def figures(self) -> dict[str, object]:
        """For the status message, /status.json and /metrics (docs/payload.md, "The status topic")."""
        self.check()
        return {**self.state().as_dict(), "steps": self.detector.steps,
                "last_step_s": round(self.detector.last_step_s, 3) if self.detector.steps else None}
