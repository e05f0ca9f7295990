"""deploy/docker/compose.yaml: parsed by a Compose-spec parser (unknown or
mistyped keys refused), then every reference checked: services a service
depends on or shares a network namespace with, volumes, networks, env
files, bind-mount sources, static addresses, published ports, the
Prometheus targets, and each container's flags and variables against the
binary it runs. There is no Docker daemon in CI: deploy/README.md says
what was run.
"""

import ipaddress
import json
import re
import subprocess

import pytest
import yaml
from compose_spec import PyCompose

from deploy_lint import DOCKER, ISDP_IMAGES, check_command_and_env, known_env, port_of, script_vars

COMPOSE = DOCKER / "compose.yaml"


def interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the defaults."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), text)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(interpolate(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def test_the_compose_spec_parser_accepts_it(compose):
    spec = {k: v for k, v in compose.items() if not k.startswith("x-")}
    parsed = PyCompose.from_json(json.dumps(spec))
    assert set(parsed.service_names()) == set(compose["services"])
    # ... and refuses a misspelt key, so the check above can fail.
    spec["services"]["cp-1"] = dict(spec["services"]["cp-1"], netwrok_mode="host")
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(spec))


def test_the_mesh_is_complete(services):
    images = {name: s.get("image", "") for name, s in services.items()}
    etcd = [n for n, i in images.items() if "etcd" in i]
    assert len(etcd) == 3, etcd
    runs = {n: (s.get("command") or [""])[0] for n, s in services.items()}
    assert sum(c == "isdp-control-plane" for c in runs.values()) == 2
    assert sum(c == "isdp-sidecar" for c in runs.values()) >= 2
    for needed in ("jaeger", "prometheus", "grafana"):
        assert any(needed in i for i in images.values()), needed


def test_references_resolve(compose, services):
    volumes = set(compose.get("volumes", {}))
    networks = set(compose.get("networks", {}))
    problems = []
    for name, s in services.items():
        deps = s.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                problems.append(f"{name}: depends_on {dep}, no such service")
        mode = s.get("network_mode", "")
        if mode.startswith("service:") and mode[len("service:"):] not in services:
            problems.append(f"{name}: network_mode {mode}, no such service")
        for net in s.get("networks", []):
            if net not in networks:
                problems.append(f"{name}: network {net} not declared")
        for vol in s.get("volumes", []):
            if isinstance(vol, dict):
                source, kind = vol["source"], vol["type"]
            else:
                source = vol.split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/")) else "volume"
            if kind == "volume" and source not in volumes:
                problems.append(f"{name}: volume {source} not declared")
            if kind == "bind" and not (DOCKER / source).exists():
                problems.append(f"{name}: bind source {source} does not exist")
        build = s.get("build")
        if build and not (DOCKER / build["context"] / build["dockerfile"]).is_file():
            problems.append(f"{name}: no Dockerfile at {build}")
    assert not problems, "\n".join(problems)


def test_env_files_are_made_by_init_secrets_and_ignored(services):
    init = (DOCKER / "init-secrets.sh").read_text()
    for name, s in services.items():
        for env_file in s.get("env_file", []):
            rel = env_file.removeprefix("./")
            assert rel in init, f"{name}: {env_file} is not made by init-secrets.sh"
            ignored = subprocess.run(
                ["git", "check-ignore", "-q", str(DOCKER / rel)], cwd=DOCKER
            ).returncode == 0
            assert ignored, f"{env_file} holds a secret but git does not ignore it"


def test_addresses_and_ports(compose, services):
    subnet = ipaddress.ip_network(compose["networks"]["mesh"]["ipam"]["config"][0]["subnet"])
    seen, host_ports = {}, {}
    for name, s in services.items():
        for net in (s.get("networks") or {}).values() if isinstance(s.get("networks"), dict) else []:
            ip = ipaddress.ip_address(net["ipv4_address"])
            assert ip in subnet, f"{name}: {ip} outside {subnet}"
            assert ip not in seen, f"{name} and {seen.get(ip)} share {ip}"
            seen[ip] = name
        for p in s.get("ports", []):
            host = p.rsplit(":", 1)[0]
            assert host.startswith("127.0.0.1:"), f"{name}: {p} is published beyond loopback"
            assert host not in host_ports, f"{name} and {host_ports[host]} publish {host}"
            host_ports[host] = name
    # A sidecar registers its application's address, and listens for
    # admin where Prometheus scrapes.
    for name, s in services.items():
        env = s.get("environment", {})
        mode = s.get("network_mode", "")
        if "ISDP_ADDRESS" in env:
            app = services[mode.removeprefix("service:")]
            assert env["ISDP_ADDRESS"] == app["networks"]["mesh"]["ipv4_address"], name


def test_prometheus_scrapes_every_replica_and_sidecar(services):
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }
    want = {"isdp-control-plane": set(), "isdp-sidecar": set()}
    for name, s in services.items():
        command = (s.get("command") or [""])[0]
        env = s.get("environment", {})
        if command == "isdp-control-plane":
            want[command].add(f"{s['hostname']}:{port_of(env['ISDP_ADMIN_LISTEN'])}")
        elif command == "isdp-sidecar":
            host = s["network_mode"].removeprefix("service:")
            want[command].add(f"{host}:{port_of(env['ISDP_ADMIN_LISTEN'])}")
    assert targets == want


def test_commands_and_variables_are_the_binaries_own(services):
    problems = []
    for name, s in services.items():
        command = s.get("command") or []
        env = s.get("environment", {})
        if isinstance(s.get("image"), str) and s["image"].startswith(ISDP_IMAGES):
            problems += check_command_and_env(name, command, env)
            assert s.get("read_only") and s.get("cap_drop") == ["ALL"], name
            if command and command[0] == "bash":
                # A script's variables are the ones it reads, or isdpctl's.
                script = DOCKER / command[1].replace("/opt/isdp/", "")
                unread = set(env) - script_vars(script) - known_env("isdpctl")
                assert not unread, f"{name}: {script.name} reads no {unread}"
    assert not problems, "\n".join(problems)


def test_third_party_images_are_pinned(services):
    for name, s in services.items():
        image = s.get("image", "")
        if image.startswith(ISDP_IMAGES) or image.startswith("isdp"):
            continue
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
