"""Fixtures for the gRPC black-box tests.

At session start the stubs are generated into tests/python/gen/
(gitignored), so the tests always match the protos in the tree: isdp.v1
from proto/isdp/v1/*.proto, and the echo demo service from
examples/proto/echo.proto (`echo_pb2`, which the proxyless client process
imports too).

The binaries run as child processes (`harness.py`): the control plane on
ephemeral loopback ports with a temp data dir, its bound address read from
the `isdp-control-plane listening: grpc=... admin=...` line. It serves TLS
only and wants a bearer token: channels trust <data-dir>/ca.pem and send
the bootstrap <data-dir>/admin.token; `ControlPlane.ctl` runs `isdpctl`
with the same two files, as an operator on that machine would.
`control_plane` is one per test module; `mesh` (`xds_mesh.py`) is a
control plane of a test's own plus the echo instances, sidecars and
proxyless clients the test starts, all stopped when it ends.

The binaries come from $ISDP_BIN_DIR, else $CARGO_TARGET_DIR/debug, else
target/debug; a missing binary fails the test (build them with
`cargo build --workspace --bins`).
"""

import pathlib
import sys

import pytest

from harness import ROOT, ControlPlane

HERE = pathlib.Path(__file__).resolve().parent
GEN = HERE / "gen"


def _protoc(include: pathlib.Path, protos):
    from grpc_tools import protoc

    assert protos, f"no .proto files under {include}"
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            *protos,
        ]
    )
    assert rc == 0, f"grpc_tools.protoc failed ({rc}) on {protos}"


def _generate_stubs():
    GEN.mkdir(exist_ok=True)
    proto = ROOT / "proto"
    _protoc(proto, sorted(str(p.relative_to(proto)) for p in (proto / "isdp" / "v1").glob("*.proto")))
    _protoc(ROOT / "examples" / "proto", ["echo.proto"])
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))


_generate_stubs()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory):
    cp = ControlPlane(tmp_path_factory.mktemp("cp"))
    yield cp
    alive = cp.alive()
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


@pytest.fixture
def mesh(tmp_path):
    from xds_mesh import Mesh

    m = Mesh(tmp_path, GEN)
    yield m
    m.close()
