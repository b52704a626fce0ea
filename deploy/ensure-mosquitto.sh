#!/bin/sh
# Makes sure the mosquitto broker binary is installed: the test suite and the benchmarks start their own
# brokers on free loopback ports (they never use a system broker on 1883). Installs the distribution's
# package when it is missing and this user may install packages. Under CI (CI=true) a missing broker is
# an error, because the suite would otherwise skip its tests against a real broker.
set -u

have_mosquitto() {
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ -x /usr/local/sbin/mosquitto ]
}

have_mosquitto && exit 0

if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    as_root="none"
fi

if [ "$as_root" != "none" ]; then
    echo "mosquitto is not installed: installing it for the test suite"
    if command -v apt-get >/dev/null 2>&1; then
        $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq mosquitto >/dev/null
    elif command -v dnf >/dev/null 2>&1; then
        $as_root dnf install -y -q mosquitto
    elif command -v apk >/dev/null 2>&1; then
        $as_root apk add --quiet mosquitto
    fi
fi

if have_mosquitto; then
    exit 0
fi
echo "mosquitto is not installed and could not be installed here (install the 'mosquitto' package);" \
     "tests that need a real broker will be skipped" >&2
if [ "${CI:-}" = "true" ]; then
    exit 1
fi
exit 0
