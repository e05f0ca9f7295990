"""The HTTP/JSON API as clients written by others see it: Python `requests`
and `curl`, over TLS trusting the control plane's ca.pem, with bearer
tokens. Every operation of /v1/openapi.json is called; every error status
comes with a message naming what is wrong; rejected requests change
nothing; a blocking read returns within 100 ms of a change; the Consul
endpoints answer in Consul's shapes, scoped like xDS for join tokens."""

import json
import subprocess
import threading
import time

import pytest
import requests

TIMEOUT_S = 10


class Api:
    """`requests` against one control plane's HTTP listener."""

    def __init__(self, cp, token):
        self.cp = cp
        self.base = cp.http_url
        self.ca = str(cp.data / "ca.pem")
        self.token = token
        self.called = set()

    def call(self, method, path, *, token=None, template=None, expect=200, **kw):
        headers = kw.pop("headers", {})
        token = self.token if token is None else token
        if token:
            headers.setdefault("Authorization", f"Bearer {token}")
        r = requests.request(
            method, self.base + path, headers=headers, verify=self.ca, timeout=TIMEOUT_S, **kw
        )
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        if r.status_code == 200:
            self.called.add((method, template or path.split("?")[0]))
        return r

    def error(self, method, path, status, *words, **kw):
        """Calls and checks an error answer: its status, the JSON
        {code, message} body, and that the message names each word."""
        r = self.call(method, path, expect=status, **kw)
        body = r.json()
        assert set(body) == {"code", "message"}, body
        for w in words:
            assert w in body["message"], f"{w!r} not in {body['message']!r}"
        return body


@pytest.fixture(scope="module")
def api(control_plane):
    return Api(control_plane, control_plane.admin_token())


def token(cp, *args):
    return cp.ctl("token", "create", *args)["secret"]


def instance(**kw):
    body = {"service": "pyhttp", "address": "127.0.0.1", "port": 8080}
    body.update(kw)
    return body


