"""The technician's status page, in a real headless Chromium (Debian's, driven by Playwright), against a
running agent polling simulated Modbus devices and a real mosquitto: every device and value shows, a
device that stops answering and a broker that goes away show within seconds without a reload, Korean
labels for a Korean browser. Bad requests (unknown path, huge headers, wrong password) get plain errors and
the agent goes on. `make test` installs Chromium (deploy/ensure-chromium.sh) where the machine allows."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import key_exposure, parse_config
from agent.demo.mosquitto import MosquittoProcess, free_port
from agent.errors import ConfigError
from agent.metrics import MetricsServer, local_client_tls, server_tls
from agent.model import PollResult, Quality, Reading
from agent.webpage import LatestReadings
from drivers.modbus.simulator import PowerMeter, SimServer
from tests.certs import SelfSigned, make_self_signed, make_test_certificates
from tests.conftest import REPO, agent_config
from tests.test_end_to_end import eventually, start_agent, stop_agent

CHROMIUM = os.environ.get("EDGE_AGENT_CHROMIUM", "/usr/bin/chromium")
# Never a browser of Playwright's own: the system's, quiet (no update checks, no network of its own).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-component-update"]


def points(extra: str = "") -> str:
    return f"""points = [
          {{ name = "voltage_avg",  function = "input", address = 0,  type = "float32", unit = "V" }},
          {{ name = "current_l1",   function = "input", address = 2,  type = "float32", unit = "A" }},
          {{ name = "active_power", function = "input", address = 24, type = "float32", unit = "kW" }},{extra}
        ]"""


def device(name: str, port: int, extra_points: str = "") -> str:
    return f"""
        [[devices]]
        name = "{name}"
        driver = "modbus"
        host = "127.0.0.1"
        port = {port}
        unit_id = 1
        poll_interval = "200ms"
        timeout = "300ms"
        {points(extra_points)}
        """


def with_metrics(config: Path, metrics: str) -> None:
    text = config.read_text()
    config.write_text(text.replace("port = 0  # a free port: tests must not fight over 9108",
                                   textwrap.dedent(metrics).strip()))


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (make test installs Debian's 'chromium' where the machine allows; "
                    "EDGE_AGENT_CHROMIUM names another)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def test_the_page_shows_every_device_and_follows_failures_without_a_reload(
        tmp_path: Path, mosquitto: MosquittoProcess, browser: Any) -> None:
    async with SimServer({1: PowerMeter(seed=1)}, update_interval=0.2) as meter, \
            SimServer({1: PowerMeter(seed=2)}, update_interval=0.2) as feeder:
        # A point the meter refuses (exception 2, illegal address): bad, with the reason on the page.
        refused = '\n          { name = "missing", function = "holding", address = 60000, type = "uint16" },'
        config = agent_config(tmp_path, mosquitto.port, device("main-incomer", meter.port, refused)
                              + device("feeder-2", feeder.port))
        agent, stop, task = await start_agent(config)
        try:
            assert agent.metrics is not None
            url = f"http://127.0.0.1:{agent.metrics.port}/"
            page = await browser.new_page(locale="en-US", viewport={"width": 1200, "height": 1000})
            page_json: list[float] = []
            page.on("request", lambda r: page_json.append(time.monotonic()) if r.url.endswith("/page.json") else None)
            await page.goto(url)
            for name in ("main-incomer", "feeder-2"):
                card = f'[data-device="{name}"]'
                await page.wait_for_selector(f'{card}[data-state="ok"] tr[data-point="voltage_avg"]', timeout=10_000)
                for point in ("voltage_avg", "current_l1", "active_power"):
                    value = await page.inner_text(f'{card} tr[data-point="{point}"] td.value')
                    assert float(value.replace(",", "")) > 0, (name, point, value)
                assert await page.inner_text(f'{card} .state') == "OK"
            bad = await page.inner_text('[data-device="main-incomer"] tr[data-point="missing"]')
            assert "bad" in bad and "illegal" in bad.lower(), bad
            assert await page.inner_text("#uplink-state") == "connected"
            assert "Gateway" in await page.inner_text("#gateway") and "gw-test" in await page.inner_text("h1")
            shot = tmp_path / "status-page.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"status page screenshot: {shot}")
            # The page must follow by itself: a marker set now would be gone after a reload.
            await page.evaluate("window.__notReloaded = true")

            await feeder.stop()
            stopped = time.monotonic()
            await page.wait_for_selector('[data-device="feeder-2"][data-state="failing"]', timeout=5_000)
            print(f"feeder-2 shown failing {time.monotonic() - stopped:.1f} s after its server stopped")
            assert await page.inner_text('[data-device="feeder-2"] .state') == "NOT ANSWERING"
            assert await page.inner_text('[data-device="feeder-2"] .last-error')
            assert await page.get_attribute('[data-device="main-incomer"]', "data-state") == "ok"

            mosquitto.stop()
            stopped = time.monotonic()
            await page.wait_for_selector('#uplink-state[data-state="disconnected"]', timeout=8_000)
            print(f"broker shown disconnected {time.monotonic() - stopped:.1f} s after it stopped")
            assert await page.inner_text("#uplink-error")
            assert await page.inner_text("#overall") == "attention"
            assert await page.evaluate("window.__notReloaded === true")
            await page.screenshot(path=str(tmp_path / "status-page-failing.png"), full_page=True)

            # A hidden tab asks nothing.
            await page.evaluate("""() => {
                Object.defineProperty(document, 'hidden', {value: true, configurable: true});
                document.dispatchEvent(new Event('visibilitychange'));
            }""")
            await asyncio.sleep(0.5)  # a request already on its way may still land
            hidden_from = len(page_json)
            await asyncio.sleep(3.5)
            assert len(page_json) == hidden_from, "the page kept asking while hidden"
            await page.close()

            korean = await browser.new_page(locale="ko-KR", viewport={"width": 390, "height": 844})  # a phone
            await korean.goto(url)
            await korean.wait_for_selector('[data-device="feeder-2"][data-state="failing"]', timeout=10_000)
            text = await korean.inner_text("body")
            for label in ("게이트웨이", "버퍼", "장치", "응답 없음", "정상", "연결 끊김", "포인트", "품질"):
                assert label in text, label
            await korean.screenshot(path=str(tmp_path / "status-page-ko.png"), full_page=True)
            await korean.click("#lang")  # the switch: English without a reload
            await korean.wait_for_function("document.querySelector('#devices-section h2').textContent === 'Devices'")
            await korean.close()
        finally:
            await stop_agent(stop, task)


def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are (no client would send them) and return the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply


def get(port: int, path: str, password: str | None = None, extra: str = "") -> bytes:
    auth = ""
    if password is not None:
        auth = f"Authorization: Basic {base64.b64encode(f'technician:{password}'.encode()).decode()}\r\n"
    return raw_request(port, f"GET {path} HTTP/1.1\r\nHost: gw\r\n{auth}{extra}\r\n".encode())


async def test_bad_requests_get_plain_errors_and_the_agent_goes_on(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    password_file = tmp_path / "page-password"
    password_file.write_text("s3cret plant pass\n")
    async with SimServer({1: PowerMeter(seed=1)}, update_interval=0.2) as meter:
        config = agent_config(tmp_path, mosquitto.port, device("main-incomer", meter.port))
        # A relative password_file is taken from the config file's folder.
        with_metrics(config, f'port = {free_port()}\npassword_file = "{password_file.name}"')
        agent, stop, task = await start_agent(config)
        try:
            assert agent.metrics is not None
            port = agent.metrics.port
            await eventually(lambda: agent.health["main-incomer"].polls_ok >= 1, 10, "a first poll")

            def check() -> None:
                reply = get(port, "/")
                assert reply.startswith(b"HTTP/1.1 401 ") and b'WWW-Authenticate: Basic realm="edge-agent"' in reply
                started = time.monotonic()
                for wrong in ("s3cret plant pas", "s3cret plant pass2", ""):
                    reply = get(port, "/page.json", wrong)
                    assert reply.startswith(b"HTTP/1.1 401 ") and reply.endswith(b"password required\n"), reply
                assert time.monotonic() - started >= 1.4  # each wrong password waits its turn
                assert get(port, "/", "s3cret plant pass", ).startswith(b"HTTP/1.1 200 ")
                for path in ("/page.json", "/status.json", "/metrics", "/page.js", "/page.css"):
                    assert get(port, path, "s3cret plant pass").startswith(b"HTTP/1.1 200 "), path
                body = get(port, "/page.json", "s3cret plant pass")
                assert b"s3cret" not in body and b"password" not in body  # never a secret
                reply = get(port, "/etc/passwd", "s3cret plant pass")
                assert reply.startswith(b"HTTP/1.1 404 ") and b"Content-Type: text/plain" in reply
                reply = get(port, "/", "s3cret plant pass", "X-Filler: " + "a" * 20_000 + "\r\n")
                assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
                assert raw_request(port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
                assert raw_request(port, b"DELETE / HTTP/1.1\r\n" + _auth("s3cret plant pass") + b"\r\n") \
                    .startswith(b"HTTP/1.1 405 ")
                with socket.create_connection(("127.0.0.1", port), timeout=5) as half:
                    half.sendall(b"GET / HTTP/1.1\r\nHost:")  # and then nothing; the others are served meanwhile
                    assert get(port, "/", "s3cret plant pass").startswith(b"HTTP/1.1 200 ")

            await asyncio.to_thread(check)
            polls = agent.health["main-incomer"].polls_ok
            await eventually(lambda: agent.health["main-incomer"].polls_ok >= polls + 3, 10, "polling goes on")
            assert not task.done()
            # `edge-agent status` brings the password along.
            human = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent", "status", "--config",
                                                            str(config)], cwd=REPO, capture_output=True,
                                            text=True, timeout=30)
            assert human.returncode == 0 and "main-incomer" in human.stdout, human.stderr
        finally:
            await stop_agent(stop, task)


def _auth(password: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"x:{password}".encode()) + b"\r\n"


GATEWAY = '[gateway]\nid = "gw-1"\nsite = "plant-a"\n'
DEVICE = ('[[devices]]\nname = "m"\ndriver = "modbus"\nhost = "10.0.0.5"\n'
          'points = [{ name = "v", function = "input", address = 0, type = "float32" }]\n')


@pytest.mark.parametrize(("metrics", "where", "fragment"), [
    ('host = "0.0.0.0"', "metrics.host", "set metrics.password_file"),
    ('host = "192.168.10.5"', "metrics.host", "reachable from the network"),
    ('host = "gateway.local"', "metrics.host", "reachable from the network"),
    ('host = "0.0.0.0"\npassword_file = "{tmp}/none"', "metrics.password_file", "file not found"),
    ('host = "0.0.0.0"\npassword_file = "{tmp}/empty"', "metrics.password_file", "is empty"),
])
def test_listening_off_loopback_needs_a_password(tmp_path: Path, metrics: str, where: str, fragment: str) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(GATEWAY + "[metrics]\n" + metrics.format(tmp=tmp_path) + "\n" + DEVICE, source="c.toml")
    assert [(p.where, fragment in p.message) for p in caught.value.problems] == [(where, True)], \
        caught.value.problems


def test_loopback_needs_no_password_and_a_password_file_is_accepted_anywhere(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x\n")
    for metrics in ('host = "127.0.0.1"', 'host = "::1"', 'host = "localhost"',
                    f'host = "0.0.0.0"\npassword_file = "{tmp_path}/pw"'):
        parse_config(GATEWAY + "[metrics]\n" + metrics + "\n" + DEVICE, source="c.toml")


# --- HTTPS: [metrics] tls_cert_file and tls_key_file ---------------------------------------------------------

PAGE_PASSWORD = "s3cret plant pass"
UNENCRYPTED = "cross the network unencrypted"


def with_tls_metrics(tmp_path: Path, config: Path, port: int) -> SelfSigned:
    """The listener on `port` with a password and a self-signed certificate for 127.0.0.1, as a technician
    sets it up for the gateway's address (docs/troubleshooting.md)."""
    made = make_self_signed(tmp_path / "tls")
    (tmp_path / "page-password").write_text(PAGE_PASSWORD + "\n")
    with_metrics(config, f'port = {port}\npassword_file = "page-password"\ntls_cert_file = "{made.cert}"\n'
                         f'tls_key_file = "{made.key}"')
    return made


