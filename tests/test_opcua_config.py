"""OPC-UA config: every mistake named with its file and dotted path, exit 78, before asyncua is loaded; and
what `edge-agent check` prints for a good device."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.config import parse_config
from agent.errors import EX_CONFIG, ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(30)

HEAD = """
[gateway]
id = "gw-01"
site = "plant-a"

[[devices]]
name = "meter"
driver = "modbus"
host = "127.0.0.1"
points = [{ name = "v", function = "input", address = 0, type = "float32" }]

[[devices]]
name = "env"
driver = "modbus"
host = "127.0.0.1"
points = [{ name = "t", function = "input", address = 0, type = "float32" }]
"""


def problems(devices: str) -> list[str]:
    return problems_of(HEAD + textwrap.dedent(devices), "plant.toml")


def problems_of(text: str, source: str = "sample.toml") -> list[str]:
    """The rendered problems of a config that must be refused, one line each, without the closing hint."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source=source)
    return error.value.render().splitlines()[:-1]


def test_the_four_classic_mistakes_are_named_by_file_and_path(tmp_path: Path) -> None:
    lines = problems(f"""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://192.168.10.30:4840"
        mode = "subscribe"
        security_mode = "SignAndEncrypt"
        security_policy = "Basic128Rsa15"
        user_certificate = "{tmp_path / 'missing-user.der'}"
        user_private_key = "{tmp_path / 'missing-user.pem'}"
        points = [
          {{ name = "a", node_id = "ns=2;s=Boiler.Temp" }},
          {{ name = "b", browse_path = "plant:Plant/plant:Boiler" }},
          {{ name = "c", node_id = "ns=2;s=Boiler.Pressure", deadband = 0.5 }},
          {{ name = "d", node_id = "ns=2,i=1001" }},
        ]
        """)
    assert lines[0].startswith("plant.toml: devices[2].security_policy: Input should be 'None', "
                               "'Basic256Sha256', 'Aes128_Sha256_RsaOaep' or 'Aes256_Sha256_RsaPss' "
                               "(got 'Basic128Rsa15')")
    assert "plant.toml: devices[2].points[3].node_id: expected a NodeId such as \"ns=2;i=1001\"" in "\n".join(lines)
    # The checks that need the whole point list still run on the valid points (the device has errors).
    assert 'plant.toml: devices[2].points[2].deadband_type: a deadband needs deadband_type = "absolute" or ' \
           '"percent"' in lines
    assert "plant.toml: devices[2].points[1].browse_path: unknown namespace alias 'plant' (in the device's " \
           "namespaces table: none defined)" in lines


def test_files_that_do_not_exist_and_security_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_OPCUA_PASSWORD", raising=False)
    lines = problems(f"""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://192.168.10.30:4840"
        security_mode = "Sign"
        user_certificate = "{tmp_path / 'user.der'}"
        certificate_dir = "relative/dir"
        points = [{{ name = "a", node_id = "nsu=urn:example:plant;s=Boiler.Temp", sampling_interval = "1s" }}]

        [[devices]]
        name = "chiller"
        driver = "opcua"
        endpoint = "http://192.168.10.31"
        username = "operator"
        password_env = "NOT_SET_OPCUA_PASSWORD"
        points = [{{ name = "a", node_id = "i=2258" }}, {{ name = "a", node_id = "i=2259" }}]
        """)
    text = "\n".join(lines)
    assert "plant.toml: devices[2].certificate_dir: must be an absolute path" in text
    assert "plant.toml: devices[3].endpoint: expected an endpoint URL" in text
    lines = problems(f"""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://192.168.10.30:4840"
        security_mode = "Sign"
        user_certificate = "{tmp_path / 'user.der'}"
        points = [{{ name = "a", node_id = "nsu=urn:example:plant;s=Boiler.Temp", sampling_interval = "1s" }}]
        """)
    assert lines == [
        "plant.toml: devices[2].security_policy: security_mode Sign needs a policy: Basic256Sha256, "
        "Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss",
        f"plant.toml: devices[2].user_certificate: file not found: {tmp_path / 'user.der'}",
        "plant.toml: devices[2].user_private_key: an X.509 user identity needs both user_certificate and "
        "user_private_key",
        'plant.toml: devices[2].points[0].sampling_interval: applies to mode = "subscribe" only',
    ]


