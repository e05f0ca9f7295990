"""Proxyless gRPC (grpcio's own xDS client, `xds:///echo`) against the
control plane's standard xDS resources, end to end: every client is a
separate process (gRPC reads its bootstrap once per process) on a
bootstrap `isdpctl bootstrap grpc --service web --upstream echo` wrote,
calling echo-grpc instances an operator registered or a sidecar fronts.

Timings are stated per test and generous for a loaded 2-core machine;
shares are checked over hundreds of calls with tolerances several
standard deviations wide, and each would fail if the feature were off
(an instance that keeps its traffic, a split that stays even, a rule that
lets calls through).

Not here: a NACK counted by the control plane. grpcio accepts every
resource the control plane sends, so there is no NACK to provoke; the
Rust end-to-end tests send NACKs with their own ADS client.
"""

import time

import pytest

from xds_mesh import eventually

# Routing changes (health, registrations, policies, rules) reach a
# running client within this; measured in milliseconds on an idle machine.
CONVERGE_S = 5


def fair(batch, instances, tolerance):
    """Every one of `instances` answered 1/len ± tolerance of the calls,
    and nothing else answered or failed."""
    assert not batch.errors, batch
    assert set(batch.instances) == set(instances), batch
    for i in instances:
        share = batch.share(i)
        assert abs(share - 1 / len(instances)) <= tolerance, f"{i}: {share:.3f} of {batch}"


def test_calls_spread_over_three_healthy_instances(mesh):
    ids = ["echo-0", "echo-1", "echo-2"]
    for i in ids:
        mesh.register(i)
    client = mesh.client(mesh.bootstrap("web"))

    # Round robin: each takes a third; ± 8 % is a margin no
    # balancing bug (one instance never picked, all on one) stays within.
    fair(client.calls(600, concurrency=8), ids, tolerance=0.08)
    # Server streams are balanced per call the same way.
    fair(client.calls(90, concurrency=3, method="stream"), ids, tolerance=0.12)


def test_failover_unhealthy_deregistered_and_killed_instances_stop_receiving_calls(mesh):
    health = mesh.health_server()
    mesh.register("sick", check=health.target)
    for i in ("gone", "dead", "stay-1", "stay-2"):
        mesh.register(i)
    mesh.wait_status("sick", "healthy")
    client = mesh.client(mesh.bootstrap("web"))
    before = client.calls(500, concurrency=8)
    fair(before, ["sick", "gone", "dead", "stay-1", "stay-2"], tolerance=0.08)

    # All at once: the health check starts failing (the instance itself
    # still answers), one is deregistered (still running), one is
    # killed, and a new one is registered.
    health.status = health.NOT_SERVING
    mesh.cp.ctl("deregister", "gone", output_json=False)
    mesh.echoes["dead"].kill()
    mesh.register("fresh")
    start = time.monotonic()

    victims = {"sick", "gone", "dead"}
    survivors = ["stay-1", "stay-2", "fresh"]
    eventually(
        CONVERGE_S,
        "calls only to the healthy, registered, live instances (fresh included), none failing",
        lambda: client.calls(60, concurrency=6, timeout=5),
        lambda b: not b.errors and set(b.instances) == set(survivors),
    )
    converged = time.monotonic() - start
    assert mesh.instances()["sick"] == "unhealthy"
    assert mesh.echoes["sick"].alive() and mesh.echoes["gone"].alive(), "they must still answer if asked"

    after = client.calls(450, concurrency=8, timeout=5)
    assert not victims & set(after.instances), f"after {converged:.1f}s: {after}"
    fair(after, survivors, tolerance=0.08)


def test_below_half_healthy_calls_spread_over_every_instance(mesh):
    # Proxyless gRPC has no panic mode; the control plane sends every
    # endpoint as UNKNOWN when fewer than half are routable, as ISDP's
    # sidecars then spread over all of them.
    checks = {i: mesh.health_server() for i in ("a", "b", "c")}
    for i, h in checks.items():
        mesh.register(i, check=h.target)
    for i in checks:
        mesh.wait_status(i, "healthy")
    client = mesh.client(mesh.bootstrap("web"))
    fair(client.calls(300, concurrency=6), ["a", "b", "c"], tolerance=0.08)

    # Two of three healthy: above the threshold, the sick one is left out.
    checks["a"].status = checks["a"].NOT_SERVING
    eventually(
        CONVERGE_S,
        "a left out",
        lambda: client.calls(60, concurrency=6),
        lambda b: not b.errors and set(b.instances) == {"b", "c"},
    )
    fair(client.calls(300, concurrency=6), ["b", "c"], tolerance=0.08)

    # One of three: below it, all three take calls again.
    checks["b"].status = checks["b"].NOT_SERVING
    mesh.wait_status("b", "unhealthy")
    eventually(
        CONVERGE_S,
        "every instance back in rotation",
        lambda: client.calls(60, concurrency=6),
        lambda b: not b.errors and set(b.instances) == {"a", "b", "c"},
    )
    fair(client.calls(300, concurrency=6), ["a", "b", "c"], tolerance=0.08)


