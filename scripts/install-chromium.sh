#!/usr/bin/env bash
# Install headless Chromium from Debian's `chromium` package, so the integration test of the
# worker's dashboard page (tests/integration/test_dashboard_page.py) can open it as a person
# would. Does nothing when a Chromium is already on PATH.
set -euo pipefail

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "install-chromium: $name already on PATH ($(command -v "$name")); nothing to do"
        exit 0
    fi
done

fail() {
    echo "install-chromium: error: $*" >&2
    exit 1
}

if ! command -v apt-get >/dev/null 2>&1; then
    fail "apt-get not found; install Chromium with your system's package manager"
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo; run this script as root"
    sudo_cmd=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-chromium: apt-get update"
"${sudo_cmd[@]}" apt-get update -qq || fail "apt-get update failed; check the network and apt sources"
echo "install-chromium: apt-get install chromium fonts-dejavu-core"
# A font is needed for the page's text to render in a screenshot on a minimal machine.
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
    || fail "apt-get install chromium failed; see the apt output above"

command -v chromium >/dev/null 2>&1 || fail "the chromium package installed but chromium is not on PATH"
echo "install-chromium: installed $(chromium --version 2>/dev/null | head -n 1)"
