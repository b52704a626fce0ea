"""A simulated meter whose power profile is known exactly: its counter is the analytic integral of the
profile, held as a register would hold it (integer steps of `resolution`, wrapping at `wrap`). Tests drive
the energy stage with its readings and compare every window with the integral between the two edges."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from agent.model import PollResult, Reading


@dataclass(frozen=True)
class Profile:
    """Power P(t) = base + ramp * (t - t0) + swing * sin(2 pi (t - t0) / period), kW; t in epoch seconds."""

    t0: float
    base: float
    ramp: float = 0.0  # kW per second
    swing: float = 0.0
    period: float = 3600.0

    def power_kw(self, t: float) -> float:
        x = t - self.t0
        return self.base + self.ramp * x + self.swing * math.sin(2 * math.pi * x / self.period)

    def energy_kwh(self, t: float) -> float:
        """The integral of P from t0 to t, in kWh."""
        x = t - self.t0
        w = 2 * math.pi / self.period
        joules_like = self.base * x + self.ramp * x * x / 2 + self.swing * (1 - math.cos(w * x)) / w
        return joules_like / 3600


@dataclass
class SimMeter:
    profile: Profile
    start_kwh: float = 1000.0
    resolution: float = 0.01  # counter step in kWh (a uint32 with scale 0.01)
    wrap: float | None = None  # counter modulus in kWh
    jump_at: float | None = None  # a replacement or reset: from this time the counter reads ...
    jump_to: float = 0.0  # ... this value plus the energy since jump_at

    def counter(self, t: float) -> float:
        if self.jump_at is not None and t >= self.jump_at:
            value = self.jump_to + self.profile.energy_kwh(t) - self.profile.energy_kwh(self.jump_at)
        else:
            value = self.start_kwh + self.profile.energy_kwh(t)
        steps = math.floor(value / self.resolution + 1e-9)
        value = round(steps * self.resolution, 6)
        if self.wrap is not None:
            value = round(value % self.wrap, 6)
        return value

    def analytic_kwh(self, a: float, b: float) -> float:
        return self.profile.energy_kwh(b) - self.profile.energy_kwh(a)


def poll_times(start: float, end: float, interval: float, skip: Callable[[float], bool] = lambda t: False,
               lag: float = 0.003) -> Iterator[float]:
    """Poll times on the interval grid (each a few ms late, as a real poll's clock read is), minus skipped."""
    n = math.ceil(start / interval)
    while n * interval < end:
        t = n * interval + lag
        if not skip(t):
            yield t
        n += 1


def polls(device: str, meter: SimMeter, times: Iterable[float], point: str = "energy_active_import",
          unit: str = "kWh", stamp: Callable[[float], float] = lambda t: t) -> Iterator[PollResult]:
    """PollResults as the scheduler hands them over: a power reading and the counter, stamped by `stamp`
    (a clock that may be stepped) at true time t."""
    for t in times:
        yield PollResult(device, stamp(t), (Reading("active_power", meter.profile.power_kw(t), "kW"),
                                            Reading(point, meter.counter(t), unit)))