def test_every_operation_in_the_openapi_document(api):
    doc = api.call("GET", "/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    # Registry.
    got = api.call("POST", "/v1/instances", json=instance(id="pyhttp-1", metadata={"zone": "a"})).json()
    assert got["id"] == "pyhttp-1" and got["inboundPort"] == 0 and got["metadata"] == {"zone": "a"}
    services = api.call("GET", "/v1/services").json()["services"]
    assert [s["instances"] for s in services if s["name"] == "pyhttp"] == [1], services
    listed = api.call(
        "GET", "/v1/services/pyhttp/instances", template="/v1/services/{service}/instances"
    )
    assert [i["id"] for i in listed.json()["instances"]] == ["pyhttp-1"]
    assert int(listed.headers["X-Isdp-Index"]) > 0
    api.call("DELETE", "/v1/instances/pyhttp-1", template="/v1/instances/{id}")
    # Traffic policies: dry run, put, compare-and-set, get, list, delete.
    policies = "/v1/policies/{service}"
    doc_ = {"timeouts": {"request": "2s"}}
    dry = api.call("PUT", "/v1/policies/pyhttp?dryRun=true", json=doc_, template=policies).json()
    # Nothing stored: a dry run has no version (uint64 is a string in JSON).
    assert dry["policy"]["version"] == "0", dry
    api.error("GET", "/v1/policies/pyhttp", 404, "pyhttp")
    put = api.call("PUT", "/v1/policies/pyhttp?version=0", json=doc_, template=policies).json()
    version = put["policy"]["version"]
    api.error("PUT", "/v1/policies/pyhttp?version=0", 409, "version", json=doc_)
    got = api.call("GET", "/v1/policies/pyhttp", template=policies).json()
    assert got["policy"]["version"] == version
    assert any(p["policy"]["service"] == "pyhttp" for p in api.call("GET", "/v1/policies").json()["policies"])
    api.call("DELETE", f"/v1/policies/pyhttp?version={version}", template=policies)
    # Authorization rules and the default.
    rule = "/v1/authorization/rules/{destination}/{name}"
    put = api.call(
        "PUT",
        "/v1/authorization/rules/pyhttp/allow-web",
        json={"sources": ["web"], "action": "ACTION_ALLOW"},
        template=rule,
    ).json()
    assert put["rule"]["destination"] == "pyhttp" and put["rule"]["name"] == "allow-web"
    rules = api.call("GET", "/v1/authorization/rules?destination=pyhttp").json()["rules"]
    assert [r["name"] for r in rules] == ["allow-web"]
    api.call("DELETE", "/v1/authorization/rules/pyhttp/allow-web", template=rule)
    before = api.call("GET", "/v1/authorization/default").json()["action"]
    api.call("PUT", "/v1/authorization/default", json={"action": before})
    # Tokens.
    created = api.call("POST", "/v1/tokens", json={"role": "ROLE_READ", "description": "py"}).json()
    assert created["secret"].startswith("isdp_")
    ids = [t["id"] for t in api.call("GET", "/v1/tokens").json()["tokens"]]
    assert created["info"]["id"] in ids
    api.call("DELETE", f"/v1/tokens/{created['info']['id']}", template="/v1/tokens/{id}")
    api.error("GET", "/v1/services", 401, "revoked", token=created["secret"])
    # Proxy status.
    assert "proxies" in api.call("GET", "/v1/proxies").json()
    # Consul.
    api.call("GET", "/v1/catalog/services")
    api.call("GET", "/v1/catalog/service/pyhttp", template="/v1/catalog/service/{name}")
    api.call("GET", "/v1/health/service/pyhttp", template="/v1/health/service/{name}")
    api.call("GET", "/v1/agent/self")
    # Prometheus HTTP service discovery (test_prometheus_sd.py runs the server).
    assert api.call("GET", "/v1/prometheus/targets?service=pyhttp&passing").json() == []
    described = {
        (m.upper(), p)
        for p, item in doc["paths"].items()
        for m in item
        if m in ("get", "put", "post", "delete", "patch")
    }
    assert described - api.called == set(), "operations this test did not call"


def test_error_statuses_name_the_problem_and_change_nothing(api, control_plane):
    listed = lambda: api.call("GET", "/v1/services/pyerr/instances").json()["instances"]  # noqa: E731
    # 400: malformed JSON, unknown field, the registry's own validation.
    api.error("POST", "/v1/instances", 400, "Instance", data=b"{", headers={"Content-Type": "application/json"})
    api.error("POST", "/v1/instances", 400, "colour", json=instance(service="pyerr", colour="red"))
    api.error("POST", "/v1/instances", 400, "port", json=instance(service="pyerr", port=70000))
    api.error("POST", "/v1/instances", 400, "service", json=instance(service="Not_A_Label"))
    api.error("GET", "/v1/services/Not_A_Label/instances", 400, "service")
    api.error("GET", "/v1/services/pyerr/instances?wait=soon", 400, "wait")
    api.error("GET", "/v1/services/pyerr/instances?colour=red", 400, "colour")
    # 413: past --http-max-body-bytes (256 KiB by default), named.
    big = instance(service="pyerr", metadata={"k": "v" * (300 << 10)})
    api.error("POST", "/v1/instances", 413, "262144", json=big)
    # 401: no token, a malformed header, an unknown token.
    api.error("GET", "/v1/services", 401, "bearer token", token="")
    api.error("GET", "/v1/services", 401, "Bearer", token="", headers={"Authorization": "Basic eA=="})
    api.error("GET", "/v1/services", 401, "token", token="isdp_0123456789abcdef_nope")
    # 403: a read token writing, a join token on an operator view.
    read = token(control_plane, "--role", "read")
    api.error("POST", "/v1/instances", 403, "write", json=instance(service="pyerr"), token=read)
    join = token(control_plane, "--role", "join", "--service", "pyerr")
    api.error("GET", "/v1/services", 403, "read", token=join)
    api.error("POST", "/v1/tokens", 403, "admin", json={"role": "ROLE_ADMIN"}, token=read)
    # 404: an unknown instance, an unknown route.
    api.error("DELETE", "/v1/instances/pyerr-nope", 404, "pyerr-nope")
    api.error("GET", "/v1/nothing", 404, "/v1/nothing")
    # 409: compare-and-set on a version that moved.
    api.call("PUT", "/v1/policies/pyerr", json={"timeouts": {"request": "1s"}})
    api.error("DELETE", "/v1/policies/pyerr?version=1", 409, "version")
    api.error("PUT", "/v1/policies/pyerr", 400, "service", json={"service": "other"})
    assert listed() == [], "no rejected request registered anything"


def test_a_blocking_read_returns_within_100ms_of_a_change(api):
    first = api.call("GET", "/v1/services/pywatch/instances")
    index = first.headers["X-Isdp-Index"]
    answered = {}

    def watch():
        r = api.call("GET", f"/v1/services/pywatch/instances?index={index}&wait=30s")
        answered["at"] = time.monotonic()
        answered["body"] = r.json()
        answered["index"] = r.headers["X-Isdp-Index"]

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.3)
    assert t.is_alive(), "the read blocks while nothing changes"
    api.call("POST", "/v1/instances", json=instance(id="pywatch-1", service="pywatch"))
    changed = time.monotonic()
    t.join(timeout=10)
    assert not t.is_alive()
    # The registration's own answer waits for the change to be visible, so
    # the watcher may even answer before it: the bound is one-sided.
    assert answered["at"] - changed < 0.1, f"answered {answered['at'] - changed:.3f}s after the change"
    assert [i["id"] for i in answered["body"]["instances"]] == ["pywatch-1"]
    assert int(answered["index"]) > int(index)


