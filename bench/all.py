"""Every benchmark in one command, and the generated summary in docs/benchmarks.md.

Runs each benchmark as its own process (`python -m bench.<name> ...`, one after the other, so that they do
not compete for the cores), collects the JSON object each prints, and rewrites only the generated region of
docs/benchmarks.md (between the two marker comments): one row per target of issue 7 with the figure
reached, the load shape and whether it is met; the machine and the date; the raw JSON of every run. The
narrative sections of the page are written by people and stay as they are.

A benchmark that fails is reported as failed in its rows (with the tail of its stderr in the raw JSON) and
the others still run; the exit code is then 1.

    python -m bench.all            # about 15 minutes on a 2-core machine
    python -m bench.all --quick    # a smoke run of about 3 minutes: shorter windows, smaller backlog
    python -m bench.all --hour     # the soak in the issue's shape: one hour, a ten-minute outage
    python -m bench.all --reset    # put the placeholder back instead of figures
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.demo.mosquitto import find_mosquitto

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- bench/all.py: generated, do not edit by hand -->"
END = "<!-- end of generated -->"
PLACEHOLDER = "not generated yet: run make bench-all"


@dataclass
class Bench:
    name: str  # key in the results
    module: str
    args: list[str]
    quick_args: list[str]
    timeout: float  # seconds, the full run's; a quick run gets the same


ENCODINGS = ("json", "cbor")  # the agent's data messages: every end-to-end figure is taken with each


def suffix(encoding: str) -> str:
    """Result names: "e2e_50x50" is JSON (the default), "e2e_50x50_cbor" the compact encoding."""
    return "" if encoding == "json" else f"_{encoding}"


def plan(hour: bool, e2e_shapes: list[tuple[int, int]]) -> list[Bench]:
    benches = [
        Bench(f"e2e_{d}x{p}{suffix(e)}", "bench.e2e",
              ["--devices", str(d), "--points", str(p), "--duration", "30", "--percentiles", "--encoding", e],
              ["--devices", str(d), "--points", str(p), "--duration", "10", "--warmup", "4", "--percentiles",
               "--encoding", e], timeout=600)
        for d, p in e2e_shapes for e in ENCODINGS]
    benches += [
        Bench(f"ceiling{suffix(e)}", "bench.ceiling", ["--duration", "15", "--encoding", e],
              ["--duration", "5", "--encoding", e], timeout=300) for e in ENCODINGS]
    benches += [
        Bench("buffer", "bench.buffer", [], ["--polls", "4000"], timeout=300),
        Bench("drain", "bench.drain", ["--backlog", "500000"], ["--backlog", "100000"], timeout=900),
        Bench("startup", "bench.startup", ["--runs", "5"], ["--runs", "3"], timeout=300),
        *(Bench(f"soak{suffix(e)}", "bench.soak", (["--hour", "--outage", "600"] if hour else []) + ["--encoding", e],
                ["--duration", "60", "--outage", "20", "--warmup", "10", "--encoding", e],
                timeout=4500 if hour else 900) for e in ENCODINGS),
        Bench("opcua", "bench.opcua", ["--nodes", "1000", "--duration", "10"],
              ["--nodes", "1000", "--duration", "3"], timeout=300),
    ]
    for encoding in compact_encodings():  # bench/buffer.py with each non-JSON encoding it offers
        benches.append(Bench(f"buffer_{encoding}", "bench.buffer", ["--encoding", encoding],
                             ["--polls", "4000", "--encoding", encoding], timeout=300))
    return benches


def compact_encodings() -> list[str]:
    """The choices of bench/buffer.py's --encoding option other than JSON, if it has one."""
    result = subprocess.run([sys.executable, "-m", "bench.buffer", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    found = re.search(r"--encoding \{([^}]*)\}", result.stdout)
    return [c for c in found.group(1).split(",") if c.strip() and c.strip() != "json"] if found else []


def run_one(bench: Bench, quick: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", bench.module, *(bench.quick_args if quick else bench.args)]
    print(f"bench/all.py: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=bench.timeout)
    except subprocess.TimeoutExpired as exc:  # subprocess.run kills the benchmark (by its PID) on timeout
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return {"failed": f"no result within {bench.timeout:.0f} s", "stderr_tail": stderr[-2000:],
                "command": command[1:]}
    elapsed = round(time.monotonic() - started, 1)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    try:
        figures = json.loads(lines[-1]) if lines else None
    except ValueError:
        figures = None
    if result.returncode != 0 or not isinstance(figures, dict):
        return {"failed": f"exit code {result.returncode}" if result.returncode else "no JSON object printed",
                "stderr_tail": result.stderr[-2000:], "command": command[1:], "wall_s": elapsed}
    figures["_run"] = {"command": " ".join(command[1:]), "wall_s": elapsed}
    return figures


# --- the machine ------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    mem_kb = first("/proc/meminfo", "MemTotal")
    binary = find_mosquitto()
    mosquitto = None
    if binary:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"mosquitto version (\S+)", out)
        mosquitto = found.group(1) if found else None
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem_kb.split()[0]) / 1024 / 1024, 1) if mem_kb else None,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "pymodbus": version("pymodbus"), "paho-mqtt": version("paho-mqtt"), "asyncua": version("asyncua"),
        "mosquitto": mosquitto,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_version() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (with uncommitted changes)" if dirty else commit


# --- the targets ------------------------------------------------------------------------------------------

def num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "?"
    if isinstance(value, int | float):
        return f"{value:,}" if isinstance(value, int) and not digits else f"{value:,.{digits}f}"
    return str(value)


def ok(condition: bool | None) -> str:
    return "not measured" if condition is None else ("yes" if condition else "no")


def usable(results: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    figures = results.get(name)
    return figures if figures is not None and "failed" not in figures else None


def failed(results: dict[str, dict[str, Any]], *names: str) -> str:
    why = [f"{n}: {results[n]['failed']}" for n in names if n in results and "failed" in results[n]]
    return "benchmark failed (" + "; ".join(why) + ")" if why else "not run"


def e2e_shape(figures: dict[str, Any]) -> str:
    load = figures["load"]
    return (f"{load['devices']} devices x {load['points_per_device']} float32 at {load['interval_s']:g} s, "
            f"{load['duration_s']:g} s measured, {load.get('encoding', 'json')}")


def met_with(met: dict[str, bool]) -> str:
    """Whether a target is met, by encoding: "yes", "yes with cbor (json: no)", "no"."""
    if not met:
        return "not measured"
    if all(met.values()):
        return "yes" + (f" ({' and '.join(met)})" if len(met) > 1 else "")
    good = [e for e, m in met.items() if m]
    if good:
        return f"yes with {', '.join(good)} (" + ", ".join(f"{e}: no" for e, m in met.items() if not m) + ")"
    return "no"


def target_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    e2e = {name: f for name in results if name.startswith("e2e_") and (f := usable(results, name))}
    e2e_names = [n for n in results if n.startswith("e2e_")]

    # 1. CPU per reading
    parts, shapes, met1 = [], [], {}
    for encoding in ENCODINGS:
        small, large = e2e.get(f"e2e_50x50{suffix(encoding)}"), e2e.get(f"e2e_100x100{suffix(encoding)}")
        if not (small or large):
            continue
        met = True
        if small:
            us = small["agent_cpu_us_per_reading"]
            parts.append(f"{encoding}: {num(us, 2)} µs per reading at {num(small['readings_per_s'])} readings/s "
                         f"({num(200 / us if us else None)} x less than 200 µs)")
            shapes.append(e2e_shape(small))
            met = met and us is not None and us <= 10
        if large:
            us = large["agent_cpu_us_per_reading"]
            parts.append(f"{encoding}: {num(us, 2)} µs per reading at {num(large['readings_per_s'])} readings/s")
            shapes.append(e2e_shape(large))
            met = met and us is not None and us <= 8
        met1[encoding] = met and bool(small and large)
    if parts:
        rows.append(("1. CPU per reading, end to end: 8 µs or less at 10,000 readings/s; 20 x less than "
                     "200 µs at 50 x 50", "; ".join(parts), "; ".join(shapes), met_with(met1)))
    else:
        rows.append(("1. CPU per reading", failed(results, *e2e_names), "", "not measured"))

    # 2. agent / raw pymodbus
    parts, met2, shape = [], {}, ""
    for encoding in ENCODINGS:
        ceiling = usable(results, f"ceiling{suffix(encoding)}")
        if not ceiling:
            continue
        raw, agent, load = ceiling["raw_pymodbus"], ceiling["agent"], ceiling["load"]
        ratio = ceiling["agent_over_raw"]
        parts.append(f"{encoding}: {num(ratio, 2)} (agent {num(agent['readings_per_cpu_s'], 0)}, raw "
                     f"{num(raw['values_per_cpu_s'], 0)} per CPU-second)")
        shape = (f"{load['devices']} devices x {load['points_per_device']} float32 "
                 f"({load['registers_per_request']} registers per request), {load['duration_s']:g} s each")
        met2[encoding] = ratio is not None and ratio >= 0.7
    if parts:
        rows.append(("2. Agent readings per CPU-second at least 0.7 x raw pymodbus values per CPU-second",
                     "; ".join(parts), shape, met_with(met2)))
    else:
        rows.append(("2. Agent / raw pymodbus", failed(results, "ceiling", "ceiling_cbor"), "", "not measured"))

    # 3. throughput
    clean = [f for f in e2e.values() if f["lost"] == 0]
    if clean:
        best = max(clean, key=lambda f: f["readings_per_s"])
        rows.append(("3. Throughput: 100,000 readings/s sustained, nothing lost",
                     f"{num(best['readings_per_s'])} readings/s, highest of the shapes run, 0 lost (no shape "
                     "above it was run; add one with --e2e-shapes, and a profile for what limits it)",
                     e2e_shape(best), ok(best["readings_per_s"] >= 100_000)))
    else:
        rows.append(("3. Throughput", failed(results, *e2e_names) if e2e_names else "not run", "",
                     "not measured"))

    # 4. memory
    parts, shapes, met4, short = [], [], {}, False
    for encoding in ENCODINGS:
        soak = usable(results, f"soak{suffix(encoding)}")
        if not soak:
            continue
        load = soak["load"]
        warm = soak["rss_mb_at_warmup_end"]
        outage_growth = (soak["rss_mb_peak_during_outage"] - warm) / warm * 100
        met4[encoding] = soak["rss_mb_peak"] <= 60 and soak["rss_growth_percent"] < 5 and outage_growth < 5
        short = short or load["duration_s"] < 3600 or load["outage_s"] < 600
        parts.append(f"{encoding}: peak {num(soak['rss_mb_peak'])} MB; {num(warm)} MB after warm-up, "
                     f"{num(soak['rss_mb_at_end'])} MB at the end ({soak['rss_growth_percent']:+.1f} %); "
                     f"outage peak {num(soak['rss_mb_peak_during_outage'])} MB ({outage_growth:+.1f} %) with "
                     f"{num(soak['buffered_readings_at_outage_end'], 0)} readings buffered; {soak['lost']} lost")
        shapes.append(f"{load['devices']} devices x {load['points_per_device']} float32 at 1 s, "
                      f"{load['duration_s']:g} s with a {load['outage_s']:g} s broker outage, {encoding}")
    if parts:
        rows.append(("4. Memory: RSS 60 MB or less at 100 x 100; under 5 % growth over 1 h and a 10-min outage",
                     "; ".join(parts), "; ".join(shapes),
                     met_with(met4) + (" (shorter than the target's 1 h and 10 min)" if short else "")))
    else:
        rows.append(("4. Memory", failed(results, "soak", "soak_cbor"), "", "not measured"))

    # 5. latency
    if e2e:
        parts = [f"{name.removeprefix('e2e_')}: p95 {num(f['latency_p95_ms'])} ms (p50 {num(f['latency_p50_ms'])}, p99 "
                 f"{num(f.get('latency_ms', {}).get('p99'))}, max {num(f.get('latency_ms', {}).get('max'))})"
                 for name, f in e2e.items()]
        rows.append(("5. Latency, poll to broker, durable buffer: p95 20 ms or less", "; ".join(parts),
                     "; ".join(e2e_shape(f) for f in e2e.values()),
                     ok(all(f["latency_p95_ms"] <= 20 for f in e2e.values()))))
    else:
        rows.append(("5. Latency", failed(results, *e2e_names) if e2e_names else "not run", "", "not measured"))

    # 6. drain
    drain = usable(results, "drain")
    if drain:
        load, rate = drain["load"], drain["backlog_drain_readings_per_s"]
        rows.append(("6. Drain after an outage: 200,000 readings/s or more with live polling",
                     f"{num(rate, 0)} readings/s ({num(drain['drain_seconds_incl_agent_start'], 2)} s, agent start "
                     f"included), {drain['lost']} lost, {drain['duplicates']} duplicates",
                     f"backlog {num(load['backlog_readings'], 0)} readings, live {load['live_devices']} x "
                     f"{load['live_points_per_device']} at 1 s", ok(rate is not None and rate >= 200_000)))
    else:
        rows.append(("6. Drain", failed(results, "drain"), "", "not measured"))

    # 7. footprint
    buffer = usable(results, "buffer")
    if buffer:
        disk = buffer["bytes_per_reading_on_disk"]
        compact = {name.removeprefix("buffer_"): f for name in results
                   if name.startswith("buffer_") and (f := usable(results, name))}
        wire = ", ".join(f"{encoding}: "
                         f"{num(f['bytes_per_reading_on_the_wire'], 2)} bytes on the wire, "
                         f"{num(f['bytes_per_reading_on_disk'], 2)} on disk" for encoding, f in compact.items())
        best_wire = min((f["bytes_per_reading_on_the_wire"] for f in compact.values()), default=None)
        best_disk = min([disk, *(f["bytes_per_reading_on_disk"] for f in compact.values())])
        load = buffer["load"]
        rows.append(("7. Footprint: 8 bytes or less per reading on disk; compact wire encoding 12 bytes or less; "
                     "JSON available",
                     f"JSON: {num(disk, 2)} bytes on disk, {num(buffer['bytes_per_reading_on_the_wire'], 2)} on "
                     f"the wire; " + (wire if compact else "compact encoding: not measured"),
                     f"{num(load['polls'], 0)} polls of {load['points_per_poll']} float32, "
                     f"{load['polls_per_commit']} per commit, {load['durability']}",
                     ok(best_disk <= 8 and best_wire is not None and best_wire <= 12)
                     if compact else f"{ok(disk <= 8)} on disk; wire not measured"))
    else:
        rows.append(("7. Footprint", failed(results, "buffer"), "", "not measured"))

    # 8. start-up
    startup = usable(results, "startup")
    if startup:
        load = startup["load"]
        first = startup["start_to_first_request_without_alignment_ms"]
        imports = startup["imports"]
        heavy = ", ".join(f"{name} {imports[name]['cumulative_ms']:g} ms" for name in
                          ("pydantic", "pymodbus", "paho", "aiosqlite", "cryptography", "jsonschema", "asyncua")
                          if imports.get(name, {}).get("imported"))
        rows.append(("8. Start-up: process start to first poll in 1 s or less, Modbus-only config",
                     f"median {num(first['median'])} ms, max {num(first['max'])} ms to the first request "
                     f"(READY=1 at median {num(startup['start_to_ready_ms']['median'])} ms; waiting for the "
                     f"first tick added median {num(startup['tick_alignment_wait_ms']['median'])} ms more); "
                     f"asyncua {'not ' if startup['asyncua_absent'] else ''}imported; imports: {heavy}",
                     f"{load['devices']} devices x {load['points_per_device']} float32, Modbus TCP, interval "
                     f"{load['poll_interval_s']:g} s, {load['runs']} runs",
                     ok(first["median"] <= 1000 and startup["asyncua_absent"])))
    else:
        rows.append(("8. Start-up", failed(results, "startup"), "", "not measured"))
    return rows


# --- the page ---------------------------------------------------------------------------------------------

def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def generated(results: dict[str, dict[str, Any]], host: dict[str, Any], started: datetime.datetime,
              quick: bool, code: str) -> str:
    lines = ["## Targets of issue 7", "",
             f"Generated by `make bench-all` (`python -m bench.all{' --quick' if quick else ''}`) on "
             f"{started:%Y-%m-%d} (started {started:%H:%M} UTC), code {code}."
             + (" A quick run: short windows, figures only indicative." if quick else ""), "",
             "| Target | Figure reached | Load shape | Met |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cell(c) for c in row)} |" for row in target_rows(results)]
    versions = ", ".join(f"{name} {host[name]}" for name in ("pymodbus", "paho-mqtt", "asyncua", "mosquitto")
                         if host.get(name))
    lines += ["", f"Machine: {host['cpu'] or 'unknown CPU'}, {host['cores']} cores, {num(host['ram_gib'])} GiB, "
              f"{host['kernel']}, Python {host['python']}, {versions}. Load average when the run started: "
              f"{' / '.join(str(x) for x in host['load_average_at_start'])}, at the end: "
              f"{' / '.join(str(x) for x in host.get('load_average_at_end', ()))}. Every process (simulators, "
              "mosquitto, the agent, the subscribers) shares these cores; the benchmarks ran one after the other.",
              "", "<details><summary>Raw JSON of each run</summary>", ""]
    for name, figures in results.items():
        lines += [f"`{name}`", "", "```json", json.dumps(figures, indent=1, ensure_ascii=False), "```", ""]
    lines.append("</details>")
    return "\n".join(lines)


def rewrite_page(page: Path, body: str) -> None:
    """Replace what lies between the markers; insert the markers before the first section if absent."""
    text = page.read_text(encoding="utf-8")
    region = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + region + tail
    else:
        first_section = text.find("\n## ")
        at = first_section + 1 if first_section >= 0 else len(text)
        text = text[:at] + region + "\n\n" + text[at:]
    page.write_text(text, encoding="utf-8")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        devices, _, points = part.strip().partition("x")
        if not (devices.isdigit() and points.isdigit()):
            raise argparse.ArgumentTypeError(f"a shape is DEVICESxPOINTS, e.g. 50x50, got {part!r}")
        shapes.append((int(devices), int(points)))
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 3 minutes")
    parser.add_argument("--hour", action="store_true", help="the soak for one hour with a ten-minute outage")
    parser.add_argument("--e2e-shapes", type=parse_shapes, default=[(50, 50), (100, 100)],
                        help="end-to-end shapes, DEVICESxPOINTS at 1 s, comma-separated (default 50x50,100x100)")
    parser.add_argument("--only", help="comma-separated benchmark names to run (e.g. startup,soak)")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to write (default docs/benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print the generated region, leave the page")
    parser.add_argument("--reset", action="store_true", help=f'write the placeholder "{PLACEHOLDER}" and stop')
    args = parser.parse_args()
    if args.reset:
        rewrite_page(args.page, PLACEHOLDER)
        return 0
    if args.quick and args.hour:
        parser.error("--quick and --hour contradict each other")
    started = datetime.datetime.now(datetime.UTC)
    host, code = machine(), code_version()
    benches = plan(args.hour, args.e2e_shapes)
    if args.only:
        wanted = set(args.only.split(","))
        benches = [b for b in benches if b.name in wanted or b.module.removeprefix("bench.") in wanted]
    results: dict[str, dict[str, Any]] = {}
    for bench in benches:
        results[bench.name] = run_one(bench, args.quick)
        if "failed" in results[bench.name]:
            print(f"bench/all.py: {bench.name} failed: {results[bench.name]['failed']}", file=sys.stderr)
    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    body = generated(results, host, started, args.quick, code)
    if args.no_write:
        print(body)
    else:
        rewrite_page(args.page, body)
        print(f"bench/all.py: wrote {args.page}", file=sys.stderr)
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
