"""The config is validated completely before anything starts: every problem, with its dotted path, at once.

Bad configs are data-driven cases in the spirit of Telegraf's `testcases/<case>/{config, expected}`:
each is a TOML text and the exact list of (dotted path, message fragment) it must produce, no more and
no fewer. The command line is driven as a real subprocess, because the exit code (78, EX_CONFIG) is what
systemd sees.
"""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config, parse_bytes, parse_config, parse_duration
from agent.errors import EX_CONFIG, ConfigError


@pytest.fixture(autouse=True)
def _password_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The configs below name EDGE_MQTT_PASSWORD; an unset variable is a problem of its own (tested apart)."""
    monkeypatch.setenv("EDGE_MQTT_PASSWORD", "not-a-real-password")
    monkeypatch.delenv("EDGE_TEST_UNSET_VARIABLE", raising=False)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 30

GATEWAY = '[gateway]\nid = "gw-1"\nsite = "plant-a"\n'
POINT = '{ name = "voltage", function = "input", address = 0, type = "float32" }'


def device(name: str = "meter-1", points: str = POINT, extra: str = "") -> str:
    return f'[[devices]]\nname = "{name}"\ndriver = "modbus"\nhost = "10.0.0.5"\n{extra}points = [{points}]\n'


GOOD = GATEWAY + device()

# (case name, TOML text, every expected problem as (exact dotted path, fragment of the message))
BAD_CONFIGS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("missing gateway.id",
     '[gateway]\nsite = "plant-a"\n' + device(),
     [("gateway.id", "missing required key")]),
    ("missing point type in the second device",
     GATEWAY + device("meter-1") + device("meter-2", '{ name = "current", function = "input", address = 0 }'),
     [("devices[1].points[0].type", "missing required key")]),
    ("device port is not an integer",
     GATEWAY + device(extra='port = "abc"\n'),
     [("devices[0].port", "valid integer")]),
    ("mqtt port is not an integer",
     GATEWAY + '[mqtt]\nport = "abc"\n' + device(),
     [("mqtt.port", "valid integer")]),
    ("poll_interval is not a duration",
     GATEWAY + device(extra='poll_interval = "fast"\n'),
     [("devices[0].poll_interval", "expected a duration")]),
    ("unknown top-level key, near miss",
     'buffers = {}\n' + GOOD,
     [("buffers", "did you mean 'buffer'?")]),
    ("unknown top-level key, nothing close",
     'loglevel = "debug"\n' + GOOD,
     [("loglevel", "expected one of: gateway, buffer, mqtt, metrics, devices")]),
    ("unknown key in [mqtt]",
     GATEWAY + '[mqtt]\nhots = "broker.local"\n' + device(),
     [("mqtt.hots", "did you mean 'host'?")]),
    ("unknown key in [mqtt.tls]",
     GATEWAY + '[mqtt.tls]\nca_fil = "ca.pem"\n' + device(),
     [("mqtt.tls.ca_fil", "did you mean 'ca_file'?")]),
    ("unknown key in a point",
     GATEWAY + device(points='{ name = "v", function = "input", adress = 0, address = 0, type = "float32" }'),
     [("devices[0].points[0].adress", "did you mean 'address'?")]),
    ("unknown driver",
     GATEWAY + '[[devices]]\nname = "plc"\ndriver = "profinet"\n',
     [("devices[0].driver", "unknown driver 'profinet'; expected one of: modbus")]),
    ("missing driver",
     GATEWAY + '[[devices]]\nname = "plc"\nhost = "10.0.0.9"\n',
     [("devices[0].driver", "missing required key; expected one of: modbus")]),
    ("duplicate device name",
     GATEWAY + device("meter-1") + device("meter-1"),
     [("devices[1].name", "duplicate device name 'meter-1' (already used by devices[0])")]),
    ("duplicate point name",
     GATEWAY + device(points='{ name = "v", function = "input", address = 0, type = "float32" }, '
                             '{ name = "v", function = "input", address = 2, type = "float32" }'),
     [("devices[0].points[1].name", "duplicate point name 'v' (already used by points[0])")]),
    ("overlapping points",
     GATEWAY + device(points='{ name = "energy", function = "holding", address = 10, type = "uint32" }, '
                             '{ name = "power", function = "holding", address = 11, type = "int16" }'),
     [("devices[0].points[1].address", "overlaps points[0] ('energy') at holding register 11")]),
    ("same address in holding and input does not overlap, a float64 over a uint16 does",
     GATEWAY + device(points='{ name = "a", function = "holding", address = 0, type = "uint16" }, '
                             '{ name = "b", function = "input", address = 0, type = "uint16" }, '
                             '{ name = "c", function = "input", address = 1, type = "float64" }, '
                             '{ name = "d", function = "input", address = 4, type = "uint16" }'),
     [("devices[0].points[3].address", "overlaps points[2] ('c') at input register 4")]),
    ("32-bit type at the last address",
     GATEWAY + device(points='{ name = "v", function = "holding", address = 65535, type = "float32" }'),
     [("devices[0].points[0].address", "65535..65536 runs past the last address 65535")]),
    ("address out of range",
     GATEWAY + device(points='{ name = "v", function = "holding", address = 65536, type = "uint16" }'),
     [("devices[0].points[0].address", "less than or equal to 65535")]),
    ("name with a slash",
     GATEWAY + device("line/1"),
     [("devices[0].name", "'/' is not allowed: it separates topic levels; rename it to 'line-1'")]),
    ("point name with a slash",
     GATEWAY + device(points='{ name = "v/l1", function = "input", address = 0, type = "float32" }'),
     [("devices[0].points[0].name", "should match pattern")]),
    ("password without TLS",
     GATEWAY + '[mqtt]\nusername = "gw"\npassword_env = "EDGE_MQTT_PASSWORD"\n' + device(),
     [("mqtt.tls", "clear text")]),
    ("password_env naming a variable that is not set",
     GATEWAY + '[mqtt]\nusername = "gw"\npassword_env = "EDGE_TEST_UNSET_VARIABLE"\n[mqtt.tls]\n' + device(),
     [("mqtt.password_env", "EDGE_TEST_UNSET_VARIABLE is not set")]),
    ("password_file that does not exist",
     GATEWAY + '[mqtt]\nusername = "gw"\npassword_file = "/nonexistent/edge-agent/mqtt.pw"\n'
               'allow_password_without_tls = true\n' + device(),
     [("mqtt.password_file", "file not found: /nonexistent/edge-agent/mqtt.pw")]),
    ("TOML syntax error",
     '[gateway\nid = "gw-1"\n',
     [("", "not valid TOML")]),
    ("empty devices list",
     'devices = []\n' + GATEWAY,
     [("devices", "no devices configured")]),
    ("no devices at all",
     GATEWAY,
     [("devices", "no devices configured")]),
    ("wrong word order and scale 0",
     GATEWAY + device(points='{ name = "v", function = "input", address = 0, type = "float32", '
                             'word_order = "DBCA", scale = 0 }'),
     [("devices[0].points[0].word_order", "'ABCD', 'CDAB', 'BADC' or 'DCBA'"),
      ("devices[0].points[0].scale", "must not be 0")]),
    ("three independent problems in three sections",
     'loglevel = "debug"\n[gateway]\nsite = "plant-a"\n'
     + device(points='{ name = "v", function = "input", address = 0, type = "float16" }'),
     [("loglevel", "unknown key"), ("gateway.id", "missing required key"),
      ("devices[0].points[0].type", "float32")]),
]


def problems_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="case.toml")
    return [(p.where, p.message) for p in caught.value.problems]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(text, expected, id=name)
                                                for name, text, expected in BAD_CONFIGS])
def test_bad_config_reports_every_problem_with_its_dotted_path(text: str, expected: list[tuple[str, str]]) -> None:
    problems = problems_of(text)
    assert sorted(where for where, _ in problems) == sorted(where for where, _ in expected), problems
    for where, fragment in expected:
        messages = [message for at, message in problems if at == where]
        assert any(fragment in message for message in messages), (where, fragment, problems)


def test_many_problems_in_one_file_are_all_reported_and_rendered_with_the_file_name() -> None:
    text = (GATEWAY + '[mqtt]\nhots = "x"\n'
            + device("meter-1", extra='port = "abc"\n')
            + device("meter-1", points='{ name = "v", function = "input", address = 0 }')
            + '[[devices]]\nname = "plc"\ndriver = "profinet"\n')
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="/etc/edge-agent/agent.toml")
    wheres = [p.where for p in caught.value.problems]
    assert sorted(wheres) == sorted(["mqtt.hots", "devices[0].port", "devices[1].name",
                                     "devices[1].points[0].type", "devices[2].driver"])
    rendered = str(caught.value).splitlines()
    assert all(line.startswith("/etc/edge-agent/agent.toml: ") for line in rendered)
    assert "/etc/edge-agent/agent.toml: devices[1].points[0].type: missing required key" in rendered
    assert rendered[-1] == "/etc/edge-agent/agent.toml: 5 problems; nothing was started"


def test_mqtt_cross_field_problems_are_reported_even_when_gateway_is_invalid() -> None:
    text = ('[gateway]\nsite = "plant-a"\n[mqtt]\nusername = "gw"\npassword_env = "EDGE_MQTT_PASSWORD"\n'
            + device())
    assert sorted(where for where, _ in problems_of(text)) == ["gateway.id", "mqtt.tls"]


def test_point_problems_are_reported_even_when_other_fields_of_the_device_are_invalid() -> None:
    text = GATEWAY + device(extra='port = "abc"\n',
                            points='{ name = "energy", function = "holding", address = 10, type = "uint32" }, '
                                   '{ name = "power", function = "holding", address = 11, type = "int16" }, '
                                   '{ name = "energy", function = "input", address = 0, type = "uint16" }, '
                                   '{ name = "broken", function = "input", address = 5 }')
    assert sorted(where for where, _ in problems_of(text)) == [
        "devices[0].points[1].address", "devices[0].points[2].name", "devices[0].points[3].type",
        "devices[0].port"]


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + device("meter-2", extra='poll_interval = "15m"\ntimeout = "500ms"\n'), encoding="utf-8")
    config = load_config(path)
    assert isinstance(config, AgentConfig)
    assert config.source == str(path)
    assert [d.name for d in config.devices] == ["meter-1", "meter-2"]
    assert config.devices[0].poll_interval == 1.0
    assert config.devices[1].poll_interval == 900.0
    assert config.devices[1].timeout == 0.5
    assert config.mqtt.effective_port == 1883


def test_nonexistent_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.source == str(missing)
    assert "cannot read the config file" in caught.value.problems[0].message


def test_embedded_demo_config_validates() -> None:
    text = (importlib.resources.files("agent.demo") / "demo.toml").read_text(encoding="utf-8")
    config = parse_config(text, source="demo.toml")
    assert [d.name for d in config.devices] == ["power-meter", "env-sensor"]
    assert config.buffer.max_bytes == 256_000_000
    assert config.devices[0].timeout == 0.5


@pytest.mark.parametrize(("given", "seconds"), [
    ("500ms", 0.5), ("1s", 1.0), ("15m", 900.0), ("1h", 3600.0), ("1d", 86400.0), (2, 2), (0.25, 0.25),
    ("2", 2.0), (" 1.5 s ", 1.5),
])
def test_durations_parse(given: object, seconds: float) -> None:
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given", ["fast", "1 minute", "-1s", "1w", ""])
def test_bad_durations_are_rejected(given: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(given)


@pytest.mark.parametrize(("given", "size"), [
    ("256MB", 256 * 10**6), ("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1 gib", 2**30),
    ("1048576", 2**20), (1 << 21, 1 << 21), ("1.5GiB", 3 * 2**29),
])
def test_byte_sizes_parse(given: object, size: int) -> None:
    assert parse_bytes(given) == size


def test_byte_size_below_one_mebibyte_and_zero_duration_are_rejected() -> None:
    text = GATEWAY + '[buffer]\nmax_bytes = "10kB"\n' + device(extra="poll_interval = 0\n")
    assert sorted(where for where, _ in problems_of(text)) == ["buffer.max_bytes", "devices[0].poll_interval"]


# --- the command line, as systemd and a technician run it ------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=REPO_ROOT, check=False)


def test_check_bad_file_exits_78_naming_the_file_and_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GATEWAY + device("meter-1") + device("meter-2", '{ name = "i", function = "input", address = 0 }'),
                    encoding="utf-8")
    result = cli("check", "--config", str(path))
    assert result.returncode == EX_CONFIG, result
    assert f"{path}: devices[1].points[0].type: missing required key" in result.stderr
    assert "1 problem; nothing was started" in result.stderr
    assert result.stdout == ""


def test_check_nonexistent_file_exits_78_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    result = cli("check", "--config", str(path))
    assert result.returncode == EX_CONFIG, result
    assert f"{path}: cannot read the config file: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_good_file_prints_the_read_plan_with_both_numberings(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GATEWAY + device(points=POINT + ', { name = "energy", function = "holding", address = 99, '
                                                    'type = "uint32", word_order = "CDAB", unit = "Wh" }'),
                    encoding="utf-8")
    result = cli("check", "--config", str(path))
    assert result.returncode == 0, result
    assert f"{path}: OK" in result.stdout
    assert "2 points in 2 requests per poll" in result.stdout
    assert "FC04 input registers 0..1 (30001..30002), 2 registers" in result.stdout
    assert "FC03 holding registers 99..100 (40100..40101), 2 registers" in result.stdout
    assert "(30001) float32" in result.stdout
    assert "(40100) uint32  CDAB" in result.stdout


def test_run_with_a_bad_config_exits_78_without_starting_anything(tmp_path: Path) -> None:
    buffer_path = tmp_path / "buffer.db"
    path = tmp_path / "bad.toml"
    path.write_text(GATEWAY + f'[buffer]\npath = "{buffer_path}"\n' + device(extra='port = "abc"\n'),
                    encoding="utf-8")
    result = cli("run", "--config", str(path))
    assert result.returncode == EX_CONFIG, result
    assert f"{path}: devices[0].port:" in result.stderr
    assert "nothing was started" in result.stderr
    assert not buffer_path.exists()


def test_schema_prints_json_with_the_modbus_device_fields() -> None:
    result = subprocess.run([str(Path(sys.executable).with_name("edge-agent")), "schema"], capture_output=True,
                            text=True, timeout=CLI_TIMEOUT_S, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"gateway", "devices"} <= set(schema["required"])
    device_schemas = schema["properties"]["devices"]["items"]["oneOf"]
    modbus = next(s for s in device_schemas if s["properties"]["driver"].get("const") == "modbus")
    assert {"name", "driver", "host", "port", "unit_id", "poll_interval", "timeout", "points"} <= set(
        modbus["properties"])
    point_ref = modbus["properties"]["points"]["items"]["$ref"].rsplit("/", 1)[-1]
    point = schema["$defs"][point_ref]["properties"]
    assert {"name", "function", "address", "type", "word_order", "scale", "offset", "unit"} <= set(point)


def test_relative_file_paths_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "secret").write_text("pw\n")
    (folder / "config.toml").write_text(
        '[gateway]\nid = "gw"\nsite = "s"\n[buffer]\npath = "state/buffer.db"\n'
        '[mqtt]\nusername = "u"\npassword_file = "secret"\nallow_password_without_tls = true\n'
        '[[devices]]\nname = "m"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
        'points = [{ name = "v", function = "input", address = 0, type = "float32" }]\n')
    config = load_config(folder / "config.toml")
    assert config.buffer.path == folder / "state" / "buffer.db"
    assert config.mqtt.password_file == folder / "secret"


def test_a_bad_topic_template_is_reported_at_its_key() -> None:
    text = GATEWAY + '[mqtt]\ndata_topic = "edge/{site}/{devcie}"\nstatus_topic = "edge/{device}/status"\n' + device()
    problems = dict(problems_of(text))
    assert "unknown placeholder {devcie}" in problems["mqtt.data_topic"]
    assert "unknown placeholder {device}" in problems["mqtt.status_topic"]