def https_get(port: int, path: str, context: ssl.SSLContext, password: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    headers = {"Authorization": "Basic " + base64.b64encode(f"x:{password}".encode()).decode()} if password else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def plain_http_reply(port: int, path: str, password: str) -> bytes:
    try:
        return get(port, path, password)
    except ConnectionResetError:
        return b""


async def test_with_a_certificate_the_listener_speaks_https_only(
        tmp_path: Path, mosquitto: MosquittoProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with SimServer({1: PowerMeter(seed=1)}, update_interval=0.2) as meter:
        config = agent_config(tmp_path, mosquitto.port, device("main-incomer", meter.port))
        made = with_tls_metrics(tmp_path, config, free_port())
        agent, stop, task = await start_agent(config)
        try:
            assert agent.metrics is not None
            port = agent.metrics.port
            await eventually(lambda: agent.health["main-incomer"].polls_ok >= 1, 10, "a first poll")

            def check() -> None:
                # A client that checks the ordinary way, host name included: the certificate as its only CA.
                trusting = ssl.create_default_context(cafile=str(made.cert))
                code, body = https_get(port, "/status.json", trusting, PAGE_PASSWORD)
                assert code == 200 and json.loads(body)["devices"]["main-incomer"]["polls_ok"] >= 1
                code, body = https_get(port, "/status.json", trusting)
                assert (code, body) == (401, b"password required\n")
                # Plain HTTP on the TLS port, even with the right password: no reply at all, no figure.
                assert plain_http_reply(port, "/status.json", PAGE_PASSWORD) == b""
                assert plain_http_reply(port, "/", PAGE_PASSWORD) == b""
                # A client that trusts only the system's authorities refuses the certificate: the listener
                # presents the configured one, and what verifies it above is real.
                with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed"):
                    https_get(port, "/status.json", ssl.create_default_context(), PAGE_PASSWORD)
                # TLS 1.1 is refused by the listener; the same client allowed TLS 1.2 gets in.
                old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                old.load_verify_locations(cafile=str(made.cert))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # naming TLS 1.0 and 1.1 is deprecated
                    old.minimum_version = ssl.TLSVersion.TLSv1
                    old.maximum_version = ssl.TLSVersion.TLSv1_1
                old.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client's own floor must not be what refuses
                with pytest.raises(ssl.SSLError):
                    https_get(port, "/status.json", old, PAGE_PASSWORD)
                old.maximum_version = ssl.TLSVersion.TLSv1_2
                assert https_get(port, "/status.json", old, PAGE_PASSWORD)[0] == 200

            await asyncio.to_thread(check)
            # `edge-agent status` reads it over HTTPS, pinned to tls_cert_file (no name of the certificate's to
            # match the listener's address by in general).
            human = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent", "status", "--config",
                                                            str(config)], cwd=REPO, capture_output=True,
                                            text=True, timeout=30)
            assert human.returncode == 0 and "main-incomer" in human.stdout, human.stderr
            await eventually(lambda: agent.metrics is not None and agent.metrics.connections == 0, 5,
                             "every connection closed")
            assert not task.done()
        finally:
            await stop_agent(stop, task)
    messages = [record.getMessage() for record in caplog.records]
    assert f"status page on https://127.0.0.1:{port}/ (/metrics, /status.json); password required" in messages
    assert not [m for m in messages if UNENCRYPTED in m]
    # Failed handshakes (the plain-HTTP requests, TLS 1.1) are the clients' business: nothing logged.
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_status_refuses_a_certificate_other_than_its_own(
        tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    """`edge-agent status` verifies: with tls_cert_file replaced by another certificate while the agent
    runs (it read the first at start), it says so instead of trusting whatever answers."""
    config = agent_config(tmp_path, mosquitto.port, device("main-incomer", free_port()))
    made = with_tls_metrics(tmp_path, config, free_port())
    _, stop, task = await start_agent(config)
    try:
        replaced = make_self_signed(tmp_path / "renewed")
        made.cert.write_bytes(replaced.cert.read_bytes())
        made.key.write_bytes(replaced.key.read_bytes())
        human = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "agent", "status", "--config",
                                                        str(config)], cwd=REPO, capture_output=True,
                                        text=True, timeout=30)
    finally:
        await stop_agent(stop, task)
    assert human.returncode == 1 and "TLS failed" in human.stderr and "restart it" in human.stderr, human.stderr
    assert "certificate verify failed" in human.stderr, human.stderr


