"""The offline install, end to end: deploy/build-bundle builds the bundle once for this module (that step may
use PyPI), and deploy/install.sh installs it into a temporary root (--prefix) with the network cut off,
upgrades over itself with the config and the buffer kept byte for byte, and uninstalls with and without
--purge. Real pip, real virtual environments, the installed program run from where it was installed."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import __version__
from tests.certs import make_test_certificates
from tests.conftest import REPO

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
PY_NODOT = PY.replace(".", "")

# Measured on the 2-core machine: the bundle builds in 5-6 s (about the same with pip's cache empty), one
# install or upgrade takes 5-6 s, the whole module 20-23 s; the lifecycle test, the longest, 12 s.
pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Bundle:
    tarball: Path
    root: Path  # the unpacked folder, as a technician has it on the gateway


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    work = tmp_path_factory.mktemp("bundle")
    started = time.monotonic()
    built = subprocess.run([sys.executable, str(REPO / "deploy" / "build-bundle"), "--output", str(work / "dist"),
                            "--quiet"], capture_output=True, text=True, timeout=50)
    assert built.returncode == 0, built.stdout + built.stderr
    print(f"bundle built in {time.monotonic() - started:.1f} s: {built.stdout.strip()}")
    (tarball,) = (work / "dist").glob("*.tar.gz")
    with tarfile.open(tarball) as tar:
        tar.extractall(work / "unpacked", filter="data")
    (root,) = (work / "unpacked").iterdir()
    return Bundle(tarball, root)


def base_python() -> str:
    """The interpreter this venv was made from: what a gateway has as /usr/bin/python3."""
    candidate = Path(sys.base_prefix) / "bin" / f"python{PY}"
    return str(candidate if candidate.exists() else sys.executable)


def offline_env() -> dict[str, str]:
    """Any attempt at an index or a proxy goes to a closed port."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.pop("PYTHONPATH", None)
    dead = "http://127.0.0.1:9/"
    env.update(PIP_INDEX_URL=dead, PIP_EXTRA_INDEX_URL=dead, http_proxy=dead, https_proxy=dead,
               HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    return env


def network_cut() -> list[str]:
    """Where this user may, run in an empty network namespace as well: no interface, no DNS, nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0:
        return [unshare, "--net"]
    return []


def install(bundle_root: Path, *args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [*network_cut(), "sh", str(bundle_root / "install.sh"), *args]
    if python is not None or "--uninstall" not in args:
        command += ["--python", python or base_python()]
    return subprocess.run(command, capture_output=True, text=True, timeout=40, env=offline_env(), cwd=bundle_root)


def installed(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed program, started from its own bin/ folder, away from this checkout."""
    return subprocess.run([str(prefix / "opt/edge-agent/venv/bin/edge-agent"), *args], capture_output=True,
                          text=True, timeout=30, env=offline_env(), cwd=prefix)


def config_for_prefix(prefix: Path) -> str:
    """The example with its absolute paths moved under the prefix, and the files it names created, as a
    technician would set up a gateway."""
    etc = prefix / "etc/edge-agent"
    (etc / "mqtt-password").write_text("secret\n")
    # `check` loads the CA bundle as the uplink will: it must hold a certificate.
    shutil.copy(make_test_certificates(prefix.parent / "test-certs").ca_file, etc / "platform-ca.pem")
    text = (REPO / "deploy/config.example.toml").read_text()
    text = text.replace("/var/lib/edge-agent", str(prefix / "var/lib/edge-agent"))
    text = text.replace("/etc/edge-agent/", f"{etc}/")
    return text.replace('id = "changwon-a-gw01"', 'id = "test-gw01"')


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in paths}


def this_glibc() -> str:
    name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    assert name == "glibc", name
    return version


