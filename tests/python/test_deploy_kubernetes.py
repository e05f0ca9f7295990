"""deploy/kubernetes: every manifest against the Kubernetes JSON schemas
(offline: kubernetes-validate carries them), the security posture every
pod must have, and every flag, variable and port against the binaries.

Nothing here talks to a cluster; deploy/README.md says what was run where.
"""

import re

import kubernetes_validate
import pytest
import yaml

from deploy_lint import (
    KUBERNETES,
    check_command_and_env,
    containers,
    env_map,
    manifests,
    pod_spec,
    port_of,
    yaml_docs,
)

# The oldest version the manifests target (native sidecars, on by default
# since 1.29) and the newest the package knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

# Custom resources (the Prometheus Operator's): no schema in the package;
# checked for the fields they cannot work without.
CRD_GROUPS = ("monitoring.coreos.com/",)

MANIFESTS = manifests()


def test_the_manifests_are_found():
    kinds = {obj["kind"] for _, obj in MANIFESTS}
    for kind in ("StatefulSet", "Deployment", "Service", "PodDisruptionBudget",
                 "NetworkPolicy", "HorizontalPodAutoscaler", "PodMonitor"):
        assert kind in kinds, f"no {kind} under {KUBERNETES}"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_matches_the_kubernetes_schemas(version):
    problems = []
    for path, obj in MANIFESTS:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{path.relative_to(KUBERNETES)} {obj['kind']}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{path.relative_to(KUBERNETES)}: no schema for {obj['kind']}")
    assert not problems, "\n".join(problems)


def test_the_validator_refuses_what_kubernetes_would():
    # The check can fail: an unknown field and a wrong type are refused.
    (_, svc), = [(p, o) for p, o in MANIFESTS if o["kind"] == "Service"][:1]
    bad = yaml.safe_load(yaml.safe_dump(svc))
    bad["spec"]["portz"] = bad["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_custom_resources_name_their_selector_and_endpoints():
    for path, obj in MANIFESTS:
        if obj["kind"] != "PodMonitor":
            continue
        spec = obj["spec"]
        assert spec["selector"]["matchLabels"], path
        for ep in spec["podMetricsEndpoints"]:
            assert ep["port"] and ep["path"] == "/metrics", path


def test_every_file_is_in_a_kustomization():
    listed = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        for res in k["resources"]:
            path = (kustomization.parent / res).resolve()
            assert path.is_file(), f"{kustomization}: {res} does not exist"
            listed.add(path)
    for path in KUBERNETES.rglob("*.yaml"):
        if path.name == "kustomization.yaml" or path.parent.name == "monitoring":
            continue  # monitoring/ is applied into Prometheus' namespace
        assert path.resolve() in listed, f"{path} is in no kustomization.yaml"


def workloads():
    for path, obj in MANIFESTS:
        spec = pod_spec(obj)
        if spec is not None:
            yield f"{path.name} {obj['kind']}/{obj['metadata']['name']}", spec


def test_every_pod_is_locked_down():
    problems = []
    for where, spec in workloads():
        pod = spec.get("securityContext", {})
        if pod.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod runAsNonRoot")
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccomp RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken false (no API access)")
        for c in containers(spec):
            sc = c.get("securityContext", {})
            at = f"{where} container {c['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem true")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{at}: drop ALL capabilities")
            res = c.get("resources", {})
            if not res.get("requests") or "memory" not in res.get("limits", {}):
                problems.append(f"{at}: resource requests and a memory limit")
    assert not problems, "\n".join(problems)


def test_no_rbac_is_granted():
    # Neither the control plane nor the sidecar calls the Kubernetes API.
    kinds = {obj["kind"] for _, obj in MANIFESTS}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def test_commands_and_variables_are_the_binaries_own():
    problems = []
    for where, spec in workloads():
        for c in containers(spec):
            command = list(c.get("command", [])) + list(c.get("args", []))
            problems += check_command_and_env(f"{where} {c['name']}", command, env_map(c))
    assert not problems, "\n".join(problems)


def test_probes_and_ports_match_the_listeners():
    problems = []
    checked = 0
    for where, spec in workloads():
        for c in containers(spec):
            if not c.get("command") or c["command"][0] not in ("isdp-control-plane", "isdp-sidecar"):
                continue
            checked += 1
            at = f"{where} {c['name']}"
            env = env_map(c)
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            admin = port_of(env["ISDP_ADMIN_LISTEN"])
            if c["command"][0] == "isdp-control-plane":
                want = {"liveness": "/healthz", "readiness": "/ready"}
                if ports.get("grpc") != port_of(env["ISDP_LISTEN"]):
                    problems.append(f"{at}: port grpc is not ISDP_LISTEN's")
                if not env["ISDP_DATA_DIR"].startswith(c["volumeMounts"][0]["mountPath"] + "/"):
                    problems.append(f"{at}: the data dir must be a subdirectory of a volume")
            else:
                want = {"liveness": "/live", "readiness": "/ready"}
            for kind, path in want.items():
                probe = c.get(f"{kind}Probe")
                if probe is None:
                    problems.append(f"{at}: no {kind} probe")
                    continue
                got = probe["httpGet"]
                port = ports.get(got["port"], got["port"])
                if got["path"] != path or port != admin:
                    problems.append(f"{at}: {kind} probe {got} is not {path} on admin port {admin}")
    assert checked >= 3, "control plane and sidecars not found"
    assert not problems, "\n".join(problems)


def test_services_target_ports_the_pods_declare():
    pods = {}
    for _, obj in MANIFESTS:
        spec = pod_spec(obj)
        if spec is not None:
            labels = obj["spec"]["template"]["metadata"]["labels"]
            names = {p["name"] for c in containers(spec) for p in c.get("ports", [])}
            pods[labels.get("app.kubernetes.io/name")] = names
    for path, obj in MANIFESTS:
        if obj["kind"] != "Service":
            continue
        app = obj["spec"]["selector"]["app.kubernetes.io/name"]
        for port in obj["spec"]["ports"]:
            assert port["targetPort"] in pods[app], f"{path}: {port} not declared by {app}"


def test_the_hpa_metrics_are_served_by_the_adapter_rules():
    rules_cm = next(o for _, o in MANIFESTS if o["metadata"]["name"] == "adapter-config")
    rules = yaml.safe_load(rules_cm["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"] for r in rules}
    readme = (KUBERNETES.parent.parent / "README.md").read_text()
    for r in rules:
        series = re.match(r"(\w+)\{", r["seriesQuery"]).group(1)
        # The series is one the sidecar exports (README, Observability).
        exported = series.removesuffix("_total")
        assert f"`{exported}" in readme, f"{series} is not a documented sidecar metric"
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}
    hpa = next(o for _, o in MANIFESTS if o["kind"] == "HorizontalPodAutoscaler")
    for m in hpa["spec"]["metrics"]:
        assert m["pods"]["metric"]["name"] in served, m


def test_kustomization_documents_parse():
    for path in KUBERNETES.rglob("kustomization.yaml"):
        (k,) = yaml_docs(path)
        assert k["kind"] == "Kustomization" and k["resources"], path