def test_password_rules_and_duplicate_points() -> None:
    lines = problems("""
        [[devices]]
        name = "chiller"
        driver = "opcua"
        endpoint = "opc.tcp://127.0.0.1:4840"
        username = "operator"
        password_env = "NOT_SET_OPCUA_PASSWORD"
        points = [{ name = "a", node_id = "i=2258" }, { name = "a", browse_path = "Server/ServerStatus" }]
        """)
    assert lines == [
        "plant.toml: devices[2].password_env: the environment variable NOT_SET_OPCUA_PASSWORD is not set",
        "plant.toml: devices[2].security_mode: a password would cross the network on an unsecured channel: use "
        '"SignAndEncrypt", or set allow_password_without_security = true on a closed test network',
        "plant.toml: devices[2].points[1].name: duplicate point name 'a' (already used by points[0])",
    ]


def test_edge_agent_check_exits_78_and_prints_one_line_per_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plant.toml"
    path.write_text(HEAD + textwrap.dedent("""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://127.0.0.1:4840"
        security_policy = "Basic512"
        points = [{ name = "a", node_id = "ns=2;x=1" }]
        """))
    assert cli(["check", "--config", str(path)]) == EX_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{path}: devices[2].security_policy: Input should be 'None'")
    assert err[1].startswith(f"{path}: devices[2].points[0].node_id: expected a NodeId")
    assert err[-1] == f"{path}: 2 problems; nothing was started"


def test_a_good_device_is_described_by_check_without_loading_asyncua(tmp_path: Path) -> None:
    password = tmp_path / "opcua-password"
    password.write_text("not printed\n")
    path = tmp_path / "plant.toml"
    path.write_text(HEAD + textwrap.dedent(f"""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://127.0.0.1:4840"
        mode = "subscribe"
        security_mode = "SignAndEncrypt"
        security_policy = "Aes256_Sha256_RsaPss"
        username = "operator"
        password_file = "{password}"
        heartbeat = "1m"
        namespaces = {{ plant = "urn:example:plant" }}

        [[devices.points]]
        name = "temperature"
        browse_path = "plant:Boiler/plant:Temperature"
        unit = "°C"
        deadband = 0.5
        deadband_type = "absolute"

        [[devices.points]]
        name = "humidity"
        node_id = "nsu=urn:example:plant;s=Room.Humidity"
        deadband = 2
        deadband_type = "percent"
        sampling_interval = "250ms"
        """))
    script = ("import sys; from agent.cli import main; code = main(['check', '--config', sys.argv[1]]); "
              "print('asyncua loaded' if 'asyncua' in sys.modules else 'asyncua not loaded'); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "device boiler: opcua opc.tcp://127.0.0.1:4840, SignAndEncrypt Aes256_Sha256_RsaPss, user 'operator' " \
           "(password from file)" in out
    assert "subscribe mode, publishing every 1 s, sampling 1 s, queue 10, heartbeat 60 s: 2 nodes monitored" in out
    assert "humidity" in out and "deadband 2 %" in out and "sampling 0.25 s" in out
    assert "not printed" not in out
    assert out.strip().endswith("asyncua not loaded")


def test_the_sample_config_is_valid_but_for_the_password_file_of_the_gateway() -> None:
    lines = problems_of((REPO / "drivers/opcua/sample.toml").read_text())
    assert lines == ["sample.toml: devices[0].password_file: file not found: /etc/edge-agent/opcua-boiler-password"]


def test_a_missing_certificate_is_reported_beside_a_bad_point(tmp_path: Path) -> None:
    lines = problems(f"""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://192.168.10.30:4840"
        security_mode = "SignAndEncrypt"
        security_policy = "Basic256Sha256"
        user_certificate = "{tmp_path / 'user.der'}"
        user_private_key = "{tmp_path / 'user.pem'}"
        points = [{{ name = "a", node_id = "ns=2;q=1" }}]
        """)
    assert lines[0].startswith("plant.toml: devices[2].points[0].node_id: expected a NodeId")
    assert lines[1:] == [f"plant.toml: devices[2].user_certificate: file not found: {tmp_path / 'user.der'}",
                         f"plant.toml: devices[2].user_private_key: file not found: {tmp_path / 'user.pem'}"]


def test_relative_device_paths_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    from agent.config import load_config

    path = tmp_path / "config.toml"
    path.write_text(HEAD + textwrap.dedent("""
        [[devices]]
        name = "boiler"
        driver = "opcua"
        endpoint = "opc.tcp://192.168.10.30:4840"
        certificate_dir = "pki"
        trust_dir = "~/trusted"
        points = [{ name = "a", node_id = "i=2258" }]
        """), encoding="utf-8")
    device = load_config(path).devices[-1]
    assert device.certificate_dir == tmp_path / "pki"  # type: ignore[attr-defined]
    assert device.trust_dir == Path("~/trusted").expanduser()  # type: ignore[attr-defined]
