"""`edge-agent opcua ...`: the technician's tools for an OPC-UA server, with the same security options as
the config.

    edge-agent opcua browse opc.tcp://192.168.10.30:4840 --depth 4
    edge-agent opcua browse URL --select 'Plant/Boiler/*' --write-config boiler.toml
    edge-agent opcua read URL 'nsu=urn:example:plant;s=Boiler.Temperature' 'ns=2;i=1001'

Exit codes: 0 done, 1 the server could not be reached or refused us, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.opcua.config import SECURE_POLICIES, browse_path_elements, node_id_problem

DEFAULT_DEPTH = 3


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from agent.errors import DeviceError

    try:
        return asyncio.run(args.handler(args))
    except DeviceError as exc:
        print(f"edge-agent opcua: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent opcua", description="Browse and read an OPC-UA server.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    browse = commands.add_parser("browse", help="print the address space as a tree; optionally write a config "
                                                "snippet for chosen nodes")
    browse.add_argument("url", help="endpoint URL, opc.tcp://host:port[/path]")
    browse.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help=f"levels below the start (default "
                                                                          f"{DEFAULT_DEPTH})")
    browse.add_argument("--start", default=None, help="NodeId to start from (default: the Objects folder)")
    browse.add_argument("--all", action="store_true", help="include the server's own Server object")
    browse.add_argument("--select", action="append", default=[], metavar="PATTERN",
                        help="variables whose path (Plant/Boiler/Temperature) matches this glob go into the "
                             "snippet; repeatable (default: every variable shown)")
    browse.add_argument("--write-config", type=Path, metavar="FILE",
                        help="write a [[devices]] snippet with the selected variables to FILE ('-': stdout)")
    browse.add_argument("--device-name", default="opcua-device", help="name of the device in the snippet")
    _security_options(browse)
    browse.set_defaults(handler=_browse)
    read = commands.add_parser("read", help="read nodes once: value, quality, timestamps")
    read.add_argument("url")
    read.add_argument("nodes", nargs="+", metavar="NODE",
                      help='NodeId ("ns=2;s=Boiler.Temp", "nsu=URI;i=5") or browse path from Objects '
                           '("2:Plant/2:Boiler/2:Temperature", or "plant:Plant/plant:Boiler" with --namespace)')
    read.add_argument("--namespace", action="append", default=[], metavar="ALIAS=URI", type=_namespace,
                      help="an alias for browse paths, as in the device's `namespaces` (repeatable)")
    _security_options(read)
    read.set_defaults(handler=_read)
    return parser


def _namespace(text: str) -> tuple[str, str]:
    alias, equals, uri = text.partition("=")
    if not equals or not alias or not uri:
        raise argparse.ArgumentTypeError(f"{text!r}: write ALIAS=URI, e.g. plant=urn:example:boiler-plc")
    return alias, uri


def _alias_problem(path: str, namespaces: dict[str, str]) -> str | None:
    """Why a browse path's alias cannot be used here, in words (None: every alias is known)."""
    for prefix, name in browse_path_elements(path):
        if prefix is not None and not prefix.isdigit() and prefix not in namespaces:
            return (f"the namespace alias {prefix!r} is not known here: add --namespace {prefix}=URI (as in the "
                    f"device's `namespaces`), or write the namespace index (2:{name})")
    return None


def _security_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (as in the config)")
    group.add_argument("--security-mode", choices=("None", "Sign", "SignAndEncrypt"), default="None")
    group.add_argument("--security-policy", choices=("None", *SECURE_POLICIES), default="None")
    group.add_argument("--username")
    group.add_argument("--password-file", type=Path)
    group.add_argument("--password-env", metavar="VARIABLE")
    group.add_argument("--user-certificate", type=Path)
    group.add_argument("--user-private-key", type=Path)
    group.add_argument("--certificate-dir", type=Path, default=None,
                       help="the agent's application certificate (default: /var/lib/edge-agent/opcua if "
                            "writable, else ~/.local/state/edge-agent/opcua)")
    group.add_argument("--trust-dir", type=Path, help="trusted server certificates (default: CERTIFICATE_DIR/trusted)")
    group.add_argument("--trust-on-first-use", action="store_true",
                       help="trust and store the server's certificate if none for it is trusted yet")
    group.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")