CANARY_POLICY = """\
service: echo
subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
split: [ { subset: v1, weight: 80 }, { subset: v2, weight: 20 } ]
routes:
  - name: canary
    match: { headers: { x-canary: "true" } }
    split: [ { subset: v2, weight: 100 } ]
"""


def test_traffic_policy_split_header_route_and_delete(mesh, tmp_path):
    mesh.register("v1-a", meta={"version": "v1"})
    mesh.register("v1-b", meta={"version": "v1"})
    mesh.register("v2-a", meta={"version": "v2"})
    ids = ["v1-a", "v1-b", "v2-a"]
    canary = {"x-canary": "true"}
    client = mesh.client(mesh.bootstrap("web"))
    fair(client.calls(300, concurrency=6), ids, tolerance=0.08)

    policy = tmp_path / "echo.yaml"
    policy.write_text(CANARY_POLICY)
    mesh.cp.ctl("policy", "apply", "-f", policy)
    eventually(
        CONVERGE_S,
        "the canary route in force",
        lambda: client.calls(20, concurrency=4, metadata=canary),
        lambda b: b.instances == {"v2-a": 20},
    )

    # 80/20 per call (gRPC picks a weighted cluster per call): over 1000
    # calls the v2 share is 20 % ± 8 % (a standard deviation is 1.3 %),
    # the rest round robin within v1; an even spread would give v2 33 %.
    split = client.calls(1000, concurrency=8)
    assert not split.errors, split
    assert abs(split.share("v2-a") - 0.20) <= 0.08, split
    for i in ("v1-a", "v1-b"):
        assert abs(split.share(i) - 0.40) <= 0.08, split

    # The header route sends every call carrying the header to v2; the
    # header must match exactly, so another value follows the split.
    assert client.calls(200, concurrency=8, metadata=canary).instances == {"v2-a": 200}
    other = client.calls(500, concurrency=8, metadata={"x-canary": "false"})
    assert not other.errors, other
    assert abs(other.share("v2-a") - 0.20) <= 0.08, other

    # Deleting the policy restores the even spread, for every call.
    mesh.cp.ctl("policy", "delete", "echo", output_json=False)
    eventually(
        CONVERGE_S,
        "the canary route gone",
        lambda: client.calls(30, concurrency=3, metadata=canary),
        lambda b: not b.errors and {"v1-a", "v1-b"} & set(b.instances),
    )
    fair(client.calls(900, concurrency=8), ids, tolerance=0.06)
    fair(client.calls(300, concurrency=6, metadata=canary), ids, tolerance=0.08)


def sidecar_fronted_echo(mesh):
    """echo-grpc behind a sidecar, the only instance of echo (a cluster
    has one transport: plaintext instances are left out of a service
    that has sidecar-fronted ones)."""
    echo = mesh.echo("echo-sc")
    sidecar = mesh.sidecar("n1", "echo", mesh.port(echo))
    assert list(mesh.instances()) == ["n1.echo"]
    return sidecar


def test_sidecar_fronted_instance_over_mtls_obeys_authorization(mesh):
    sidecar_fronted_echo(mesh)
    boot = mesh.bootstrap("web")
    client = mesh.client(boot, creds="xds")
    assert client.calls(40, concurrency=4).instances == {"echo-sc": 40}
    assert client.calls(10, concurrency=2, method="stream").instances == {"echo-sc": 10}

    # Without xDS credentials the channel speaks plaintext to an inbound
    # port that accepts only mTLS.
    plain = mesh.client(boot, creds="insecure").calls(3, concurrency=1, timeout=5)
    assert plain.errors == {"UNAVAILABLE": 3}, plain

    # The sidecar answers a refused gRPC call 403 (x-isdp-error:
    # denied-by-policy) in gRPC's form: grpc-status PERMISSION_DENIED, the
    # reason as grpc-message, no body; every call, streams included.
    def probe(method="unary"):
        return lambda: client.calls(4, concurrency=2, method=method)

    def refused(b):
        return b.errors == {"PERMISSION_DENIED": b.total} and b.error.startswith(
            "PERMISSION_DENIED: denied-by-policy: "
        )

    def served(b):
        return b.instances == {"echo-sc": b.total}

    mesh.cp.ctl("authz", "deny", "--to", "echo", "--from", "web")
    eventually(CONVERGE_S, "web denied", probe(), refused)
    for method in ("unary", "stream"):
        batch = client.calls(100, concurrency=4, method=method)
        assert refused(batch), batch

    mesh.cp.ctl("authz", "delete", "--to", "echo", "deny-web", output_json=False)
    eventually(CONVERGE_S, "web allowed again", probe(), served)

    # Default deny refuses web too, until a rule allows it by name.
    mesh.cp.ctl("authz", "default", "deny")
    eventually(CONVERGE_S, "default deny", probe(), refused)
    mesh.cp.ctl("authz", "allow", "--to", "echo", "--from", "web")
    eventually(CONVERGE_S, "web allowed by rule", probe(), served)

    # Method paths are rule paths: deny only the server stream.
    mesh.cp.ctl(
        "authz", "deny", "--to", "echo", "--from", "web",
        "--path-prefix", "/isdp.examples.echo.v1.Echo/ServerStream", "--name", "no-streams",
    )
    eventually(CONVERGE_S, "streams denied", probe(method="stream"), refused)
    assert served(client.calls(20, concurrency=4))