def test_the_bundle_is_named_for_its_target_and_lists_the_sha256_of_every_file(bundle: Bundle) -> None:
    # The glibc is in the name: bundles for two gateways of one CPU must not overwrite each other.
    glibc = this_glibc()
    assert bundle.tarball.name == f"edge-agent-{__version__}-py{PY_NODOT}-{platform.machine()}-glibc{glibc}.tar.gz"
    assert f"glibc={glibc}\n" in (bundle.root / "MANIFEST").read_text()
    manifest = (bundle.root / "MANIFEST").read_text()
    assert f"version={__version__}\n" in manifest and f"python={PY}\n" in manifest
    assert f"arch={platform.machine()}\n" in manifest
    sums = dict(reversed(line.split("  ", 1)) for line in manifest.splitlines() if re.match(r"[0-9a-f]{64}  ", line))
    files = {path.relative_to(bundle.root).as_posix() for path in bundle.root.rglob("*") if path.is_file()}
    assert set(sums) == files - {"MANIFEST"}
    for name, digest in sums.items():
        assert hashlib.sha256((bundle.root / name).read_bytes()).hexdigest() == digest, name

    for name in ("install.sh", "INSTALL.txt", "systemd/edge-agent.service", "deploy/config.example.toml",
                 "docs/troubleshooting.md", "docs/config.md"):
        assert name in files, name
    assert os.access(bundle.root / "install.sh", os.X_OK)
    wheels = sorted(path.name for path in (bundle.root / "wheels").iterdir())
    assert all(name.endswith(".whl") for name in wheels), "an sdist would have to compile on the gateway"
    assert f"edge_agent-{__version__}-py3-none-any.whl" in wheels
    # Compiled dependencies are for the target's Python and CPU; everything else is pure Python.
    (core,) = [name for name in wheels if name.startswith("pydantic_core-")]
    assert f"-cp{PY_NODOT}-cp{PY_NODOT}-" in core and platform.machine() in core
    for name in wheels:
        tags = name.removesuffix(".whl").split("-")[-3:]
        assert tags[2] == "any" or platform.machine() in tags[2], name