def _security(args: argparse.Namespace) -> Any:
    from drivers.opcua.connection import Security

    if (args.security_mode == "None") != (args.security_policy == "None"):
        raise SystemExit("edge-agent opcua: --security-mode Sign/SignAndEncrypt goes with a --security-policy "
                         "(and None with None)")
    if args.username and not (args.password_file or args.password_env):
        raise SystemExit("edge-agent opcua: --username needs --password-file or --password-env "
                         "(a password is never taken on the command line)")
    certificate_dir = args.certificate_dir
    if certificate_dir is None:
        system = Path("/var/lib/edge-agent")
        certificate_dir = system / "opcua" if os.access(system, os.W_OK) else \
            Path.home() / ".local/state/edge-agent/opcua"
    return Security(args.url, args.timeout, 5.0, args.security_mode, args.security_policy, args.username,
                    args.password_file, args.password_env, args.user_certificate, args.user_private_key,
                    certificate_dir, args.trust_dir, args.trust_on_first_use)


# --- read ----------------------------------------------------------------------------------------------------

async def _read(args: argparse.Namespace) -> int:
    from asyncua import ua

    from drivers.opcua.connection import browse_path, close_quietly, connect, parse_node_id, read
    from drivers.opcua.values import to_reading

    security = _security(args)
    namespaces = dict(args.namespace)
    client = await connect(security)
    try:
        index_of = {uri: i for i, uri in enumerate(await client.get_namespace_array())}
        node_ids: list[Any] = []
        problems: dict[int, str] = {}
        for i, text in enumerate(args.nodes):
            try:
                if re.match(r"^(ns=|nsu=|[isgb]=)", text):
                    problem = node_id_problem(text)
                    if problem:
                        raise LookupError(problem)
                    node_ids.append(parse_node_id(text, index_of))
                else:
                    problem = _alias_problem(text, namespaces)
                    if problem:
                        raise LookupError(problem)
                    result = (await client.uaclient.translate_browsepaths_to_nodeids(
                        [browse_path(text, namespaces, index_of)]))[0]
                    if not result.StatusCode.is_good() or not result.Targets:
                        raise LookupError(f"browse path not found ({result.StatusCode.name})")
                    target = result.Targets[0].TargetId
                    node_ids.append(ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType))
            except (LookupError, ValueError) as exc:
                problems[i] = str(exc.args[0] if exc.args else exc)
                node_ids.append(None)
        wanted = [n for n in node_ids if n is not None]
        values = iter(await read(client, wanted)) if wanted else iter(())
        width = max(len(t) for t in args.nodes)
        for i, text in enumerate(args.nodes):
            if i in problems:
                print(f"{text:<{width}}  bad  {problems[i]}")
                continue
            reading = to_reading(text, None, next(values))
            times = "".join(f"  {label} {_iso(ts)}" for label, ts in (("source", reading.source_ts),
                                                                       ("server", reading.server_ts)) if ts)
            reason = f" ({reading.reason})" if reading.reason else ""
            print(f"{text:<{width}}  {reading.value!r}  {reading.quality.value}{reason}{times}")
        return 0
    finally:
        await close_quietly(client)


def _iso(ts: float) -> str:
    from agent.payload import iso_utc

    return iso_utc(ts)


# --- browse --------------------------------------------------------------------------------------------------

@dataclass
class _Variable:
    path: str
    node_id: str      # with nsu=, stable across namespace renumbering
    data_type: str
    value: Any
    supported: str | None  # None: a value the agent can send; else why not


async def _browse(args: argparse.Namespace) -> int:
    from asyncua import ua

    from drivers.opcua.connection import close_quietly, connect

    security = _security(args)
    client = await connect(security)
    try:
        namespaces = await client.get_namespace_array()
        start = client.get_node(args.start) if args.start else client.nodes.objects
        found: list[_Variable] = []
        await _walk(client, start, 0, args.depth, "", namespaces, args.all, found)
    except (ConnectionError, OSError, TimeoutError, ua.UaError) as exc:
        from agent.errors import DeviceError
        from drivers.opcua.connection import describe_failure

        raise DeviceError(describe_failure(exc, security)) from exc
    finally:
        await close_quietly(client)
    if args.write_config is not None:
        chosen = [v for v in found if not args.select or any(fnmatch.fnmatchcase(v.path, p) for p in args.select)]
        text = snippet(args.device_name, args.url, chosen, security)
        if str(args.write_config) == "-":
            print(text, end="")
        else:
            args.write_config.write_text(text, encoding="utf-8")
            print(f"wrote {sum(1 for v in chosen if v.supported is None)} point(s) to {args.write_config}",
                  file=sys.stderr)
    return 0


