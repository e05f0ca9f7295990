#!/usr/bin/env bash
# The whole check, as CI runs it (via .ci/run -> make test): formatting,
# lints, the build, the Rust tests (the end-to-end ones with the Node
# grpc-js-xds client), then the Python tests: the gRPC client tests and the
# offline checks of deploy/ (manifests, compose file, Dockerfile, scripts).
# A missing tool fails the run; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "ci: error: $*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }

# A clean clone builds everything once: incremental caches would only take
# disk (several GB across the test binaries) and never be reused.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
step "disk space for the build"
df -h "${CARGO_TARGET_DIR:-target}" 2>/dev/null || df -h .

# --- System tools: etcd, promtool, dig, curl and Chromium for the tests, a Python venv --
step "system tools (cc, etcd, promtool, dig, curl, chromium, python3-venv, iproute2, iptables, nodejs, npm)"
./.ci/deps.sh cc etcd promtool dig curl chromium venv netns node

command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"

# The build must need no system protoc (a fresh machine has none, and
# this machine may): any build script that runs one hits this stub and
# fails the run, naming the problem.
export PROTOC="$PWD/.ci/stubs/protoc"
export PATH="$PWD/.ci/stubs:$PATH"
unset PROTOC_INCLUDE

# --- Python venv for tests/python -------------------------------------------
if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    python3 -m venv .venv
fi
step "installing tests/python/requirements.txt"
.venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q -r tests/python/requirements.txt

# --- Node packages for tests/node ---------------------------------------------
# Exactly the locked versions, into tests/node/node_modules; npm's cache
# (~/.npm) is outside the clone, so a second run downloads nothing.
step "npm ci (tests/node)"
(cd tests/node && npm ci --prefer-offline)

# --- Rust ---------------------------------------------------------------------
step "layering (crates depend downward; no module import circles)"
python3 .ci/layering.py

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The end-to-end tests run the binaries, which cargo does not build for
# another package's tests.
step "cargo build --workspace --bins"
cargo build --workspace --bins

# The end-to-end tests (isdp-tests) assert latencies ("unhealthy within
# 2 s") and each starts several processes; on a 2-core machine they run one
# at a time so they do not starve each other. Everything else runs in parallel.
if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest (unit and integration tests)"
    cargo nextest run --workspace --exclude isdp-tests --no-tests=warn
    step "cargo test --doc"
    cargo test --workspace --doc
    step "cargo nextest (end-to-end, serial)"
    cargo nextest run -p isdp-tests --test-threads 1
else
    step "cargo test (unit, integration and doc tests)"
    cargo test --workspace --exclude isdp-tests
    step "cargo test (end-to-end, serial)"
    cargo test -p isdp-tests -- --test-threads=1
fi

# --- Python gRPC client tests and the deployment checks ---------------------------
# test_deploy_*.py check deploy/ offline (schemas, hadolint, shellcheck and a
# Compose-spec parser all come with tests/python/requirements.txt); no Docker
# daemon or cluster is used.
step "pytest tests/python"
.venv/bin/python -m pytest tests/python -q
