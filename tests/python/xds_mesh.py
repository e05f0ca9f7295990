"""A small mesh for one proxyless-gRPC test: its own control plane, echo-grpc
instances registered by an operator or fronted by a sidecar, gRPC health
servers a test can turn NOT_SERVING, and proxyless clients
(`xds_client.py`, one process per bootstrap, since gRPC reads its
bootstrap once per process).

Everything a user would do goes through `isdpctl` (`ControlPlane.ctl`):
registrations, policies, authorization rules, tokens and the clients'
bootstraps (`isdpctl bootstrap grpc`).
"""

import collections
import json
import pathlib
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import pytest

from harness import ControlPlane, Process, clean_env

HERE = pathlib.Path(__file__).resolve().parent
# How long one batch of calls may take in all, however slow the machine.
BATCH_TIMEOUT_S = 120


def eventually(timeout_s: float, what: str, attempt, done=bool):
    """Calls `attempt()` until `done` holds for what it returned (which is
    then returned), or fails after `timeout_s` showing the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = attempt()
        if done(last):
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s; last: {last}", pytrace=False)
        time.sleep(0.1)


class Batch:
    """What one batch of calls came back with."""

    def __init__(self, raw: dict):
        self.instances = collections.Counter(raw["instances"])
        self.errors = collections.Counter(raw["errors"])
        self.error = raw["error"]
        self.details = raw["details"]
        self.seconds = raw["seconds"]

    @property
    def ok(self) -> int:
        return sum(self.instances.values())

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())

    def share(self, *instances) -> float:
        """The share of all calls (failed ones included) answered by these."""
        return sum(self.instances[i] for i in instances) / max(1, self.total)

    def __repr__(self):
        return f"Batch(instances={dict(self.instances)}, errors={dict(self.errors)}, details={self.details!r})"


class XdsClient:
    """A running `xds_client.py`: one channel to `target`, kept open, that
    makes batches of calls on demand."""

    def __init__(self, bootstrap: pathlib.Path, gen: pathlib.Path, log: pathlib.Path, creds: str, target: str):
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "xds_client.py"),
                "--bootstrap", str(bootstrap),
                "--gen", str(gen),
                "--creds", creds,
                "--target", target,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=clean_env(),
        )
        self._lines: "queue.Queue[str]" = queue.Queue()

        def read():
            for line in self.proc.stdout:
                self._lines.put(line)
            self._lines.put("")

        threading.Thread(target=read, daemon=True).start()

    def calls(self, n: int, concurrency: int = 8, metadata=None, method="unary", timeout=10.0) -> Batch:
        """`n` calls, `concurrency` at a time, each with a deadline of
        `timeout` seconds."""
        return self.calls_async(n, concurrency, metadata, method, timeout).result()

    def calls_async(self, n: int, concurrency: int = 8, metadata=None, method="unary", timeout=10.0):
        """`calls` in the background: a Future of its Batch. The client
        makes one batch at a time: wait for it before the next."""
        cmd = {"calls": n, "concurrency": concurrency, "metadata": metadata or {}, "method": method, "timeout": timeout}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        result = futures.Future()

        def answer():
            try:
                line = self._lines.get(timeout=BATCH_TIMEOUT_S)
            except queue.Empty:
                line = None
            if not line:
                result.set_exception(AssertionError(f"client: no answer ({self.proc.poll()}); stderr:\n{self.stderr()}"))
            else:
                result.set_result(Batch(json.loads(line)))

        threading.Thread(target=answer, daemon=True).start()
        return result

    def stderr(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._log_file.close()


class HealthServer:
    """`grpc.health.v1.Health/Check` answering SERVING or NOT_SERVING, as
    the test says: the health endpoint of an instance that can go sick
    while it still answers calls."""

    SERVING, NOT_SERVING = 1, 2

    def __init__(self):
        import grpc

        self.status = self.SERVING

        def check(_request: bytes, _context) -> bytes:
            # HealthCheckResponse{status}: field 1, varint.
            return bytes([0x08, self.status])

        handler = grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(grace=None)


class Mesh:
    """One test's control plane and everything it starts; `close` stops
    it all and fails the test if the control plane died meanwhile."""

    def __init__(self, tmp: pathlib.Path, gen: pathlib.Path):
        self.tmp = tmp
        self.gen = gen
        (tmp / "cp").mkdir()
        self.cp = ControlPlane(tmp / "cp")
        self._closers = []
        self.echoes = {}

    # --- instances -----------------------------------------------------------

    def echo(self, instance_id: str) -> Process:
        """An echo-grpc answering with `instance_id`, not registered."""
        p = Process("echo-grpc", ["--listen", "127.0.0.1:0", "--id", instance_id], self.tmp / f"{instance_id}.log")
        self._closers.append(p.stop)
        self.echoes[instance_id] = p
        return p

    @staticmethod
    def port(p: Process) -> int:
        return int(p.addrs["grpc"].rsplit(":", 1)[1])

    def register(self, instance_id: str, service="echo", meta=None, check=None):
        """Starts echo-grpc `instance_id` and registers it as an operator
        would (plaintext, at its own port); `check` is a health check URL
        probed every 200 ms."""
        p = self.echo(instance_id)
        args = ["register", "--service", service, "--address", "127.0.0.1", "--port", self.port(p), "--id", instance_id]
        for k, v in (meta or {}).items():
            args += ["--meta", f"{k}={v}"]
        if check:
            args += ["--check", check, "--interval", "200ms", "--timeout", "500ms"]
        self.cp.ctl(*args)
        return p

    def instances(self, service="echo") -> dict:
        """id -> status, as `isdpctl instances` shows them."""
        return {i["id"]: i["status"] for i in self.cp.ctl("instances", service)}

    def wait_status(self, instance_id: str, status: str, service="echo", timeout_s=10):
        eventually(
            timeout_s,
            f"{instance_id} {status}",
            lambda: self.instances(service),
            lambda seen: seen.get(instance_id) == status,
        )

    def health_server(self) -> HealthServer:
        h = HealthServer()
        self._closers.append(h.stop)
        return h

    def sidecar(self, node_id: str, service: str, port: int) -> Process:
        """An isdp-sidecar fronting the gRPC service at 127.0.0.1:`port`
        under a join token of its own; returns once it is ready (its
        session registered the instance and its authorization rules
        arrived)."""
        token = self.cp.ctl("token", "create", "--role", "join", "--service", service)["secret"]
        sc = Process(
            "isdp-sidecar",
            [
                "--node-id", node_id,
                "--control-plane", self.cp.url,
                "--ca-file", self.cp.data / "ca.pem",
                "--admin-listen", "127.0.0.1:0",
                "--inbound-listen", "127.0.0.1:0",
                "--outbound-listen", "127.0.0.1:0",
                "--service", f"name={service},port={port},protocol=grpc",
            ],
            self.tmp / f"sidecar-{node_id}.log",
            env=clean_env(ISDP_JOIN_TOKEN=token),
        )
        self._closers.append(sc.stop)

        def ready():
            try:
                with urllib.request.urlopen(f"http://{sc.addrs['admin']}/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        eventually(30, f"sidecar {node_id} /ready", ready)
        return sc

    # --- clients -------------------------------------------------------------

    def bootstrap(self, name: str, service="web", upstreams=("echo",), extra=()) -> dict:
        """`isdpctl bootstrap grpc --service web --upstream echo --out DIR`;
        its JSON report (`bootstrap`, `token_id`, `node_id`, ...)."""
        args = ["bootstrap", "grpc", "--service", service, "--out", self.tmp / name]
        for u in upstreams:
            args += ["--upstream", u]
        return self.cp.ctl(*args, *extra)

    def client(self, bootstrap: dict, creds="insecure", target="xds:///echo") -> XdsClient:
        """A proxyless client process on `bootstrap` (see `bootstrap`)."""
        n = sum(1 for _ in self.tmp.glob("client-*.log"))
        c = XdsClient(pathlib.Path(bootstrap["bootstrap"]), self.gen, self.tmp / f"client-{n}.log", creds, target)
        self._closers.append(c.close)
        return c

    def close(self):
        for close in reversed(self._closers):
            close()
        alive = self.cp.alive()
        self.cp.stop()
        assert alive, f"control plane died during the test; stderr:\n{self.cp.stderr(tail=40)}"
