#!/usr/bin/env bash
# Install the openssl command from Debian's `openssl` package: the secured broker of
# `stream-knn broker start --secure` and of tests/integration/test_secure_kafka.py makes
# its CA and certificates with it. Does nothing when openssl is already on PATH.
set -euo pipefail

if command -v openssl >/dev/null 2>&1; then
    echo "install-openssl: openssl already on PATH ($(command -v openssl)); nothing to do"
    exit 0
fi

fail() {
    echo "install-openssl: error: $*" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found; install openssl with your system's package manager"

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo; run this script as root"
    sudo_cmd=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-openssl: apt-get update"
"${sudo_cmd[@]}" apt-get update -qq || fail "apt-get update failed; check the network and apt sources"
echo "install-openssl: apt-get install openssl"
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends openssl \
    || fail "apt-get install openssl failed; see the apt output above"

command -v openssl >/dev/null 2>&1 || fail "the openssl package installed but openssl is not on PATH"
echo "install-openssl: installed $(openssl version)"
