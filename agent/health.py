"""Per-device health and the logging rule for failures: the first failure loudly, repeats quietly, the
recovery once. A gateway with a dead meter must not fill the journal."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

DEVICE_REASONS_LOGGED = 5


@dataclass
class FailureLog:
    """Tracks one thing that can fail repeatedly (a device, the broker link, the disk)."""

    what: str
    logger: logging.Logger
    failing_since: float | None = None
    consecutive: int = 0
    # How many different reasons one episode may log at ERROR. 1: only the first. More: a reason not seen
    # before in this episode (a server restarted with a new certificate, a meter that stopped answering
    # and now refuses) is a new failure, logged loudly once; still bounded, for reasons that carry numbers.
    reasons_logged: int = 1
    _reasons: set[str] = field(init=False, default_factory=set, repr=False)

    def failed(self, reason: object, detail: str = "") -> None:
        self.consecutive += 1
        text = str(reason)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self._reasons = {text}
            self.logger.error("%s: %s%s (repeats are logged at debug level until it recovers)", self.what,
                              reason, f"; {detail}" if detail else "")
        elif text not in self._reasons and len(self._reasons) < self.reasons_logged:
            self._reasons.add(text)
            self.logger.error("%s: failing for another reason now (%d in a row): %s%s", self.what,
                              self.consecutive, reason, f"; {detail}" if detail else "")
        else:
            self.logger.debug("%s: still failing (%d in a row): %s", self.what, self.consecutive, reason)

    def succeeded(self) -> None:
        if self.failing_since is not None:
            down = time.monotonic() - self.failing_since
            self.logger.info("%s: recovered after %d failures over %.1f s", self.what, self.consecutive, down)
        self.failing_since = None
        self.consecutive = 0
        self._reasons = set()

    @property
    def failing(self) -> bool:
        return self.failing_since is not None


@dataclass
class DeviceHealth:
    name: str
    failures: FailureLog
    polls_ok: int = 0
    polls_failed: int = 0
    overruns: int = 0
    readings: int = 0
    bad_readings: int = 0
    last_poll_seconds: float = 0.0
    last_success: float | None = None
    last_error: str | None = None
    # A device that answers but spoils points (exception responses, NaN) is as worth a log line as one
    # that does not answer: logged with the same once-loud, then-quiet, recovery-once rule.
    bad_points: FailureLog = field(init=False)

    _named: set[str] = field(init=False, default_factory=set, repr=False)  # bad points logged this episode

    def __post_init__(self) -> None:
        self.bad_points = FailureLog(f"{self.failures.what}: bad readings", self.failures.logger)
        # A device's failure reason is a sentence a technician acts on: each new one is worth its line.
        self.failures.reasons_logged = max(self.failures.reasons_logged, DEVICE_REASONS_LOGGED)

    def points_bad(self, bad: dict[str, str], total: int | None = None) -> None:
        """Points of the device are bad (point -> reason): each is named at ERROR once per episode, the
        first ones in the episode's first line, a point that goes bad later in a line of its own."""
        new = {point: reason for point, reason in bad.items() if point not in self._named}
        of = f" of {total}" if total is not None else ""
        if self.bad_points.failing and new:
            self.bad_points.logger.error("%s: %d more point(s) bad: %s", self.bad_points.what, len(new),
                                         name_bad_points(new))
        self.bad_points.failed(f"{len(bad)}{of} points bad: {name_bad_points(bad)}")
        if len(self._named) < 10_000:  # a bound for a server that invents point names; never reached in practice
            self._named.update(new)

    def points_good(self) -> None:
        self.bad_points.succeeded()
        self._named.clear()

    @property
    def state(self) -> str:
        if self.failures.failing:
            return "failing"
        return "ok" if self.polls_ok else "starting"


NAMED_BAD_POINTS = 20


def name_bad_points(bad: dict[str, str]) -> str:
    """Each bad point with its reason, points that share a reason together ("a, b: BadNodeIdUnknown; c: Modbus
    exception 2 ..."); at most NAMED_BAD_POINTS names, so that a device of 500 dead points stays one line."""
    by_reason: dict[str, list[str]] = {}
    for point, reason in list(bad.items())[:NAMED_BAD_POINTS]:
        by_reason.setdefault(reason, []).append(point)
    text = "; ".join(f"{', '.join(points)}: {reason}" for reason, points in by_reason.items())
    more = len(bad) - NAMED_BAD_POINTS
    return f"{text}; and {more} more" if more > 0 else text
