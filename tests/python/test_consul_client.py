"""The Consul-compatible endpoints as a discovery client written by others
reads them: `py-consul` (the maintained Python Consul client) pointed at the
control plane's HTTP listener over TLS, with a read token as its ACL token
(`X-Consul-Token`). It lists the catalog, reads a service's healthy
instances, and follows them with blocking queries (`index` / `wait`),
which a registration or deregistration ends at once.

Prometheus' `consul_sd_configs` is the other client the issue names;
Debian 12's `prometheus` package is built without Consul discovery, so it
cannot be the one here: test_prometheus_sd.py runs that Prometheus against
the HTTP service discovery endpoint instead (see the README's Consul
section)."""

import threading
import time

import consul
import pytest
import requests

SERVICE = "pyconsulsd"


@pytest.fixture(scope="module")
def client(control_plane):
    read = control_plane.ctl("token", "create", "--role", "read")["secret"]
    host, port = control_plane.addrs["http"].rsplit(":", 1)
    return consul.Consul(
        host=host,
        port=int(port),
        scheme="https",
        verify=str(control_plane.data / "ca.pem"),
        token=read,
    )


def register(cp, id_, port):
    r = requests.post(
        f"{cp.http_url}/v1/instances",
        json={"id": id_, "service": SERVICE, "address": "127.0.0.1", "port": port},
        headers={"Authorization": f"Bearer {cp.admin_token()}"},
        verify=str(cp.data / "ca.pem"),
        timeout=10,
    )
    assert r.status_code == 200, r.text


def ports(nodes):
    return sorted(n["Service"]["Port"] for n in nodes)


def test_discovery_follows_registrations_with_blocking_queries(client, control_plane):
    register(control_plane, "sd-1", 9301)
    register(control_plane, "sd-2", 9302)
    _, services = client.catalog.services()
    assert services[SERVICE] == []
    index, nodes = client.health.service(SERVICE, passing=True)
    assert ports(nodes) == [9301, 9302]
    assert nodes[0]["Checks"][0]["Status"] == "passing"
    _, entries = client.catalog.service(SERVICE)
    assert sorted(e["ServiceID"] for e in entries) == ["sd-1", "sd-2"]

    # A blocking query waits while nothing changes...
    start = time.monotonic()
    same, _ = client.health.service(SERVICE, index=index, wait="300ms", passing=True)
    assert time.monotonic() - start >= 0.25 and same == index

    # ...and a deregistration ends it at once, without the instance.
    got = {}

    def follow():
        got["index"], got["nodes"] = client.health.service(SERVICE, index=index, wait="30s", passing=True)
        got["at"] = time.monotonic()

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()
    control_plane.ctl("deregister", "sd-1", output_json=False)
    gone = time.monotonic()
    t.join(timeout=10)
    assert not t.is_alive()
    assert got["at"] - gone < 0.1, f"answered {got['at'] - gone:.3f}s after the deregistration"
    assert ports(got["nodes"]) == [9302]
    assert int(got["index"]) > int(index)


def test_the_catalog_index_moves_with_any_service(client, control_plane):
    index, _ = client.catalog.services()
    got = {}

    def follow():
        got["index"], got["services"] = client.catalog.services(index=index, wait="30s")

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.2)
    register(control_plane, "sd-new-1", 9303)
    t.join(timeout=10)
    assert not t.is_alive() and int(got["index"]) > int(index)
    assert SERVICE in got["services"]
