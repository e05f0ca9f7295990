#!/usr/bin/env bash
# Installs the system tools the build and tests need, when missing:
#   protoc  protobuf-compiler: the etcd client crate (etcd-client) compiles
#           etcd's .proto files with it at build time.
#   etcd    etcd-server: the etcd store tests start real etcd members.
#   promtool  prometheus: the observability tests check metric expositions
#           and the shipped alerting rules with Prometheus' own tool.
# Used by `make demo`/`make build` (protoc) and .ci/test.sh (both), before
# any cargo command. Installs with apt-get as root; otherwise it stops and
# prints the command to run. Usage: .ci/deps.sh protoc [etcd] [promtool]
set -euo pipefail

die() { echo "deps: error: $*" >&2; exit 1; }

apt_updated=0
install() { # install PACKAGE COMMAND
    local package=$1 cmd=$2
    command -v "$cmd" >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "deps: $cmd not found; installing $package" >&2
        if [ "$apt_updated" = 0 ]; then
            apt-get update -qq
            apt_updated=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
        # The downloaded .debs are not needed once installed; the build
        # that follows wants the disk.
        apt-get clean
    fi
    command -v "$cmd" >/dev/null \
        || die "$cmd not found: install it with 'sudo apt-get install $package' (or your system's $package package)"
}

for tool in "$@"; do
    case "$tool" in
        protoc) install protobuf-compiler protoc ;;
        etcd) install etcd-server etcd ;;
        promtool) install prometheus promtool ;;
        *) die "unknown tool $tool" ;;
    esac
done