async def test_the_page_loads_over_https_in_chromium(
        tmp_path: Path, mosquitto: MosquittoProcess, browser: Any) -> None:
    from playwright.async_api import Error as BrowserError

    async with SimServer({1: PowerMeter(seed=1)}, update_interval=0.2) as meter:
        config = agent_config(tmp_path, mosquitto.port, device("main-incomer", meter.port))
        with_tls_metrics(tmp_path, config, free_port())
        agent, stop, task = await start_agent(config)
        try:
            assert agent.metrics is not None
            url = f"https://127.0.0.1:{agent.metrics.port}/"
            # What the technician does once: accept the self-signed certificate at the browser's warning.
            accepted = await browser.new_context(ignore_https_errors=True, locale="en-US", http_credentials={
                "username": "technician", "password": PAGE_PASSWORD})
            page = await accepted.new_page()
            await page.goto(url)
            await page.wait_for_selector('[data-device="main-incomer"][data-state="ok"] tr[data-point="voltage_avg"]',
                                         timeout=10_000)
            assert await page.inner_text("#uplink-state") == "connected"
            assert page.url == url
            await page.screenshot(path=str(tmp_path / "status-page-https.png"), full_page=True)
            # The warning itself: Chromium knows no authority for the certificate; and http:// gets nothing.
            fresh = await (await browser.new_context()).new_page()
            with pytest.raises(BrowserError, match="ERR_CERT_AUTHORITY_INVALID"):
                await fresh.goto(url)
            with pytest.raises(BrowserError, match=r"ERR_EMPTY_RESPONSE|ERR_CONNECTION_RESET"):
                await fresh.goto(url.replace("https://", "http://"))
            await accepted.close()
        finally:
            await stop_agent(stop, task)


