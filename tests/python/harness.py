"""The project's binaries as child processes, for the Python tests.

Every binary prints one `NAME listening: key=ADDR ...` line on stdout once
bound (ports 0 pick free ones); `Process` starts one, waits for that line
and keeps its stderr in a log file the failure messages quote.
`ControlPlane` is `isdp-control-plane` on ephemeral loopback ports with a
temp data dir, and runs `isdpctl` against itself as an operator would.

Binaries come from $ISDP_BIN_DIR, else $CARGO_TARGET_DIR/debug, else
target/debug; a missing one fails the test (build them with
`cargo build --workspace --bins`).
"""

import json
import os
import pathlib
import queue
import subprocess
import threading

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
START_TIMEOUT_S = 30
CTL_TIMEOUT_S = 30


def bin_dir() -> pathlib.Path:
    if os.environ.get("ISDP_BIN_DIR"):
        return pathlib.Path(os.environ["ISDP_BIN_DIR"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug"


def binary(name: str) -> pathlib.Path:
    path = bin_dir() / name
    if not path.is_file():
        pytest.fail(
            f"{path} not found: run `cargo build --workspace --bins` first (or set ISDP_BIN_DIR)",
            pytrace=False,
        )
    return path


def clean_env(**extra) -> dict:
    """The environment without the ISDP_* variables a developer's shell
    may hold (a token or CA file there would change what a test means)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISDP_")}
    env.update(extra)
    return env


class Process:
    """A running binary: its `listening:` addresses and its stderr log."""

    def __init__(self, name: str, args, log: pathlib.Path, env=None):
        self.name = name
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(binary(name)), *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env if env is not None else clean_env(),
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
                self.kill()
                pytest.fail(f"{self.name}: no listening line within {START_TIMEOUT_S}s; stderr:\n{self.stderr()}")
            if not line:
                self.proc.wait(timeout=5)
                pytest.fail(
                    f"{self.name} exited ({self.proc.returncode}) before listening; "
                    f"stderr ({self.log}):\n{self.stderr()}"
                )
            if "listening:" in line:
                rest = line.split("listening:", 1)[1]
                return dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self, tail: int = 0) -> str:
        self._log_file.flush()
        text = self.log.read_text(errors="replace")
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def kill(self):
        """SIGKILL, as a crash: nothing is cleaned up."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        """Kills it (tests need no clean shutdown) and closes its log."""
        self.kill()
        self._log_file.close()


class CtlError(Exception):
    """`isdpctl` exited non-zero; carries its stderr."""


class ControlPlane(Process):
    """A running isdp-control-plane child process. It serves TLS only and
    wants a bearer token: channels trust <data-dir>/ca.pem and send the
    bootstrap <data-dir>/admin.token."""

    def __init__(self, tmp: pathlib.Path):
        self.data = tmp / "data"
        super().__init__(
            "isdp-control-plane",
            [
                "--listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0",
                "--http-listen", "127.0.0.1:0",
                "--data-dir", self.data,
            ],
            tmp / "control-plane.log",
        )

    @property
    def grpc_target(self) -> str:
        return self.addrs["grpc"]

    @property
    def url(self) -> str:
        return f"https://{self.grpc_target}"

    @property
    def http_url(self) -> str:
        """`https://ADDR` of the HTTP/JSON API (same CA and tokens)."""
        return f"https://{self.addrs['http']}"

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
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        # The certificate names localhost and 127.0.0.1; check it as localhost.
        opts = [("grpc.ssl_target_name_override", "localhost"), *options]
        return grpc.secure_channel(self.grpc_target, creds, options=opts)

    def ctl(self, *args, output_json=True):
        """`isdpctl ARGS` as the operator on this machine: the control
        plane's URL, its data dir (ca.pem, admin.token), `-o json` parsed
        when asked. Raises CtlError with stderr on a non-zero exit."""
        cmd = [str(binary("isdpctl")), "--control-plane", self.url, "--data-dir", str(self.data)]
        if output_json:
            cmd += ["-o", "json"]
        out = subprocess.run(
            [*cmd, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT_S,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise CtlError(f"isdpctl {' '.join(map(str, args))}: exit {out.returncode}: {out.stderr.strip()}")
        if output_json and out.stdout.strip():
            return json.loads(out.stdout)
        return out.stdout
