#!/usr/bin/env bash
# Installs the system tools the tests need, when missing. The build itself
# needs only Rust and a C compiler: every .proto file (etcd's API included)
# is compiled by protox, in Rust, so no protoc is involved.
#   cc        gcc: the C compiler the linker and a few crates (ring,
#             mimalloc) use; rustup expects one, but a bare image may lack it.
#   etcd      etcd-server: the etcd store tests start real etcd members.
#   promtool  prometheus: the observability tests check metric expositions
#             and the shipped alerting rules with Prometheus' own tool, and
#             tests/python/test_prometheus_sd.py runs the server from the
#             same package (/usr/bin/prometheus) against the control plane.
#   dig       dnsutils: the DNS tests query the sidecar's DNS server with
#             dig, the client operators run.
#   curl      curl: the HTTP API's client tests call it.
#   venv      python3-venv: the Python grpcio client tests run in .venv/.
#   chromium  chromium and chromium-driver: the dashboard's browser test
#             (tests/python/test_dashboard.py) drives headless Chromium.
#   netns     iproute2 and iptables: the partition tests (e2e/partitions.rs)
#             put a sidecar in a network namespace on a veth link and drop
#             its packets with iptables rules inside it (root only).
#   node      nodejs and npm: the Node grpc-js-xds client the end-to-end
#             tests start (tests/node, installed there by `npm ci`); node
#             18 or later (Debian 12's).
# Used by `make demo` (cc), `make node-modules` (node) and .ci/test.sh
# (all), before any cargo command. Installs with apt-get as root;
# otherwise it stops and prints the command to run.
# Usage: .ci/deps.sh cc [etcd] [promtool] [dig] [curl] [chromium] [venv] [netns] [node]
set -euo pipefail

die() { echo "deps: error: $*" >&2; exit 1; }

apt_updated=0
apt_install() { # apt_install PACKAGE
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 0
    echo "deps: installing $1" >&2
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
    # The downloaded .debs are not needed once installed; the build
    # that follows wants the disk.
    apt-get clean
}

install() { # install PACKAGE COMMAND
    local package=$1 cmd=$2
    command -v "$cmd" >/dev/null && return 0
    apt_install "$package"
    command -v "$cmd" >/dev/null \
        || die "$cmd not found: install it with 'sudo apt-get install $package' (or your system's $package package)"
}

venv_works() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }

# The client uses node:util's parseArgs (node 18.3) and grpc-js 1.14.
NODE_MAJOR_MIN=18
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null; }

for tool in "$@"; do
    case "$tool" in
        cc) install gcc cc ;;
        etcd) install etcd-server etcd ;;
        promtool)
            install prometheus promtool
            install prometheus prometheus
            ;;
        dig) install dnsutils dig ;;
        netns)
            install iproute2 ip
            install iptables iptables
            ;;
        curl) install curl curl ;;
        chromium)
            install chromium chromium
            install chromium-driver chromedriver
            ;;
        venv)
            command -v python3 >/dev/null \
                || die "python3 not found: install it with 'sudo apt-get install python3'"
            venv_works || apt_install python3-venv
            venv_works \
                || die "python3 has no working venv module: install it with 'sudo apt-get install python3-venv'"
            ;;
        node)
            # Debian packages node and npm separately; other builds
            # (NodeSource) bring npm with node.
            install nodejs node
            install npm npm
            major=$(node_major)
            [ "${major:-0}" -ge "$NODE_MAJOR_MIN" ] \
                || die "node $(node --version 2>/dev/null) is too old: tests/node needs node $NODE_MAJOR_MIN or later (Debian 12's nodejs package)"
            ;;
        *) die "unknown tool $tool" ;;
    esac
done
