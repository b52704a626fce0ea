"""The `edge-agent` command line: run the daemon, check a config, print its schema, run the demo.

Exit codes: 0 success, 1 runtime failure, 2 usage error, 78 (EX_CONFIG) bad configuration, so that
systemd's RestartPreventExitStatus=78 stops a restart loop on a config a person must fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.errors import EX_CONFIG, ConfigError

if TYPE_CHECKING:  # the config module loads pydantic: only the commands that need it import it
    from agent.config import AgentConfig


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # These bring their own parsers and libraries (paho, jsonschema): loaded only when asked for, so that
    # `edge-agent run` starts without them.
    if argv[:1] == ["simulate"]:
        from drivers.modbus.simulator import main as simulate

        return simulate(argv[1:])
    if argv[:1] in (["modbus"], ["opcua"]):
        # The technician's tools of a driver live beside it: drivers/<name>/cli.py, `main(argv) -> int`.
        import importlib

        return int(importlib.import_module(f"drivers.{argv[0]}.cli").main(argv[1:]))
    if argv[:1] == ["demand"]:
        from energy.cli import main as demand

        return demand(argv[1:])
    if argv[:1] == ["monitor"]:
        from agent import monitor

        monitor_parser = argparse.ArgumentParser(prog="edge-agent monitor", description=monitor.__doc__)
        monitor.add_arguments(monitor_parser)
        return monitor.run(monitor_parser.parse_args(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        from agent.logs import error_lines

        print(error_lines(exc.render()), file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edge-agent check ... | head`
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the agent (the daemon)")
    run.add_argument("--config", "-c", type=Path, required=True, help="the TOML config file")
    _log_options(run)
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("check", help="validate a config and print what would be polled")
    check.add_argument("--config", "-c", type=Path, required=True)
    check.set_defaults(handler=_cmd_check)

    status = commands.add_parser("status", help="the running agent, one line per device (from its metrics endpoint)")
    status.add_argument("--config", "-c", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="the raw status snapshot")
    status.set_defaults(handler=_cmd_status)

    buffer = commands.add_parser("buffer", help="look into the buffer (works while the agent runs)")
    buffer_commands = buffer.add_subparsers(dest="buffer_command", metavar="COMMAND", required=True)
    stats = buffer_commands.add_parser("stats", help="depth, oldest reading's age, bytes on disk, losses, in flight")
    stats.add_argument("--config", "-c", type=Path, required=True)
    stats.add_argument("--json", action="store_true", help="one JSON object instead of lines for a person")
    stats.set_defaults(handler=_cmd_buffer_stats)

    commands.add_parser("monitor", help="the platform's view: validate what gateways deliver, find gaps and "
                                        "duplicates: monitor --help")

    commands.add_parser("demand", help="maximum demand per meter this month and the last 12, and the last windows "
                                       "with their flags (docs/energy.md): demand --help")

    schema = commands.add_parser("schema", help="print the JSON Schema of the config file, for editors")
    schema.set_defaults(handler=_cmd_schema)

    demo = commands.add_parser("demo", help="run the whole product on this machine with simulated devices")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                      help="auto: mosquitto when installed, else the embedded Python broker")
    demo.add_argument("--state-dir", type=Path, default=None,
                      help="where the demo keeps its buffer (default: a temporary directory)")
    demo.add_argument("--quiet", action="store_true", help="no live view, only the summary")
    _log_options(demo, default_level="warning")
    demo.set_defaults(handler=_cmd_demo)

    commands.add_parser("simulate", help="serve simulated Modbus TCP devices: simulate --help")
    commands.add_parser("modbus", help="technician's tools: read, scan, poll a Modbus device: modbus --help")
    commands.add_parser("opcua", help="technician's tools: browse and read an OPC-UA server: opcua --help")
    return parser


def _log_options(parser: argparse.ArgumentParser, default_level: str = "info") -> None:
    parser.add_argument("--log-level", default=default_level, choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", default="auto", choices=("auto", "text", "json"),
                        help="auto: plain lines for journald, timestamps on a terminal")


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.logs import setup_logging
    from buffer.store import BufferUnavailable

    config = load_config(args.config)
    setup_logging(args.log_level, args.log_format)
    try:
        asyncio.run(_run_until_signalled(config))
    except BufferUnavailable as exc:
        from agent.logs import error_lines

        print(error_lines(f"edge-agent: {exc}"), file=sys.stderr)
        return 1
    return 0


async def _run_until_signalled(config: AgentConfig) -> None:
    from agent.daemon import Agent

    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, agent.request_reload)  # systemctl reload
    await agent.run(stop)


def _cmd_check(args: argparse.Namespace) -> int:
    from agent.config import load_config

    config = load_config(args.config)
    print(f"{config.source}: OK")
    for warning in config.metrics.warnings():
        print(f"warning: {warning}")
    print(f"gateway {config.gateway.id} at site {config.gateway.site}")
    print(f"buffer {config.buffer.path} (cap {config.buffer.max_bytes} bytes, durability {config.buffer.durability})")
    tls = "TLS" if config.mqtt.tls_enabled else "no TLS"
    print(f"mqtt {config.mqtt.host}:{config.mqtt.effective_port} ({tls}, MQTT {config.mqtt.protocol}), "
          f"topics {config.mqtt.topic_prefix}/{config.gateway.site}/{config.gateway.id}/...")
    import drivers

    for device in config.devices:
        describe = getattr(drivers.load(device.driver), "describe", None)
        lines = describe(device) if describe else [f"device {device.name} ({device.driver})"]
        print("\n".join(lines))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from agent.config import load_config

    config = load_config(args.config)
    if not config.metrics.enabled:
        print("edge-agent: [metrics] enabled = false in the config: the running agent cannot be asked",
              file=sys.stderr)
        return 1
    settings = config.metrics
    # The listener's own address: this command runs on the gateway, so the request does not leave it.
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"{'https' if settings.tls_enabled else 'http'}://{host}:{settings.port}/status.json"
    request = urllib.request.Request(url)
    if settings.password_file is not None:
        import base64

        from agent.config import read_first_line

        token = base64.b64encode(b"edge-agent:" + read_first_line(settings.password_file).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    import ssl

    try:
        # With HTTPS, the certificate is verified, pinned to the agent's own tls_cert_file: a self-signed
        # certificate made for the gateway's plant-side IP has no CA and no name this address would match
        # (agent/metrics.py local_client_tls says why that is no weaker).
        context = None
        if settings.tls_enabled:
            from agent.metrics import local_client_tls

            assert settings.tls_cert_file is not None
            context = local_client_tls(settings.tls_cert_file)
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            status = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ssl.SSLError):
            print(f"edge-agent: the agent at {url} answered, but TLS failed ({reason}): it must serve the "
                  f"certificate in {settings.tls_cert_file}, and it reads [metrics] only at start: restart it "
                  "after changing the certificate or the tls keys (systemctl restart edge-agent)", file=sys.stderr)
        else:
            print(f"edge-agent: no answer from the agent at {url} ({reason}): is it running "
                  "(systemctl status edge-agent)?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status))
        return 0
    buffer = status["buffer"]
    from buffer.store import LOSS_REASONS

    lost = sum(buffer.get(reason, 0) for reason in LOSS_REASONS)
    print(f"gateway {status['gateway']} at {status['site']}, up {_age(status['uptime_s'])}; broker "
          f"{'connected' if status['mqtt_connected'] else 'NOT CONNECTED'}, {status['uplink']['inflight']} in flight")
    print(f"buffer  {buffer['readings']} readings waiting (oldest {_age(buffer['oldest_age_s'])}), "
          f"{buffer['bytes']:,} bytes, {lost} lost (limits, disk, broker refusals)"
          f"{'; DISK FULL' if buffer.get('disk_full') else ''}")
    print(f"{'device':<20} {'state':<9} {'polls ok':>9} {'failed':>7} {'overruns':>8} {'bad':>6} {'last poll':>10}  "
          "last success / last error")
    for name, device in status["devices"].items():
        detail = device["last_error"] or device["last_success"] or "-"
        print(f"{name:<20} {device['state']:<9} {device['polls_ok']:>9} {device['polls_failed']:>7} "
              f"{device['overruns']:>8} {device['bad_readings']:>6} {device['last_poll_ms']:>8.1f}ms  {detail}")
    for line in status.get("lines", []):
        print(f"line {line['line']}: {line['utilisation']:.0%} busy, {len(line['devices'])} device(s), "
              f"{line['requests']} requests, {line['timeouts']} timeouts, {line['queue']} waiting"
              f"{_line_errors(line)}")
    if "clock" in status:
        from energy.cli import clock_line

        print(clock_line(status["clock"], status.get("energy")))
    return 0


def _line_errors(line: dict[str, object]) -> str:
    """What a line's receive path threw away, when it threw anything (drivers/modbus/README.md)."""
    reasons = line.get("discarded")
    discarded = sum(reasons.values()) if isinstance(reasons, dict) else 0
    figures = [(line.get("crc_errors", 0), "CRC errors"), (line.get("framing_errors", 0), "framing errors"),
               (discarded, "replies discarded"), (line.get("disconnects", 0), "disconnects")]
    shown = [f"{count} {what}" for count, what in figures if count]
    return f"; {', '.join(shown)}" if shown else ""


