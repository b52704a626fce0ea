#!/bin/sh
# Installs, upgrades or removes edge-agent on a gateway from an unpacked offline bundle (deploy/build-bundle
# makes the bundle). Never uses the network: pip runs with --no-index on the bundle's wheels.
#
# What lives where, and what each run does to it:
#   /opt/edge-agent/venvs/<version>-<time>  one virtual environment per install; replaced, never edited
#   /opt/edge-agent/venv                    symlink to the current one: the unit runs venv/bin/edge-agent. An
#                                           upgrade builds the new venv beside the old one, checks it, then
#                                           renames a new symlink over this one (atomic: a restart sees the old
#                                           or the new program, never half of each), then removes the old venv.
#   /opt/edge-agent/docs, install.sh, ...   replaced at every install; removed by --uninstall
#   /etc/edge-agent/config.toml             written from the example only if absent; otherwise never touched
#   /var/lib/edge-agent                     the buffer; created if absent; otherwise never touched
#   /etc/systemd/system/edge-agent.service  replaced at every install
#   /usr/local/bin/edge-agent               symlink to /opt/edge-agent/venv/bin/edge-agent, if nothing is there
# --uninstall removes the unit and /opt/edge-agent and keeps the config and the buffer; --purge also removes
# them and the user. With --prefix DIR every path is under DIR, and what needs the real system (useradd,
# chown, starting the service) is only printed: that is how the test suite installs into a temporary folder.
# Where systemd does not run (a chroot, an image build, a container build, or --prefix) the unit is enabled
# offline in the root's files (systemctl --root), so that it starts at the first boot.
set -eu

NAME=edge-agent
USER_NAME=edge-agent

say() { printf '%s\n' "install.sh: $*"; }
die() { printf '%s\n' "install.sh: error: $*" >&2; exit 1; }

usage() {
    cat <<'EOF'
Usage: sh install.sh [--prefix DIR] [--no-start] [--python PATH]
       sh install.sh --uninstall [--purge] [--prefix DIR]

Installs edge-agent from this bundle (run as root, no network needed), or upgrades an existing install:
config (/etc/edge-agent) and buffer (/var/lib/edge-agent) are kept.

  --python PATH  the Python to build the virtual environment with (default: pythonX.Y of the bundle, or python3)
  --no-start     install and enable the service, but do not start or restart it
  --uninstall    stop and remove the service and /opt/edge-agent; keep /etc/edge-agent and /var/lib/edge-agent
  --purge        with --uninstall: also remove /etc/edge-agent, /var/lib/edge-agent and the user edge-agent
  --prefix DIR   install under DIR (DIR/opt/edge-agent, DIR/etc/edge-agent, ...) instead of /, without
                 touching users, file owners or systemd; for tests: the program runs from DIR (it names its
                 interpreter by absolute path), so DIR is not an image to copy to another root
EOF
}

prefix=""
start=yes
action=install
purge=no
python=""
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs the path of a Python interpreter"; python=$2; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        --no-start) start=no; shift ;;
        --uninstall) action=uninstall; shift ;;
        --purge) purge=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done
[ "$purge" = no ] || [ "$action" = uninstall ] || die "--purge only goes with --uninstall"

if [ -n "$prefix" ]; then
    mkdir -p "$prefix"
    prefix=$(cd "$prefix" && pwd)  # absolute: the venv's scripts name their interpreter by absolute path
    [ "$prefix" != / ] || prefix=""
elif [ "$(id -u)" != 0 ]; then
    die "run as root (sudo sh install.sh ...), or give --prefix DIR to install into a folder"
fi

bundle=$(cd "$(dirname "$0")" && pwd)
opt=$prefix/opt/$NAME
etc=$prefix/etc/$NAME
state=$prefix/var/lib/$NAME
unit=$prefix/etc/systemd/system/$NAME.service
command_link=$prefix/usr/local/bin/$NAME  # so that the docs' "edge-agent check ..." works in a root shell

# Runs a command that changes the real system (users, owners, systemd), or under --prefix says what it would
# have run.
system() {
    if [ -n "$prefix" ]; then
        say "skipped under --prefix, would run: $*"
    else
        "$@"
    fi
}

