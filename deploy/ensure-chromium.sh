#!/bin/sh
# Makes sure a Chromium is installed for the status page's tests (tests/test_status_page.py), which drive
# the distribution's browser through Playwright; Playwright never downloads a browser of its own. Installs
# the distribution's package (and a Korean font, so that screenshots of the Korean page are readable) when
# missing and this user may install packages. Under CI (CI=true) a missing browser is an error, because
# the page's tests would otherwise be skipped.
set -u

have_chromium() {
    [ -x "${EDGE_AGENT_CHROMIUM:-/usr/bin/chromium}" ]
}

have_korean_font() {
    ! command -v fc-list >/dev/null 2>&1 || [ -n "$(fc-list :lang=ko 2>/dev/null | head -n 1)" ]
}

have_chromium && have_korean_font && exit 0

if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    as_root="none"
fi

if [ "$as_root" != "none" ]; then
    echo "chromium (or a Korean font) is not installed: installing it for the status page's tests"
    if command -v apt-get >/dev/null 2>&1; then
        $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium \
            fonts-nanum >/dev/null
    elif command -v dnf >/dev/null 2>&1; then
        $as_root dnf install -y -q chromium google-noto-sans-cjk-ttc-fonts
    elif command -v apk >/dev/null 2>&1; then
        $as_root apk add --quiet chromium font-noto-cjk
    fi
fi

if have_chromium; then
    exit 0
fi
echo "chromium is not installed and could not be installed here (install the 'chromium' package, or name" \
     "another with EDGE_AGENT_CHROMIUM); the status page's browser tests will be skipped" >&2
if [ "${CI:-}" = "true" ]; then
    exit 1
fi
exit 0