def _cmd_buffer_stats(args: argparse.Namespace) -> int:
    import time

    from agent.config import load_config
    from agent.payload import iso_utc
    from buffer.store import BufferUnavailable, read_stats

    config = load_config(args.config)
    try:
        stats = read_stats(config.buffer.path)
    except BufferUnavailable as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats))
        return 0
    cap = config.buffer.max_bytes
    oldest = "none" if stats["oldest_ts"] is None else \
        f"{iso_utc(stats['oldest_ts'])} ({_age(stats['oldest_age_s'])} ago)"
    inflight = "unknown (the agent has not reported yet)" if stats["inflight"] is None else \
        f"{stats['inflight']} messages (as the agent reported {_age(time.time() - stats['inflight_noted'])} ago)"
    print(f"buffer      {stats['path']} (id {stats['buffer_id']})")
    print(f"depth       {stats['readings']} readings in {stats['rows']} rows waiting for the broker")
    print(f"oldest      {oldest}")
    print(f"on disk     {stats['bytes_on_disk']:,} bytes (cap {cap:,}, policy {config.buffer.on_full})")
    print(f"lost        {stats['dropped']} readings: {stats['dropped_oldest']} dropped at the cap, "
          f"{stats['rejected']} refused at the cap, {stats['expired']} older than max_age, {stats['unstored']} not "
          f"stored (disk full, write errors), {stats['refused']} refused by the broker; {stats['skipped']} numbers "
          f"skipped after the file lost commits")
    print(f"in flight   {inflight}")
    print(f"next seq    {stats['next_seq']}")
    return 0


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _cmd_schema(args: argparse.Namespace) -> int:
    from agent.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo.run import run_demo
    from agent.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    return run_demo(duration=args.duration, broker=args.broker, state_dir=args.state_dir, quiet=args.quiet)



if __name__ == "__main__":
    sys.exit(main())
