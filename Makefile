# Entry points. `make demo` runs the quickstart; `make test` is what CI runs.
# The build needs only Rust and a C compiler (no protoc: protos are compiled
# by protox); `.ci/deps.sh` installs what is missing.

.PHONY: demo test build e2e pytest node-modules deploy-check

# Build every binary in release mode, then start the demo mesh (Ctrl-C stops it).
# `cargo run` finds the binaries wherever the target dir is (CARGO_TARGET_DIR
# included); the demo starts the others from beside its own.
demo:
	./.ci/deps.sh cc
	cargo build --release --workspace --bins && cargo run --release -q -p isdp-examples --bin isdp-demo

# Formatting, clippy, build, all Rust tests, then the Python gRPC tests;
# installs etcd, promtool, dig, a Python venv, Node and the Node client's
# packages first when missing.
test:
	./.ci/test.sh

build:
	./.ci/deps.sh cc
	cargo build --workspace --bins

# Only the end-to-end tests (they build the binaries they need; etcd tests
# need etcd, the dns tests dig, the grpc_js tests Node and tests/node/node_modules).
e2e: node-modules
	./.ci/deps.sh cc etcd promtool dig netns
	cargo test -p isdp-tests -- --test-threads=1

# The Node grpc-js-xds client's packages, exactly as locked, in
# tests/node/node_modules (installs Debian's nodejs and npm when missing).
node-modules:
	./.ci/deps.sh node
	cd tests/node && npm ci --prefer-offline

# Only the Python gRPC client tests (needs .venv: run `make test` once).
pytest: build
	./.ci/deps.sh curl
	.venv/bin/python -m pytest tests/python -q

# Only the deployment checks (deploy/): Kubernetes manifests against the
# bundled schemas, the compose file, the Dockerfile (hadolint) and the
# scripts (shellcheck); offline, no Docker or cluster. They read the
# binaries' --help, so they build first. Needs .venv: run `make test` once.
deploy-check: build
	.venv/bin/python -m pytest tests/python -q -k deploy