async def test_a_password_over_plain_http_off_loopback_is_warned_once(
        tmp_path: Path, mosquitto: MosquittoProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    (tmp_path / "page-password").write_text(PAGE_PASSWORD + "\n")
    config = agent_config(tmp_path, mosquitto.port, device("main-incomer", free_port()))
    # "127.1" is 127.0.0.1 to the resolver, so the test listens on this machine only; to the config it is a
    # host name, which may resolve to any address, so it stands for a plant-side address here.
    with_metrics(config, f'host = "127.1"\nport = {free_port()}\npassword_file = "page-password"')
    agent, stop, task = await start_agent(config)
    try:
        assert agent.metrics is not None  # plain HTTP still serves: existing configs keep working
        code = await asyncio.to_thread(lambda: get(agent.metrics.port, "/status.json", PAGE_PASSWORD)[:12])
        assert code == b"HTTP/1.1 200"
    finally:
        await stop_agent(stop, task)
    warned = [record for record in caplog.records if UNENCRYPTED in record.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "set [metrics] tls_cert_file and tls_key_file" in warned[0].getMessage()


@pytest.mark.parametrize(("metrics", "warned"), [
    ('host = "0.0.0.0"\npassword_file = "{tmp}/pw"', [UNENCRYPTED]),
    ('host = "192.168.10.5"\npassword_file = "{tmp}/pw"', [UNENCRYPTED]),
    ('host = "0.0.0.0"\npassword_file = "{tmp}/pw"\ntls_cert_file = "{tmp}/page.pem"\n'
     'tls_key_file = "{tmp}/page.key"', []),
    ('host = "0.0.0.0"\npassword_file = "{tmp}/pw"\nenabled = false', []),
    ('host = "127.0.0.1"\npassword_file = "{tmp}/pw"', []),
    ('host = "::1"\npassword_file = "{tmp}/pw"', []),
    ('host = "localhost"\npassword_file = "{tmp}/pw"', []),
    ('host = "127.0.0.1"', []),
    ('tls_cert_file = "{tmp}/page.pem"\ntls_key_file = "{tmp}/other.key"', ["other.key can be read by every user"]),
])
def test_what_check_and_the_start_warn_about(tmp_path: Path, metrics: str, warned: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    made = make_self_signed(tmp_path)
    made.other_key.write_bytes(made.key.read_bytes())
    made.other_key.chmod(0o644)  # every user can read it
    (tmp_path / "pw").write_text("x\n")
    text = GATEWAY + "[metrics]\n" + metrics.format(tmp=tmp_path) + "\n" + DEVICE
    warnings_given = parse_config(text, source="c.toml").metrics.warnings()
    assert len(warnings_given) == len(warned) and all(w in g for w, g in zip(warned, warnings_given, strict=True)), \
        warnings_given
    (tmp_path / "c.toml").write_text(text)
    assert main(["check", "--config", str(tmp_path / "c.toml")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert printed == [f"warning: {w}" for w in warnings_given]


def test_a_key_readable_by_the_agents_group_only_is_not_warned_about(tmp_path: Path) -> None:
    made = make_self_signed(tmp_path)
    os.chown(made.key, -1, os.getegid())
    for mode in (0o600, 0o640, 0o400):
        made.key.chmod(mode)
        assert key_exposure(made.key) is None, oct(mode)
    made.key.chmod(0o604)
    assert key_exposure(made.key) == "every user of this machine (mode 0604)"


def test_the_certificate_command_of_the_docs_makes_what_the_listener_and_its_clients_accept(tmp_path: Path) -> None:
    """The openssl command of docs/troubleshooting.md, run as written for 127.0.0.1 instead of the example
    address: `check` accepts the pair, and a client verifying the ordinary way (the certificate as its CA,
    the address as the name) connects to the listener serving it."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command on this machine")
    docs = (REPO / "docs" / "troubleshooting.md").read_text()
    block = re.search(r"```sh\n(sudo openssl req -x509 .+?)\n(?=sudo chown)", docs, re.S)
    assert block, "the openssl command is gone from docs/troubleshooting.md"
    command = block.group(1).replace("\\\n", " ").removeprefix("sudo ").replace("192.168.10.5", "127.0.0.1") \
        .replace("/etc/edge-agent/", f"{tmp_path}/")
    subprocess.run(shlex.split(command), check=True, capture_output=True, timeout=60)
    cert, key = tmp_path / "page.pem", tmp_path / "page.key"
    assert key_exposure(key) is None  # openssl writes the key for its owner only
    (tmp_path / "pw").write_text("x\n")
    settings = parse_config(GATEWAY + f'[metrics]\nhost = "0.0.0.0"\npassword_file = "{tmp_path}/pw"\n'
                            f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n' + DEVICE).metrics
    assert settings.tls_enabled and settings.warnings() == []

    async def serve() -> tuple[int, bytes]:
        async def snapshot() -> dict[str, Any]:
            return {"devices": {}}

        server = MetricsServer("127.0.0.1", 0, snapshot, tls=server_tls(cert, key))
        await server.start()
        try:
            return await asyncio.to_thread(https_get, server.port, "/status.json",
                                           ssl.create_default_context(cafile=str(cert)))
        finally:
            await server.stop()

    assert asyncio.run(serve()) == (200, b'{"devices": {}}')


def test_the_status_command_trusts_exactly_the_configured_certificate(tmp_path: Path) -> None:
    """local_client_tls, what `edge-agent status` connects with: a self-signed certificate and one a CA
    issued (the CA unknown to the client, the file holding the certificate and then its chain) are both
    accepted as the pinned certificate; another certificate is refused."""
    self_signed, other = make_self_signed(tmp_path / "own"), make_self_signed(tmp_path / "other")
    issued = make_test_certificates(tmp_path / "ca")
    chain = tmp_path / "ca" / "chain.pem"
    chain.write_bytes(issued.server_cert.read_bytes() + issued.ca_file.read_bytes())

    async def serve(cert: Path, key: Path, pinned: Path) -> tuple[int, bytes]:
        async def snapshot() -> dict[str, Any]:
            return {"devices": {}}

        server = MetricsServer("127.0.0.1", 0, snapshot, tls=server_tls(cert, key))
        await server.start()
        try:
            return await asyncio.to_thread(https_get, server.port, "/status.json", local_client_tls(pinned))
        finally:
            await server.stop()

    for cert, key in ((self_signed.cert, self_signed.key), (issued.server_cert, issued.server_key),
                      (chain, issued.server_key)):
        assert asyncio.run(serve(cert, key, cert)) == (200, b'{"devices": {}}'), cert
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(serve(self_signed.cert, self_signed.key, other.cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(serve(issued.server_cert, issued.server_key, self_signed.cert))


def test_every_window_flag_has_words_in_both_languages() -> None:
    """The page shows a window's flags in words (`flag_<value>`); a flag added to energy/windows.py without
    them would show as a bare key in one language or both."""
    from energy.windows import Flag

    page = (REPO / "agent" / "web" / "page.js").read_text(encoding="utf-8")
    labels = page[page.index("const LABELS = {"):page.index("\n};", page.index("const LABELS = {"))]
    english, korean = labels[labels.index("  en: {"):labels.index("  ko: {")], labels[labels.index("  ko: {"):]
    for language in (english, korean):
        assert {f.value for f in Flag} <= set(re.findall(r"\bflag_(\w+):", language))


def test_last_readings_keep_one_poll_per_device_and_merge_what_a_stream_changed() -> None:
    latest = LatestReadings()
    latest.record(PollResult("opc", 10.0, (Reading("a", 1.0), Reading("b", 2.0))))
    latest.record(PollResult("opc", 11.0, (Reading.bad("b", "BadCommunicationError"),)))  # only b changed
    shown = {p["point"]: p for p in latest.points("opc")}
    assert shown["a"]["value"] == 1.0 and shown["a"]["ts"].endswith("00:10.000Z")
    assert shown["b"]["quality"] == Quality.BAD and shown["b"]["reason"] == "BadCommunicationError"
    latest.record(PollResult("opc", 12.0, (Reading("a", 3.0), Reading("b", 4.0))))  # a full emit replaces all
    assert [p["value"] for p in latest.points("opc")] == [3.0, 4.0]
    for second in range(1000):
        latest.record(PollResult("meter", float(second), (Reading("v", float(second)),)))
        latest.record(PollResult("meter/demand", float(second), (Reading("demand", 1.0),)))
    assert latest.streams() == ["meter", "meter/demand", "opc"]
    latest.forget("meter")
    assert latest.streams() == ["opc"] and latest.points("meter") == []


def test_values_are_shown_as_the_device_meant_them() -> None:
    from agent.model import Float32

    latest = LatestReadings()
    latest.record(PollResult("m", 0.0, (Reading("v", Float32(229.8000030517578)), Reading("nan", float("nan")),
                                        Reading("s", "x" * 1000))))
    values = [p["value"] for p in latest.points("m")]
    assert values[0] == 229.8 and values[1] == "nan" and len(values[2]) < 210



async def test_clock_and_energy_sections_show_whatever_the_status_carries(tmp_path: Path, browser: Any) -> None:
    """The clock's health and the energy stage come from other stages (docs/energy.md): the page draws the
    keys they add to the status, and each meter's and group's card: live demand, the alarm, the latest windows
    with their flags in words, in English and Korean. The page's own files are served as shipped; page.json
    is a snapshot as the agent builds it with those stages present (a closed window with flags would take a
    real agent 15 minutes)."""
    import json

    from agent.webpage import load_assets

    assets = load_assets()
    snapshot = {
        "now": "2026-12-04T08:00:01.000Z",
        "gateway": {"id": "gw-1", "site": "changwon", "version": "0.1.0", "uptime_s": 7300,
                    "clock": {"known": True, "synchronised": False, "esterror_s": 0.0004, "maxerror_s": 0.0155,
                              "steps": 1, "last_step_s": -2.5}},
        "uplink": {"broker": "platform:8883", "tls": True, "connected": True, "connected_since": "2026-12-04T06:00:00Z",
                   "inflight": 2, "delivered_readings": 123456, "last_error": None, "last_error_at": None},
        "buffer": {"buffer_id": "b", "readings": 0, "rows": 0, "bytes": 4096, "oldest_ts": None, "oldest_age_s": 0,
                   "next_seq": 1, "dropped_oldest": 0, "rejected": 0, "expired": 0, "lost_since_last_status": 0,
                   "max_bytes": 1 << 30, "on_full": "drop_oldest", "max_age_s": None, "disk_full": False},
        "lines": [],
        "devices": [{"name": "incomer-1", "driver": "modbus", "poll_interval_s": 1.0, "state": "ok", "polls_ok": 9,
                     "polls_failed": 0, "points": []}],
        "energy": {"figures": {"meters": 2, "windows": 4, "alarms_active": 1, "clock_steps": 1},
                   "meters": [
                       {"name": "incomer-1", "kind": "meter", "window_s": 900, "target_kw": 500.0,
                        "levels_kw": [450.0, 500.0], "waiting_until": None,
                        "live": {"ts": "2026-12-04T08:00:00.500Z", "window_start": "2026-12-04T16:45:00+09:00",
                                 "window_end": "2026-12-04T17:00:00+09:00", "left_s": 59.0, "ended": False,
                                 "energy_kwh": 118.25, "power_kw": 480.4, "projected_kw": 481.2,
                                 "alarms_kw": [450.0]},
                        "windows": [
                            {"start": "2026-12-04T16:30:00+09:00", "demand_kw": 512.4, "energy_kwh": 128.1,
                             "coverage": 0.9733, "longest_gap_s": 24.0, "flags": ["edge_gap", "restart"]},
                            {"start": "2026-12-04T16:15:00+09:00", "demand_kw": 430.0, "energy_kwh": 107.5,
                             "coverage": 1.0, "longest_gap_s": 1.0, "flags": []}]},
                       {"name": "plant", "kind": "group", "members": ["incomer-1", "incomer-2"], "window_s": 900,
                        "target_kw": 900.0, "levels_kw": [900.0], "waiting_until": None, "live": None,
                        "windows": []}],
                   "streams": [{"stream": "incomer-1/demand", "points": [
                       {"point": "demand", "value": 512.4, "unit": "kW", "quality": "uncertain",
                        "reason": "edge_gap", "ts": "2026-12-04T08:00:00.000Z"}]},
                               {"stream": "boiler-3/demand", "points": [
                       {"point": "demand", "value": 77.7, "unit": "kW", "quality": "good",
                        "reason": None, "ts": "2026-12-04T08:00:00.000Z"}]}]},
    }

    async def serve(route: Any) -> None:
        path = "/" + route.request.url.split("/", 3)[3].split("?")[0]
        if path == "/page.json":
            await route.fulfill(status=200, content_type="application/json", body=json.dumps(snapshot))
        elif path in assets:
            await route.fulfill(status=200, content_type=assets[path].content_type, body=assets[path].body)
        else:
            await route.fulfill(status=404, body="not found")

    page = await browser.new_page(locale="en-GB", viewport={"width": 390, "height": 844}, timezone_id="Asia/Seoul")
    await page.route("http://gateway.test/**", serve)
    await page.goto("http://gateway.test/")
    await page.wait_for_selector('[data-stream="boiler-3/demand"] tr[data-point="demand"]', timeout=10_000)
    gateway = await page.inner_text("#gateway")
    assert "NOT synchronised" in gateway and "steps 1" in gateway and "last_step_s" in gateway, gateway
    energy = await page.inner_text("#energy")
    assert "Alarm levels raised\n1" in energy and "clock_steps" in energy, energy  # keys unknown to it: as they are
    assert await page.query_selector('[data-stream="incomer-1/demand"]') is None  # its card shows its windows
    card = '[data-meter="incomer-1"]'
    assert await page.get_attribute(card, "data-alarm") == "raised"
    assert await page.inner_text(f"{card} .alarm") == "ALARM ≥ 450 kW"
    assert await page.inner_text(f"{card} .window") == "12-04 16:45–17:00, 59 s left"
    assert await page.inner_text(f"{card} .projected strong") == "481.2 kW"
    rows = [await row.inner_text() for row in await page.query_selector_all(f"{card} table.windows tbody tr")]
    assert rows[:2] == ["12-04 16:30\t512.4 kW\t128.1 kWh\t97.3 %",
                        "edge interpolated across a gap; agent restarted in the window; readings missing: 97.3 % "
                        "covered, longest gap 24 s"], rows
    assert rows[2:] == ["12-04 16:15\t430 kW\t107.5 kWh\t100.0 %", "complete"], rows
    plant = await page.inner_text('[data-meter="plant"][data-alarm="waiting"]')
    assert "group: incomer-1 + incomer-2" in plant and "Waiting for every meter" in plant, plant
    await page.screenshot(path=str(tmp_path / "status-page-energy-snapshot.png"), full_page=True)
    await page.click("#lang")  # Korean, without a reload
    await page.wait_for_function("document.querySelector('#energy h2').textContent === '에너지·수요전력'")
    korean = await page.inner_text("#energy")
    for label in ("구간 종료 시 예측 수요전력", "목표 수요전력", "경보", "59 초 남음", "경계 보간 (수집 공백)",
                  "구간 중 에이전트 재시작", "정상", "합계 그룹", "최근 수요 구간", "수집률"):
        assert label in korean, label
    await page.screenshot(path=str(tmp_path / "status-page-energy-ko.png"), full_page=True)
    print(f"screenshots: {tmp_path}")
    assert "disk_full" in await page.inner_text("#buffer")  # a key another stage adds, shown as it is
    await page.close()


COUNTER_WH = ('{ name = "active_energy_wh", function = "holding", address = 100, type = "uint32", '
              'word_order = "CDAB", unit = "Wh" },')


def energy_meter(name: str, port: int, unit_id: int, energy: str) -> str:
    return f"""
        [[devices]]
        name = "{name}"
        driver = "modbus"
        host = "127.0.0.1"
        port = {port}
        unit_id = {unit_id}
        poll_interval = "300ms"
        timeout = "300ms"
        points = [
          {{ name = "active_power", function = "input", address = 24, type = "float32", unit = "kW" }},
          {COUNTER_WH}
        ]
        energy = {{ import_point = "active_energy_wh", {energy} }}
        """


def state_of_an_agent_stopped_mid_window(config: Path, name: str, counter_wh: float) -> None:
    """The state file an agent stopped a moment ago would have left: it had read the counter before the open
    window's start edge, so it resumes that window with live demand at its first poll (the first window after
    commissioning has none: nothing was read before its start; waiting for the next edge takes up to a
    minute). Written by the stage's own tracker from two readings of the simulated meter's counter."""
    from agent.config import load_config
    from energy.config import plan
    from energy.stage import STATE_VERSION
    from energy.windows import MeterTracker, window_start

    spec = plan(load_config(config).devices, load_config(config).energy).meters[name]
    now = time.time()
    edge = window_start(now, spec.window_s, spec.zone)
    tracker = MeterTracker(spec)
    # 45 kW since 16 s before the edge: a slope longer than the 1-minute window's lookback (15 s), so the alarm
    # was raised before the stop and stays raised through the restart (alarms wait for a full-lookback slope).
    tracker.observe(edge - 16, (counter_wh - 45.0 * (now - edge + 16) / 3.6,))
    tracker.observe(now, (counter_wh,))
    state = {"version": STATE_VERSION, "saved": now, "meters": {name: tracker.snapshot()}, "groups": {}, "outbox": []}
    (config.parent / "energy-state.json").write_text(__import__("json").dumps(state))


async def test_the_page_shows_live_demand_and_the_alarm_per_meter_without_a_reload(
        tmp_path: Path, mosquitto: MosquittoProcess, browser: Any) -> None:
    """A running agent with two simulated meters that have energy tables: the one resumed mid-window shows its
    live demand (energy so far, projection, target, levels raised, time left) within its first polls, following
    it without a reload, and its alarm, since the simulated feeder (45 kW and more) is far over its 10 kW
    target; the one seen for the first time shows live demand too, saying how much of its window is estimated.
    On a phone's width."""
    loaded, fresh = PowerMeter(seed=3), PowerMeter(seed=4)
    async with SimServer({1: loaded, 2: fresh}, update_interval=0.2) as meters:
        config = agent_config(tmp_path, mosquitto.port,
                              energy_meter("incomer-a", meters.port, 1,
                                           'window = "1m", target_kw = 10, alarm_levels = [50, 100], max_kw = 2000')
                              + energy_meter("incomer-b", meters.port, 2, 'window = "60m", target_kw = 500'))
        await asyncio.sleep(0.3)  # the simulator's counter has started counting
        state_of_an_agent_stopped_mid_window(config, "incomer-a", round(loaded.energy_wh))
        hour_edge = time.time() - time.time() % 3600 + 3600  # Asia/Seoul's hours are UTC's
        agent, stop, task = await start_agent(config)
        started = time.time()
        try:
            assert agent.metrics is not None
            # A phone whose zone is UTC: the windows are Asia/Seoul's wall clock, and the page says so.
            page = await browser.new_page(locale="en-US", viewport={"width": 390, "height": 844}, timezone_id="UTC")
            await page.goto(f"http://127.0.0.1:{agent.metrics.port}/")
            card = '[data-meter="incomer-a"]'
            await page.wait_for_selector(f'{card}[data-alarm="raised"] dl.live', timeout=10_000)
            await page.evaluate("window.__notReloaded = true")
            text = await page.inner_text(card)
            assert "ALARM" in await page.inner_text(f"{card} .alarm"), text
            assert await page.inner_text(f"{card} .raised") == "5 kW, 10 kW", text
            assert await page.inner_text(f"{card} .target") == "10 kW (levels 5 kW, 10 kW)", text
            projected = float((await page.inner_text(f"{card} .projected")).split()[0].replace(",", ""))
            assert projected > 5, text  # the feeder draws 45 kW and more (its first level); the power estimate just
            # after a restart is one second of counter steps, so the projection is not exact yet
            assert "(UTC+09:00), " in await page.inner_text(f"{card} .window") and " s left" in text, text
            assert "restart" in text or "No window closed yet." in text, text
            so_far = await page.inner_text(f"{card} .so-far")
            reading = await page.inner_text(f"{card} .last-reading")
            await page.wait_for_function(
                "([card, before]) => document.querySelector(card + ' .last-reading').textContent !== before",
                arg=[card, reading], timeout=5_000)
            assert await page.evaluate("window.__notReloaded === true")
            print(f"energy so far {so_far}, then {await page.inner_text(f'{card} .so-far')}")
            if time.time() + 5 < hour_edge:  # incomer-b's first hour edge has not passed (it does, 0.3 % of runs)
                # Seen for the first time mid-hour: live demand from its second poll, the part of the hour
                # before the first reading estimated from the present power, and saying so.
                estimated = await page.inner_text('[data-meter="incomer-b"] .so-far .estimated')
                assert "estimated from the present power" in estimated and "not sent" in estimated, estimated
            if time.time() - started < 50:  # its power is not yet measured over a minute (the 60m window's lookback)
                b = '[data-meter="incomer-b"][data-alarm="settling"]'
                raised = await page.inner_text(f"{b} .raised")
                assert raised.startswith("none yet: alarms are decided in ") and " s, once the power" in raised, raised
                assert await page.inner_text(f"{b} .alarm") == "settling"
            shot = tmp_path / "status-page-energy-phone.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"status page screenshot: {shot}")
            await page.close()
        finally:
            await stop_agent(stop, task)
