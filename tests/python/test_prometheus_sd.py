"""A real Prometheus server (Debian's `prometheus`, /usr/bin/prometheus)
discovers the mesh through `http_sd_configs` pointed at the control
plane's `GET /v1/prometheus/targets`, over TLS trusting ca.pem with a read
token. Debian 12's build has no `consul_sd_configs` (see the README's
Consul section), so HTTP service discovery is how it finds ISDP.

Two services' instances serve /metrics (small HTTP servers in this
process); Prometheus must list them as active targets with the
`__meta_isdp_*` labels relabelled into target labels and scrape them
(`health: up`), and drop one within seconds of its deregistration. A
missing `prometheus` binary fails the test: install it with
`apt-get install prometheus` (`.ci/deps.sh promtool` does)."""

import http.server
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests

TIMEOUT_S = 10
# Prometheus reads the targets this often, and scrapes this often.
REFRESH = "1s"
# How soon a deregistered instance must leave Prometheus' active targets.
# ISDP's part is immediate (checked on the endpoint itself); Prometheus
# reads it within one refresh, then its discovery manager and its scrape
# manager each pass changes on at most every 5 s (both fixed in its code,
# no flag), so up to ~11 s, with room for a loaded machine.
GONE_WITHIN_S = 15.0


def prometheus_binary() -> str:
    path = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if not path:
        pytest.fail(
            "prometheus not found (set PROMETHEUS or install it: apt-get install prometheus; "
            "`make test` installs it)",
            pytrace=False,
        )
    return path


class Metrics(http.server.BaseHTTPRequestHandler):
    """Answers /metrics with a one-line exposition, anything else 404."""

    def do_GET(self):
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = b"# TYPE up_test gauge\nup_test 1\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def exporters():
    """Three /metrics servers on 127.0.0.1:0; yields their ports."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics) for _ in range(3)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [s.server_address[1] for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """`prometheus` on 127.0.0.1 with a config of the test's, its TSDB and
    log in a temp dir; killed on stop."""

    def __init__(self, tmp, config: str):
        (tmp / "prometheus.yml").write_text(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"prometheus exited ({self.proc.returncode}):\n{self.output()}"
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready within 30s:\n{self.output()}"
            time.sleep(0.1)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def active_targets(self):
        r = requests.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=TIMEOUT_S)
        r.raise_for_status()
        return r.json()["data"]["activeTargets"]

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._log_file.close()


def config(cp, token: str) -> str:
    """A scrape job discovering every instance, with the discovery labels
    kept as target labels (the `__meta_` ones are dropped otherwise).
    `type: Bearer` is spelled out: http_sd_configs sends the bare
    credentials without it, whatever Prometheus' documentation says
    (prometheus/docs#2377), and the control plane answers that 401."""
    return f"""
global:
  scrape_interval: {REFRESH}
  scrape_timeout: {REFRESH}
scrape_configs:
  - job_name: mesh
    http_sd_configs:
      - url: {cp.http_url}/v1/prometheus/targets
        refresh_interval: {REFRESH}
        authorization: {{type: Bearer, credentials: {token}}}
        tls_config: {{ca_file: {cp.data / "ca.pem"}}}
    relabel_configs:
      - {{source_labels: [__meta_isdp_service], target_label: service}}
      - {{source_labels: [__meta_isdp_instance_id], target_label: instance_id}}
      - {{source_labels: [__meta_isdp_node], target_label: node}}
      - {{source_labels: [__meta_isdp_health], target_label: health}}
      - {{source_labels: [__meta_isdp_zone], target_label: zone}}
      - {{action: labelmap, regex: __meta_isdp_metadata_(.+), replacement: meta_$1}}
"""


def call(cp, method, path, **kw):
    r = requests.request(
        method,
        cp.http_url + path,
        headers={"Authorization": f"Bearer {cp.admin_token()}"},
        verify=str(cp.data / "ca.pem"),
        timeout=TIMEOUT_S,
        **kw,
    )
    assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
    return r.json()


def by_instance(targets):
    return {t["labels"].get("instance_id"): t for t in targets}


def wait_for(what, check, timeout_s):
    """Polls `check` until it returns a true value; returns it and the
    seconds it took, or fails with `what` and the last value."""
    start = time.monotonic()
    while True:
        got = check()
        if got:
            return got, time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"{what} not within {timeout_s}s; last: {got!r}"
        time.sleep(0.1)


def test_prometheus_discovers_instances_and_drops_a_deregistered_one(control_plane, exporters, tmp_path):
    cp = control_plane
    web, web2, pay = exporters
    instances = [
        {"id": "prom-web-1", "service": "promweb", "port": web, "metadata": {"zone": "z1", "app.kubernetes.io/name": "web"}},
        {"id": "prom-web-2", "service": "promweb", "port": web2},
        {"id": "prom-pay-1", "service": "prompay", "port": pay, "metadata": {"version": "v2"}},
    ]
    for i in instances:
        call(cp, "POST", "/v1/instances", json={"address": "127.0.0.1", **i})
    read = cp.ctl("token", "create", "--role", "read")["secret"]
    prom = Prometheus(tmp_path, config(cp, read))
    try:
        ids = {i["id"] for i in instances}

        def all_up():
            t = by_instance(prom.active_targets())
            return t if ids <= t.keys() and all(t[i]["health"] == "up" for i in ids) else None

        targets, took = wait_for("all three instances scraped as active targets", all_up, 30)
        w1 = targets["prom-web-1"]
        assert w1["scrapeUrl"] == f"http://127.0.0.1:{web}/metrics"
        labels = w1["labels"]
        assert labels["service"] == "promweb"
        assert labels["node"] == "isdp", "an operator-registered instance's node"
        assert labels["health"] == "passing"
        assert labels["zone"] == "z1"
        assert labels["meta_zone"] == "z1"
        assert labels["meta_app_kubernetes_io_name"] == "web", "a sanitized metadata key"
        assert w1["discoveredLabels"]["__address__"] == f"127.0.0.1:{web}"
        assert targets["prom-pay-1"]["labels"]["service"] == "prompay"
        assert targets["prom-pay-1"]["labels"]["meta_version"] == "v2"
        assert "zone" not in targets["prom-web-2"]["labels"], "an empty zone is no label"

        # Deregistered: gone from the active targets within seconds, the
        # others staying.
        call(cp, "DELETE", "/v1/instances/prom-web-2")
        served = requests.get(
            f"{cp.http_url}/v1/prometheus/targets",
            headers={"Authorization": f"Bearer {read}"},
            verify=str(cp.data / "ca.pem"),
            timeout=TIMEOUT_S,
        ).json()
        served_ids = {g["labels"]["__meta_isdp_instance_id"] for g in served}
        assert served_ids >= {"prom-web-1", "prom-pay-1"} and "prom-web-2" not in served_ids, served

        def web2_gone():
            t = by_instance(prom.active_targets())
            return t if "prom-web-2" not in t else None

        left, gone_after = wait_for("prom-web-2 to leave the active targets", web2_gone, GONE_WITHIN_S)
        assert {"prom-web-1", "prom-pay-1"} <= left.keys(), left.keys()
        print(f"discovered in {took:.1f}s; deregistration seen in {gone_after:.1f}s")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- prometheus log ---\n{prom.output()[-4000:]}") from None
    finally:
        prom.stop()
