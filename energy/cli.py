"""`edge-agent demand --config F`: the gateway's own answer to "what was our peak this month, and when?",
from the local history (energy/history.py); works while the agent runs, and without the platform."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
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
