"""`edge-agent demand --config F`: the gateway's own answer to "what was our peak this month, and when?",
from the local history (energy/history.py); works while the agent runs, and without the platform."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

from agent.errors import EX_CONFIG, ConfigError


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent demand", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True, help="the TOML config file")
    parser.add_argument("--last", type=int, default=8, help="recent windows to show per meter (default 8)")
    args = parser.parse_args(list(argv))
    from agent.config import load_config
    from energy.history import History, report
    from energy.wiring import HISTORY_FILE, state_dir

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EX_CONFIG
    zones = [d.energy.timezone for d in config.devices if d.energy is not None]
    if not zones:
        print(f"{config.source}: no device has an energy table; nothing to report (docs/energy.md)")
        return 0
    path = state_dir(config) / HISTORY_FILE
    if not path.exists():
        print(f"no demand history yet at {path}: the agent writes it as windows close")
        return 0
    history = History(path)
    try:
        print(report(history, ZoneInfo(zones[0]), latest=args.last))
    finally:
        history.close()
    return 0


def clock_line(clock: dict[str, Any], energy: dict[str, Any] | None) -> str:
    """`edge-agent status`: the clock's health, and the energy stage's figures when it runs."""
    if not clock["known"]:
        text = "clock   synchronisation unknown (the kernel could not be asked)"
    elif clock["synchronised"]:
        text = f"clock   synchronised, estimated error {_ms(clock['esterror_s'])}, maximum {_ms(clock['maxerror_s'])}"
    else:
        text = "clock   NOT SYNCHRONISED (check chrony/timesyncd): timestamps and demand windows are flagged"
    if clock["steps"]:
        text += f"; stepped {clock['steps']} time(s) since the start, last {clock['last_step_s']:+.3f} s"
    if energy is not None:
        text += (f"\nenergy  {energy['meters']} meter(s), {energy['windows']} window(s) closed, "
                 f"{energy['alarms_active']} alarm level(s) raised now")
    return text


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1000:g} ms"