async def _walk(client: Any, node: Any, level: int, depth: int, path: str, namespaces: list[str],
                include_server: bool, found: list[_Variable]) -> None:
    from asyncua import ua

    from drivers.opcua.connection import read
    from drivers.opcua.values import convert

    if level >= depth:
        return
    children = await node.get_children_descriptions()
    variables = [c for c in children if c.NodeClass == ua.NodeClass.Variable]
    values = await read(client, [c.NodeId for c in variables]) if variables else []
    types = await _data_types(client, [c.NodeId for c in variables])
    value_of = {c.NodeId.to_string(): (v, t) for c, v, t in zip(variables, values, types, strict=True)}
    indent = "  " * level
    for child in children:
        if not include_server and child.NodeId == ua.NodeId(ua.ObjectIds.Server):
            continue
        browse_name = f"{child.BrowseName.NamespaceIndex}:{child.BrowseName.Name}" \
            if child.BrowseName.NamespaceIndex else child.BrowseName.Name
        node_id = child.NodeId.to_string()
        child_path = f"{path}/{child.BrowseName.Name}" if path else child.BrowseName.Name
        if child.NodeClass == ua.NodeClass.Variable:
            data, data_type = value_of[node_id]
            value, problem = convert(data.Value)
            shown = repr(value) if problem is None else f"<{problem.split(':')[0]}>"
            if not data.StatusCode.is_good():
                shown = data.StatusCode.name
            print(f"{indent}{browse_name}  {node_id}  {data_type} = {shown}")
            found.append(_Variable(child_path, _stable_id(child.NodeId, namespaces), data_type, value, problem))
        else:
            print(f"{indent}{browse_name}  {node_id}  {child.NodeClass.name}")
        if child.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable):
            await _walk(client, client.get_node(child.NodeId), level + 1, depth, child_path, namespaces,
                        include_server, found)


async def _data_types(client: Any, node_ids: list[Any]) -> list[str]:
    from asyncua import ua

    if not node_ids:
        return []
    params = ua.ReadParameters()
    params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.DataType) for n in node_ids]
    out = []
    for data in await client.uaclient.read(params):
        type_id = data.Value.Value if data.Value is not None else None
        if isinstance(type_id, ua.NodeId) and type_id.NamespaceIndex == 0 and isinstance(type_id.Identifier, int):
            out.append(ua.ObjectIdNames.get(type_id.Identifier, type_id.to_string()))
        else:
            out.append(type_id.to_string() if isinstance(type_id, ua.NodeId) else "?")
    return out


def _stable_id(node_id: Any, namespaces: list[str]) -> str:
    text = node_id.to_string()
    if node_id.NamespaceIndex and node_id.NamespaceIndex < len(namespaces):
        return re.sub(r"^ns=\d+;", f"nsu={namespaces[node_id.NamespaceIndex]};", text)
    return text


def snippet(device_name: str, url: str, variables: list[_Variable], security: Any) -> str:
    """A [[devices]] table for the chosen variables: node ids with namespace URIs, names from browse names."""
    lines = ["[[devices]]", f'name = "{device_name}"', 'driver = "opcua"', f'endpoint = "{url}"',
             'mode = "read"                   # or "subscribe"', 'poll_interval = "1s"']
    if security.security_mode != "None":
        lines += [f'security_mode = "{security.security_mode}"', f'security_policy = "{security.security_policy}"']
    if security.username:
        lines.append(f'username = "{security.username}"')
        lines.append(f'password_file = "{security.password_file}"' if security.password_file else
                     f'password_env = "{security.password_env}"')
    lines.append("points = [")
    used: set[str] = set()
    for variable in variables:
        name = _point_name(variable.path, used)
        entry = f'  {{ name = "{name}", node_id = {_toml_string(variable.node_id)} }},'
        if variable.supported is None:
            lines.append(f"{entry}  # {variable.data_type} {variable.value!r:.30}")
        else:
            lines.append(f"  # {entry.strip()}  # not sendable: {variable.supported.split(':')[0]}")
    lines.append("]")
    return "\n".join(lines) + "\n"


def _point_name(path: str, used: set[str]) -> str:
    parts = [re.sub(r"[^A-Za-z0-9_.-]+", "_", p).strip("_.-") for p in path.split("/")]
    base = "_".join(p for p in parts[-2:] if p)[:60] or "point"
    if not base[0].isalnum():
        base = "p" + base
    name, n = base, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
