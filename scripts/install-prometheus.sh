#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's `prometheus` package, so the alert rules and
# the scrape config in deploy/prometheus can be checked (`promtool check rules|config`).
# Does nothing when both `prometheus` and `promtool` are already on PATH.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "install-prometheus: promtool and prometheus already on PATH ($(command -v promtool)); nothing to do"
    exit 0
fi

fail() {
    echo "install-prometheus: error: $*" >&2
    exit 1
}

if ! command -v apt-get >/dev/null 2>&1; then
    fail "apt-get not found; install Prometheus (promtool) with your system's package manager"
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and no sudo; run this script as root"
    sudo_cmd=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-prometheus: apt-get update"
"${sudo_cmd[@]}" apt-get update -qq || fail "apt-get update failed; check the network and apt sources"
echo "install-prometheus: apt-get install prometheus"
# --no-install-recommends keeps node-exporter and friends out; we only need the binaries.
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends prometheus \
    || fail "apt-get install prometheus failed; see the apt output above"

# Debian's package starts a prometheus service where systemd runs; we only want the tools.
command -v promtool >/dev/null 2>&1 || fail "the prometheus package installed but promtool is not on PATH"
echo "install-prometheus: installed $(promtool --version 2>&1 | head -n 1)"
