# Entry points. `make demo` runs the quickstart; `make test` is what CI runs.

.PHONY: demo test build e2e pytest

# Build every binary in release mode, then start the demo mesh (Ctrl-C stops it).
# .ci/deps.sh installs protoc (protobuf-compiler) first if it is missing.
demo:
	./.ci/deps.sh protoc
	cargo build --release --workspace --bins && ./target/release/isdp-demo

# Formatting, clippy, build, all Rust tests, then the Python gRPC tests.
test:
	./.ci/test.sh

build:
	./.ci/deps.sh protoc
	cargo build --workspace --bins

# Only the end-to-end tests (needs the binaries: `make build`, and etcd).
e2e: build
	./.ci/deps.sh etcd
	cargo test -p isdp-tests -- --test-threads=1

# Only the Python gRPC client tests (needs .venv: run `make test` once).
pytest: build
	.venv/bin/python -m pytest tests/python -q
