"""Fixtures for the gRPC black-box tests.

At session start the isdp.v1 stubs are generated from proto/isdp/v1/*.proto
into tests/python/gen/ (gitignored), so the tests always match the protos in
the tree. Each test module gets its own control plane: the real binary,
started on ephemeral loopback ports with a temp data dir; its bound address
is read from the `isdp-control-plane listening: grpc=... admin=...` line.
The control plane serves TLS only and wants a bearer token: channels trust
<data-dir>/ca.pem and send the bootstrap <data-dir>/admin.token.

The binary comes from $ISDP_BIN_DIR, else $CARGO_TARGET_DIR/debug, else
target/debug; a missing binary fails the session (build it with
`cargo build --workspace --bins`).
"""

import os
import pathlib
import queue
import subprocess
import sys
import threading

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
GEN = HERE / "gen"
START_TIMEOUT_S = 30


def _generate_stubs():
    from grpc_tools import protoc

    GEN.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto" / "isdp" / "v1").glob("*.proto"))
    assert protos, "no .proto files under proto/isdp/v1"
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            *protos,
        ]
    )
    assert rc == 0, f"grpc_tools.protoc failed ({rc}) on {protos}"
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))


_generate_stubs()


def bin_dir() -> pathlib.Path:
    if os.environ.get("ISDP_BIN_DIR"):
        return pathlib.Path(os.environ["ISDP_BIN_DIR"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug"


class ControlPlane:
    """A running isdp-control-plane child process."""

    def __init__(self, tmp: pathlib.Path):
        binary = bin_dir() / "isdp-control-plane"
        if not binary.is_file():
            pytest.fail(
                f"{binary} not found: run `cargo build --workspace --bins` first "
                "(or set ISDP_BIN_DIR)",
                pytrace=False,
            )
        self.data = tmp / "data"
        self.log = tmp / "control-plane.log"
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0",
                "--data-dir", str(tmp / "data"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
        )
        self.addrs = self._await_listening()
        # Keep draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _await_listening(self) -> dict:
        lines: "queue.Queue[bytes]" = queue.Queue()

        def read():
            for line in self.proc.stdout:
                lines.put(line)
                if b"listening:" in line:
                    return
            lines.put(b"")

        threading.Thread(target=read, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S).decode(errors="replace")
            except queue.Empty:
                self.stop()
                pytest.fail(f"no listening line within {START_TIMEOUT_S}s; stderr:\n{self.stderr()}")
            if not line:
                self.proc.wait(timeout=5)
                pytest.fail(
                    f"control plane exited ({self.proc.returncode}) before listening; "
                    f"stderr ({self.log}):\n{self.stderr()}"
                )
            if "listening:" in line:
                rest = line.split("listening:", 1)[1]
                return dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)

    @property
    def grpc_target(self) -> str:
        return self.addrs["grpc"]

    def ca_pem(self) -> bytes:
        return (self.data / "ca.pem").read_bytes()

    def admin_token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    def channel(self, token=None, options=()):
        """A TLS channel trusting ca.pem; every call carries `token`
        (default: the admin token)."""
        import grpc

        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem())
        token = self.admin_token() if token is None else token
        if token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        # The certificate names localhost and 127.0.0.1; check it as localhost.
        opts = [("grpc.ssl_target_name_override", "localhost"), *options]
        return grpc.secure_channel(self.grpc_target, creds, options=opts)

    def stderr(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log_file.close()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory):
    cp = ControlPlane(tmp_path_factory.mktemp("cp"))
    yield cp
    alive = cp.proc.poll() is None
    cp.stop()
    assert alive, f"control plane died during the tests; stderr:\n{cp.stderr()}"


@pytest.fixture(scope="module")
def registry(control_plane):
    import grpc
    from isdp.v1 import registry_pb2_grpc

    # Lift the client's own receive limit; the send side is unlimited by
    # default, so oversized requests really reach the server.
    channel = control_plane.channel(
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    grpc.channel_ready_future(channel).result(timeout=10)
    yield registry_pb2_grpc.RegistryStub(channel)
    channel.close()