def test_revoked_token_cuts_a_running_client_off_at_the_sidecar(mesh):
    sidecar = sidecar_fronted_echo(mesh)
    boot = mesh.bootstrap("web")
    client = mesh.client(boot, creds="xds")
    assert client.calls(20, concurrency=4).instances == {"echo-sc": 20}

    # The client keeps the resources it has (gRPC does, when its xDS
    # stream fails); the sidecar refuses its certificate, on the
    # connection already open and at every new handshake (a TLS alert,
    # which gRPC reports as UNAVAILABLE without the reason: the sidecar's
    # log names it).
    token = boot["token_id"]
    mesh.cp.ctl("token", "revoke", token, output_json=False)
    eventually(
        CONVERGE_S,
        "calls refused",
        lambda: client.calls(4, concurrency=2, timeout=5),
        lambda b: b.errors == {"UNAVAILABLE": b.total},
    )
    cut = client.calls(20, concurrency=4, timeout=5)
    assert cut.errors == {"UNAVAILABLE": 20}, cut
    log = sidecar.stderr()
    assert "refusing a peer whose token was revoked" in log and f"token={token}" in log, log[-3000:]


def test_bad_credentials_fail_the_client_naming_the_xds_server(mesh):
    mesh.register("echo-0")
    addr = mesh.cp.grpc_target

    # A token whose scope leaves echo out: echo is answered as absent, and
    # gRPC calls a resource absent 15 s after asking (gRFC A57), so this
    # client runs in the background while the others are checked.
    scoped = mesh.client(mesh.bootstrap("scoped", upstreams=("other",)))
    absent = scoped.calls_async(1, timeout=60)

    revoked_boot = mesh.bootstrap("revoked")
    mesh.cp.ctl("token", "revoke", revoked_boot["token_id"], output_json=False)
    revoked = mesh.client(revoked_boot).calls(3, concurrency=1)
    assert revoked.errors == {"UNAVAILABLE": 3}, revoked
    assert f"xDS channel for server {addr}" in revoked.error, revoked
    assert f"token {revoked_boot['token_id']}, which has been revoked" in revoked.error, revoked

    # A certificate ends with its token: past a --ttl, the control plane
    # refuses it at the handshake (gRPC shows a TLS failure; the control
    # plane's log names the expiry). Certificates end on a whole second,
    # and the handshake judges in whole seconds: a second and a half past
    # the expiry, the handshake (not only the auth layer) refuses it.
    minted = time.monotonic()
    expired_boot = mesh.bootstrap("expired", extra=["--ttl", "3s"])
    time.sleep(max(0.0, minted + 4.5 - time.monotonic()))
    expired = mesh.client(expired_boot).calls(3, concurrency=1)
    assert expired.errors == {"UNAVAILABLE": 3}, expired
    assert f"xDS channel for server {addr}" in expired.error, expired

    # A client whose credentials are good calls echo meanwhile.
    assert mesh.client(mesh.bootstrap("good")).calls(5).instances == {"echo-0": 5}

    absent = absent.result(timeout=90)
    assert absent.errors == {"UNAVAILABLE": 1}, absent
    assert "LDS resource echo: does not exist" in absent.error, absent

    # The control plane's log names each refusal and why, at the default
    # level.
    log = [line for line in mesh.cp.stderr().splitlines() if " WARN " in line]
    text = "\n".join(log)

    def logged(*words):
        return any(all(w in line for w in words) for line in log)

    assert logged("refused a call", "Unauthenticated", f"token {revoked_boot['token_id']}, which has been revoked"), text
    assert logged("refused a client certificate", "expired"), text
    assert logged("xds subscription refused", 'may not read "echo"'), text