def test_install_upgrade_over_itself_and_uninstall_in_a_temporary_root(bundle: Bundle, tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    opt, etc, state = prefix / "opt/edge-agent", prefix / "etc/edge-agent", prefix / "var/lib/edge-agent"
    config, buffer = etc / "config.toml", state / "buffer.db"

    started = time.monotonic()
    first = install(bundle.root, "--prefix", str(prefix))
    print(f"install: {time.monotonic() - started:.1f} s")
    assert first.returncode == 0, first.stdout + first.stderr
    # The real system was not touched; the output says what would have been done there.
    assert "would run: useradd --system" in first.stdout
    # Not booted with systemd here (as in a chroot or an image build): the unit is enabled offline, in the
    # root's files, so that it starts at the first boot.
    wants = prefix / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    if shutil.which("systemctl"):
        assert "enabled edge-agent.service offline" in first.stdout, first.stdout
        assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/edge-agent.service"
    else:
        assert "systemctl not found: enable" in first.stdout
    assert f"would run: chown root:edge-agent {config}" in first.stdout
    # The example is installed as it is, and the installer says what still needs editing.
    assert config.read_bytes() == (REPO / "deploy/config.example.toml").read_bytes()
    assert config.stat().st_mode & 0o777 == 0o640 and etc.stat().st_mode & 0o777 == 0o750
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o750
    assert "needs editing" in first.stdout and "mqtt.password_file: file not found" in first.stdout
    unit = prefix / "etc/systemd/system/edge-agent.service"
    assert unit.read_bytes() == (REPO / "systemd/edge-agent.service").read_bytes()
    # What the unit names exists under the prefix: ExecStart and Documentation.
    unit_text = unit.read_text()
    assert "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/config.toml" in unit_text
    assert "Documentation=file:///opt/edge-agent/docs/troubleshooting.md" in unit_text
    assert (opt / "docs/troubleshooting.md").read_bytes() == (REPO / "docs/troubleshooting.md").read_bytes()

    assert installed(prefix, "--version").stdout.strip() == f"edge-agent {__version__}"
    command = prefix / "usr/local/bin/edge-agent"  # for the docs' "edge-agent check ..." in a root shell
    assert subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=30).returncode == 0
    where = subprocess.run([str(opt / "venv/bin/python"), "-c", "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, timeout=30, env=offline_env(), cwd=prefix)
    assert where.stdout.startswith(str(opt)), where.stdout + where.stderr  # not this checkout

    # The technician edits the config; the agent runs and leaves a buffer.
    config.write_text(config_for_prefix(prefix))
    checked = installed(prefix, "check", "--config", str(config))
    assert checked.returncode == 0 and f"{config}: OK" in checked.stdout, checked.stdout + checked.stderr
    assert f"buffer {buffer} " in checked.stdout
    buffer.write_bytes(os.urandom(64 * 1024))
    kept = snapshot(config, buffer, etc / "mqtt-password", etc / "platform-ca.pem")
    first_venv = (opt / "venv").resolve()

    started = time.monotonic()
    upgrade = install(bundle.root, "--prefix", str(prefix))
    print(f"upgrade: {time.monotonic() - started:.1f} s")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert f"upgrading: edge-agent {__version__} is installed" in upgrade.stdout
    assert f"kept {config}" in upgrade.stdout and f"config check: {config}: OK" in upgrade.stdout
    assert snapshot(*kept) == kept
    assert sorted(state.iterdir()) == [buffer]
    # A new venv replaced the old one, which is gone.
    assert (opt / "venv").is_symlink() and (opt / "venv").resolve() != first_venv and not first_venv.exists()
    assert [path.name for path in (opt / "venvs").iterdir()] == [(opt / "venv").resolve().name]
    assert installed(prefix, "--version").stdout.strip() == f"edge-agent {__version__}"
    assert installed(prefix, "check", "--config", str(config)).returncode == 0

    # Uninstall: the program goes, the config and the buffer stay; the installer left in /opt can do it.
    removed = install(opt, "--uninstall", "--prefix", str(prefix))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not opt.exists() and not unit.exists() and not command.is_symlink()
    assert snapshot(*kept) == kept
    assert not os.path.lexists(wants)  # disabled offline too

    purged = install(bundle.root, "--uninstall", "--purge", "--prefix", str(prefix))
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not etc.exists() and not state.exists()
    assert "would run: userdel edge-agent" in purged.stdout


def other_pythons() -> dict[str, str]:
    """Interpreters of other versions on this machine (on PATH, or beside this one as pyenv installs them)."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(8, 16)]
    candidates += [str(path) for path in Path(sys.base_prefix).parent.glob("3.*/bin/python3.*")
                   if re.fullmatch(r"python3\.\d+", path.name)]
    found: dict[str, str] = {}
    for candidate in filter(None, candidates):
        version = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        if version and version != PY:
            found.setdefault(version, candidate)
    return found


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_a_python_the_bundle_does_not_fit_is_refused_before_anything_is_written(bundle: Bundle,
                                                                                tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    missing = install(bundle.root, "--prefix", str(prefix), python=str(tmp_path / "no-python"))
    assert missing.returncode == 1 and "not a Python interpreter" in missing.stderr
    pythons = other_pythons()
    older = [version for version in pythons if version_key(version) < version_key(PY)]
    newer = [version for version in pythons if version_key(version) > version_key(PY)]
    for version in older[-1:]:
        refused = install(bundle.root, "--prefix", str(prefix), python=pythons[version])
        assert refused.returncode == 1, refused.stdout
        assert f"is Python {version}; this bundle needs Python {PY}" in refused.stderr
    for version in newer[:1]:
        refused = install(bundle.root, "--prefix", str(prefix), python=pythons[version])
        assert refused.returncode == 1, refused.stdout
        assert f"compiled wheels are for Python {PY} only" in refused.stderr
        assert f"build-bundle --python {version}" in refused.stderr
    assert not (prefix / "opt").exists() and not (prefix / "etc").exists()
    if not (older and newer):
        pytest.skip(f"only Python {PY} and {sorted(pythons)} here: the version checks ran in part")


def test_a_damaged_bundle_is_refused_before_anything_is_written(bundle: Bundle, tmp_path: Path) -> None:
    copy = tmp_path / bundle.root.name
    shutil.copytree(bundle.root, copy)
    (wheel,) = (copy / "wheels").glob("pydantic_core-*.whl")
    with wheel.open("r+b") as file:
        file.truncate(wheel.stat().st_size // 2)  # a copy to a USB stick that was pulled too early
    prefix = tmp_path / "root"
    refused = install(copy, "--prefix", str(prefix))
    assert refused.returncode == 1
    assert "the bundle is damaged or incomplete" in refused.stderr and wheel.name in refused.stderr
    assert not (prefix / "opt").exists()


def test_both_tools_explain_themselves() -> None:
    build_help = subprocess.run([sys.executable, str(REPO / "deploy/build-bundle"), "--help"], capture_output=True,
                                text=True, timeout=30)
    assert build_help.returncode == 0 and "--arch" in build_help.stdout and "--glibc" in build_help.stdout
    install_help = subprocess.run(["sh", str(REPO / "deploy/install.sh"), "--help"], capture_output=True, text=True,
                                  timeout=30)
    assert install_help.returncode == 0 and "--uninstall" in install_help.stdout and "--purge" in install_help.stdout
    wrong = subprocess.run(["sh", str(REPO / "deploy/install.sh"), "--purge"], capture_output=True, text=True,
                           timeout=30)
    assert wrong.returncode == 1 and "--purge only goes with --uninstall" in wrong.stderr