def test_consul_endpoints_in_consuls_shapes(api, control_plane):
    api.call("POST", "/v1/instances", json=instance(id="pyconsul-1", service="pyconsul", port=9100, metadata={"v": "1"}))
    consul = {"X-Consul-Token": control_plane.admin_token()}
    services = api.call("GET", "/v1/catalog/services", token="", headers=dict(consul))
    assert services.json()["pyconsul"] == []
    for h in ("X-Consul-Index", "X-Consul-KnownLeader", "X-Consul-LastContact"):
        assert h in services.headers, h
    entry = api.call("GET", "/v1/catalog/service/pyconsul", token="", headers=dict(consul)).json()[0]
    assert entry["ServiceID"] == "pyconsul-1" and entry["ServicePort"] == 9100
    assert entry["ServiceMeta"] == {"v": "1"} and entry["Datacenter"] == "dc1" and entry["Node"] == "isdp"
    health = api.call("GET", "/v1/health/service/pyconsul?passing", token="", headers=dict(consul)).json()
    assert health[0]["Service"]["Port"] == 9100
    assert health[0]["Checks"][0]["Status"] == "passing"
    assert api.call("GET", "/v1/health/service/pyconsul?tag=x").json() == []
    api.error("GET", "/v1/catalog/services?dc=elsewhere", 400, "dc")
    # A join token reads only what its scope lets it read over xDS.
    scoped = token(control_plane, "--role", "join", "--service", "web", "--upstream", "pyconsul")
    seen = api.call("GET", "/v1/catalog/services", token=scoped).json()
    assert "pyconsul" in seen and "pywatch" not in seen, seen
    api.error("GET", "/v1/health/service/pywatch", 403, "pywatch", token=scoped)


def test_curl(control_plane):
    base = control_plane.http_url
    ca = str(control_plane.data / "ca.pem")
    auth = f"Authorization: Bearer {control_plane.admin_token()}"

    def curl(*args):
        out = subprocess.run(
            ["curl", "-sS", "--cacert", ca, "-w", "\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert out.returncode == 0, out.stderr
        body, _, code = out.stdout.rpartition("\n")
        return int(code), json.loads(body) if body else None

    code, got = curl("-H", auth, "-H", "Content-Type: application/json", "-d",
                     json.dumps(instance(id="pycurl-1", service="pycurl")), f"{base}/v1/instances")
    assert code == 200 and got["id"] == "pycurl-1", got
    code, got = curl("-H", auth, f"{base}/v1/services/pycurl/instances")
    assert code == 200 and [i["id"] for i in got["instances"]] == ["pycurl-1"]
    code, got = curl("--http2", "-H", auth, f"{base}/v1/catalog/service/pycurl")
    assert code == 200 and got[0]["ServiceID"] == "pycurl-1"
    code, got = curl(f"{base}/v1/services")
    assert code == 401 and "bearer token" in got["message"]
    code, got = curl("-X", "DELETE", "-H", auth, f"{base}/v1/instances/pycurl-1")
    assert code == 200