# A chroot may see the host's /run (bind-mounted by image builders): it is not a system systemd runs.
in_chroot() { command -v systemd-detect-virt >/dev/null 2>&1 && systemd-detect-virt --quiet --chroot; }
systemd_running() {
    [ -z "$prefix" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && ! in_chroot
}
# systemctl on the unit files of the root being installed into, without a running systemd (enable, disable).
systemctl_offline() { systemctl --root="${prefix:-/}" "$@"; }

uninstall() {
    if systemd_running && [ -e "$unit" ]; then
        systemctl disable --now --quiet "$NAME.service" || say "warning: could not stop or disable $NAME.service"
    elif [ -e "$unit" ] && command -v systemctl >/dev/null 2>&1; then
        systemctl_offline disable --quiet "$NAME.service" || say "warning: could not disable $NAME.service"
    fi
    rm -f "$unit"
    if systemd_running; then systemctl daemon-reload; fi
    if [ -L "$command_link" ] && [ "$(readlink "$command_link")" = "$opt/venv/bin/$NAME" ]; then
        rm -f "$command_link"
    fi
    rm -rf "$opt"
    say "removed $unit and $opt"
    if [ "$purge" = yes ]; then
        rm -rf "$etc" "$state"
        say "removed $etc (config) and $state (buffer: readings not yet delivered are gone)"
        if [ -n "$prefix" ]; then
            say "skipped under --prefix, would run: userdel $USER_NAME"
        elif id "$USER_NAME" >/dev/null 2>&1; then
            userdel "$USER_NAME"
            if getent group "$USER_NAME" >/dev/null 2>&1; then groupdel "$USER_NAME"; fi
            say "removed the user $USER_NAME"
        fi
    else
        say "kept $etc (config) and $state (buffer); remove them with --uninstall --purge"
    fi
}

if [ "$action" = uninstall ]; then
    uninstall
    exit 0
fi

# --- install or upgrade -----------------------------------------------------------------------------------

# Nothing from the caller's environment may redirect pip (PIP_FIND_LINKS, PIP_USER, PIP_TARGET...) or Python.
for variable in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$variable"; done
unset PYTHONPATH PYTHONHOME

[ -f "$bundle/MANIFEST" ] && [ -d "$bundle/wheels" ] ||
    die "$bundle is not an unpacked bundle (no MANIFEST and wheels/ next to install.sh)"
manifest_value() { sed -n "s/^$1=//p" "$bundle/MANIFEST" | head -n 1; }
version=$(manifest_value version)
target=$(manifest_value python)
target_arch=$(manifest_value arch)
target_glibc=$(manifest_value glibc)
[ -n "$version" ] && [ -n "$target" ] || die "$bundle/MANIFEST has no version or python line"
target_major=${target%%.*}
target_minor=${target#*.}

# The interpreter: the bundle's compiled wheels (pydantic-core, cryptography...) fit one Python version.
if [ -z "$python" ]; then
    for candidate in "python$target" python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python=$(command -v "$candidate"); break; fi
    done
    [ -n "$python" ] || die "no Python found: this bundle needs Python $target (python$target or python3 on PATH; \
Debian/Ubuntu package python3), or give --python PATH"
fi
found=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
    die "$python: not found, or not a Python interpreter (give --python PATH of python$target)"
found_minor=${found#*.}
if [ "${found%%.*}" != "$target_major" ] || [ "$found_minor" -lt "$target_minor" ]; then
    die "$python is Python $found; this bundle needs Python $target: install python$target and give --python PATH"
fi
compiled=""
for wheel in "$bundle/wheels/"*-cp"$target_major$target_minor"-*.whl; do
    if [ -e "$wheel" ]; then compiled=${wheel##*/}; break; fi
done
if [ "$found" != "$target" ] && [ -n "$compiled" ]; then
    die "$python is Python $found, but this bundle's compiled wheels are for Python $target only ($compiled): \
install python$target and give --python PATH, or build a bundle for this gateway: deploy/build-bundle --python $found"
fi
"$python" -c 'import venv' 2>/dev/null || die "$python has no venv module (Debian/Ubuntu: package python$found-venv)"

# The bundle is for this machine, and arrived whole.
"$python" - "$bundle" "$target_arch" "$target_glibc" <<'EOF' || exit 1
import hashlib, os, platform, re, sys
bundle, arch, glibc = sys.argv[1:]
machine = platform.machine()
if arch and machine != arch:
    sys.exit(f"install.sh: error: this bundle is for {arch}, this machine is {machine}: "
             f"build one with deploy/build-bundle --arch {machine}")
if glibc:
    name, _, have = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    if name != "glibc" or tuple(map(int, have.split(".")[:2])) < tuple(map(int, glibc.split("."))):
        sys.exit(f"install.sh: error: this bundle needs glibc {glibc} or newer, this machine has "
                 f"{have or 'none'}: build one with deploy/build-bundle --glibc {have or '...'}")
bad = []
with open(os.path.join(bundle, "MANIFEST")) as manifest:
    for line in manifest:
        match = re.fullmatch(r"([0-9a-f]{64})  (.+)\n?", line)
        if not match:
            continue
        path = os.path.join(bundle, match.group(2))
        try:
            with open(path, "rb") as file:
                ok = hashlib.file_digest(file, "sha256").hexdigest() == match.group(1)
        except OSError:
            ok = False
        if not ok:
            bad.append(match.group(2))
if bad:
    sys.exit("install.sh: error: the bundle is damaged or incomplete (copy it again): " + ", ".join(bad[:5]))
EOF

if [ -n "$prefix" ]; then
    say "installing edge-agent $version into $prefix with $python (Python $found)"
else
    say "installing edge-agent $version with $python (Python $found)"
fi
previous=""
[ ! -f "$opt/MANIFEST" ] || previous=$(sed -n 's/^version=//p' "$opt/MANIFEST" | head -n 1)
[ -z "$previous" ] || say "upgrading: edge-agent $previous is installed; config and buffer are kept"
was_active=no
if systemd_running && systemctl is-active --quiet "$NAME.service"; then was_active=yes; fi

# The user the service runs as (the unit says User=edge-agent, SupplementaryGroups=dialout).
if [ -n "$prefix" ]; then
    say "skipped under --prefix, would run: useradd --system --user-group --no-create-home \
--home-dir /var/lib/$NAME --shell /usr/sbin/nologin --groups dialout $USER_NAME (if missing)"
elif id "$USER_NAME" >/dev/null 2>&1; then
    if getent group dialout >/dev/null 2>&1 && ! id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx dialout; then
        usermod -a -G dialout "$USER_NAME"
        say "added the user $USER_NAME to the group dialout (serial ports)"
    fi
else
    command -v useradd >/dev/null 2>&1 || die "useradd not found: create the system user $USER_NAME yourself"
    group_option=--user-group
    if getent group "$USER_NAME" >/dev/null 2>&1; then group_option="--gid $USER_NAME"; fi
    groups_option=""
    if getent group dialout >/dev/null 2>&1; then groups_option="--groups dialout"; fi
    # shellcheck disable=SC2086  # the options are single words, or two words meant to split
    useradd --system $group_option $groups_option --no-create-home --home-dir "/var/lib/$NAME" \
        --shell /usr/sbin/nologin "$USER_NAME"
    say "created the system user $USER_NAME"
fi

# The program: a new venv beside the current one, from the bundle's wheels only.
mkdir -p "$opt/venvs"
chmod 0755 "$opt" "$opt/venvs"
venv_name=$version-$(date -u +%Y%m%dT%H%M%SZ)-$$
venv=$opt/venvs/$venv_name
cleanup_new_venv() { rm -rf "$venv" "$opt/venv.new"; }
trap cleanup_new_venv EXIT
trap 'exit 1' INT TERM HUP
"$python" -m venv --without-pip "$venv" || die "could not create a virtual environment with $python"
pip_wheel=""
for wheel in "$bundle/wheels/"pip-*.whl; do
    if [ -e "$wheel" ]; then pip_wheel=$wheel; fi
done
[ -n "$pip_wheel" ] || die "the bundle has no pip wheel"
# The gateway's pip settings (pip.conf, PIP_INDEX_URL...) must not send pip to the network: --no-index.
if ! PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 "$venv/bin/python" "$pip_wheel/pip" install --no-index \
        --find-links "$bundle/wheels" --no-cache-dir --disable-pip-version-check --no-warn-script-location \
        --quiet "$NAME==$version"; then
    die "pip could not install edge-agent $version from the bundle's wheels (see above); the installed program \
was not changed"
fi
installed=$("$venv/bin/$NAME" --version 2>&1) || die "the new program does not start: $installed"
say "built $venv ($installed)"

# The config: the example only if there is none. The service reads it as group edge-agent.
if [ ! -d "$etc" ]; then
    mkdir -p "$etc"
    chmod 0750 "$etc"
    system chown "root:$USER_NAME" "$etc"
fi
if [ -e "$etc/config.toml" ]; then
    say "kept $etc/config.toml"
    config_is_new=no
else
    cp "$bundle/deploy/config.example.toml" "$etc/config.toml.new"
    chmod 0640 "$etc/config.toml.new"
    mv "$etc/config.toml.new" "$etc/config.toml"
    system chown "root:$USER_NAME" "$etc/config.toml"
    say "wrote $etc/config.toml from the example"
    config_is_new=yes
fi

# The buffer's folder.
if [ ! -d "$state" ]; then
    mkdir -p "$state"
    chmod 0750 "$state"
    system chown "$USER_NAME:$USER_NAME" "$state"
fi

# Check the config with the new program before switching to it: a running agent is not replaced by a version
# that would refuse its config. As the service's user where possible, so that a password file only root can
# read shows up here and not at the first start.
as_service_user=""
if [ -z "$prefix" ] && command -v runuser >/dev/null 2>&1; then as_service_user="runuser -u $USER_NAME --"; fi
config_ok=yes
check_output=$(cd / && $as_service_user "$venv/bin/$NAME" check --config "$etc/config.toml" 2>&1) || config_ok=no
if [ "$config_ok" = no ] && [ "$was_active" = yes ]; then
    printf '%s\n' "$check_output" | sed 's/^/    /' >&2
    die "edge-agent $version rejects the config of the running agent (above); nothing was changed: fix \
$etc/config.toml for the new version, or keep $previous"
fi

# Switch: a new symlink renamed over the old one (rename(2) is atomic; mv would move it into the directory).
old_venv=""
if [ -L "$opt/venv" ]; then
    link=$("$python" -c 'import os, sys; print(os.readlink(sys.argv[1]))' "$opt/venv")
    case $link in
        venvs/*) old_venv=$opt/$link ;;
        *) say "warning: $opt/venv pointed to $link, which this installer did not make: left in place" ;;
    esac
elif [ -e "$opt/venv" ]; then
    old_venv=$opt/venvs/unmanaged-$venv_name
    mv "$opt/venv" "$old_venv"
fi
ln -s "venvs/$venv_name" "$opt/venv.new"
"$python" -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$opt/venv.new" "$opt/venv"
trap - EXIT
say "switched $opt/venv to venvs/$venv_name"

rm -rf "$opt/docs.new"
mkdir -p "$opt/docs.new"
cp -R "$bundle/docs/." "$opt/docs.new/"
rm -rf "$opt/docs" && mv "$opt/docs.new" "$opt/docs"
if [ -d "$bundle/drivers" ]; then rm -rf "$opt/drivers" && cp -R "$bundle/drivers" "$opt/drivers"; fi
for file in install.sh MANIFEST INSTALL.txt; do cp "$bundle/$file" "$opt/$file.new" && mv "$opt/$file.new" "$opt/$file"; done
cp "$bundle/deploy/config.example.toml" "$opt/config.example.toml"

if [ ! -e "$command_link" ] && [ ! -L "$command_link" ]; then
    mkdir -p "${command_link%/*}"
    ln -s "$opt/venv/bin/$NAME" "$command_link"
    say "linked $command_link to $opt/venv/bin/$NAME"
fi

# The unit.
mkdir -p "${unit%/*}"
cp "$bundle/systemd/$NAME.service" "$unit.new"
chmod 0644 "$unit.new"
mv "$unit.new" "$unit"
say "installed $unit"

if [ "$config_ok" = yes ]; then
    say "config check: $(printf '%s\n' "$check_output" | head -n 1)"
else
    say "config check: $etc/config.toml needs editing before the agent can start:"
    printf '%s\n' "$check_output" | sed 's/^/    /'
    if [ "$config_is_new" = yes ]; then
        say "it is the example: set [gateway] id and site, [mqtt] host and the password and CA files, and \
your [[devices]] (docs: $opt/docs/config.md). Then: $opt/venv/bin/$NAME check --config $etc/config.toml"
    fi
fi

# systemd: enable always; start or restart only with a config the agent accepts.
if ! systemd_running; then
    # A chroot or image build (or --prefix): the unit files are enabled offline; it starts at the next boot.
    if ! command -v systemctl >/dev/null 2>&1; then
        say "systemctl not found: enable $unit yourself"
    elif systemctl_offline enable --quiet "$NAME.service"; then
        say "enabled $NAME.service offline (systemd is not running here: it starts at the next boot)"
    else
        die "could not enable $NAME.service offline (systemctl --root=${prefix:-/} enable $NAME.service)"
    fi
    if [ -n "$prefix" ]; then
        [ "$start" = no ] || say "skipped under --prefix, would run: systemctl start $NAME.service (restart if \
it was running; only if the config check passed)"
    fi
else
    systemctl daemon-reload
    systemctl enable --quiet "$NAME.service"
    if [ "$start" = no ]; then
        say "enabled $NAME.service; not started (--no-start)"
    elif [ "$config_ok" = no ]; then
        say "enabled $NAME.service; not started: edit the config, then: systemctl start $NAME"
    elif [ "$was_active" = yes ]; then
        systemctl restart "$NAME.service" || die "$NAME.service did not restart: journalctl -u $NAME -e tells why"
        say "restarted $NAME.service"
    else
        systemctl start "$NAME.service" || die "$NAME.service did not start: journalctl -u $NAME -e tells why"
        say "started $NAME.service"
    fi
fi

# The previous program goes, unless a running agent still uses it (--no-start during an upgrade); so do
# venvs left by an interrupted run.
keep=""
if [ "$was_active" = yes ] && [ "$start" = no ] && [ -n "$old_venv" ]; then
    keep=$old_venv
    say "the running agent still uses the previous program until: systemctl restart $NAME"
fi
for dir in "$opt/venvs/"*; do
    if [ -d "$dir" ] && [ "$dir" != "$venv" ] && [ "$dir" != "$keep" ]; then rm -rf "$dir"; fi
done
say "done: edge-agent $version. Check it with: systemctl status $NAME; \
$opt/venv/bin/$NAME status --config $etc/config.toml"
