"""What the deployment tests share: the files under deploy/, the pod
templates in Kubernetes objects, and what the real binaries accept.

The binaries are the judges of flags and variables: `known_env` and
`known_flags` read them from `<binary> --help` (clap prints every flag with
its `[env: NAME=]`), so a manifest that sets a variable the binary does not
read fails here instead of being silently ignored in a cluster. The
variables that are only variables (the KEKs) and the OpenTelemetry one are
listed beside them.
"""

import functools
import pathlib
import re
import subprocess

import yaml

from harness import ROOT, binary

DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
KUBERNETES = DEPLOY / "kubernetes"

# The image every ISDP container runs (compose and the manifests): one
# image, the command picks the binary.
ISDP_IMAGES = ("isdp:", "${ISDP_IMAGE")

# The binaries in the image, which a container's command may name.
IMAGE_BINARIES = (
    "isdp-control-plane",
    "isdp-sidecar",
    "isdpctl",
    "echo-http",
    "echo-grpc",
    "echo-tcp",
)

# Variables a binary reads that --help does not list as a flag's env.
ENV_ONLY = {
    # The key-encryption keys: variables only, never flag values (`ps`).
    "isdp-control-plane": {"ISDP_KEK", "ISDP_PREVIOUS_KEK"},
}


@functools.cache
def help_text(name: str) -> str:
    out = subprocess.run(
        [str(binary(name)), "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"{name} --help failed: {out.stderr}"
    return out.stdout


def known_env(name: str) -> set:
    """Every variable `name` reads: its flags' `[env: X=]` and ENV_ONLY."""
    found = set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", help_text(name)))
    assert found, f"no [env: ...] in {name} --help"
    return found | ENV_ONLY.get(name, set())


def known_flags(name: str) -> set:
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", help_text(name)))


def check_command_and_env(where: str, command, env: dict) -> list:
    """Problems with a container that runs one of the image's binaries:
    an unknown binary, flag or ISDP_/OTEL_/ECHO_ variable."""
    if not command or command[0] not in IMAGE_BINARIES:
        return []
    problems = []
    name = command[0]
    flags = known_flags(name)
    for arg in command[1:]:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags:
            problems.append(f"{where}: {name} has no flag {flag}")
    names = known_env(name)
    for var in env:
        if re.match(r"(ISDP|OTEL|ECHO)_", var) and var not in names:
            problems.append(f"{where}: {name} reads no variable {var}")
    return problems


def script_vars(path: pathlib.Path) -> set:
    """The variables a shell script reads (`$X`, `${X...}`)."""
    text = path.read_text()
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))


def yaml_docs(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list:
    """(path, object) for every Kubernetes object under deploy/kubernetes
    (kustomizations excluded: they are kustomize's input, not objects)."""
    out = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            out.append((path, doc))
    return out


def pod_spec(obj: dict):
    """The pod template's spec of a workload object, else None."""
    kind = obj.get("kind")
    if kind == "Pod":
        return obj["spec"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers(spec: dict) -> list:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def env_map(container: dict) -> dict:
    """A container's variables: plain values, or `<from NAME>` for ones
    taken from a Secret, ConfigMap or field."""
    out = {}
    for e in container.get("env", []):
        out[e["name"]] = e.get("value", f"<from {e['name']}>")
    return out


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])
