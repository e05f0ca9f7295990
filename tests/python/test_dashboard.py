"""The dashboard (/ui/) in a real browser: headless Chromium (Debian's
/usr/bin/chromium and chromedriver) driven by Selenium, against a control
plane with three services: `payments` (two echo-http instances an
operator registered, health-checked), and `web` and `api` (echo-http
behind sidecars). The test logs in with a token, sees the services and
instances, kills an instance and sees it turn unhealthy without a reload,
applies a traffic policy and sees it, sends traffic through web's sidecar
to payments and sees the edge's rate, and has a wrong token refused.
Screenshots go to target/ui-screenshots/."""

import json
import pathlib
import shutil
import threading
import time
import urllib.request

import pytest

from harness import ControlPlane, Process, clean_env
from xds_mesh import eventually

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHOTS = ROOT / "target" / "ui-screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# A missing browser fails the run loudly rather than skipping: `make test`
# installs both (`.ci/deps.sh chromium`) and Selenium (requirements.txt).
for _tool in (CHROMIUM, CHROMEDRIVER):
    if not pathlib.Path(_tool).exists():
        raise RuntimeError(f"{_tool} not found: run `.ci/deps.sh chromium` (Debian chromium and chromium-driver)")
from selenium import webdriver  # noqa: E402

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 30


class Echo:
    def __init__(self, tmp, instance_id):
        self.id = instance_id
        self.proc = Process("echo-http", ["--listen", "127.0.0.1:0", "--id", instance_id], tmp / f"{instance_id}.log")
        self.addr = self.proc.addrs["http"]
        self.port = int(self.addr.rsplit(":", 1)[1])


@pytest.fixture
def world(tmp_path):
    (tmp_path / "cp").mkdir()
    cp = ControlPlane(tmp_path / "cp")
    procs = [cp]
    try:
        echoes = {}
        for i in ("payments-1", "payments-2"):
            e = Echo(tmp_path, i)
            procs.append(e.proc)
            echoes[i] = e
            cp.ctl(
                "register", "--service", "payments", "--address", "127.0.0.1", "--port", e.port,
                "--id", i, "--meta", f"zone=zone-{i[-1]}", "--meta", "version=v1",
                "--check", f"http://{e.addr}/healthz", "--interval", "200ms", "--timeout", "500ms",
                # payments-2 is a standby.
                *(["--priority", "1"] if i == "payments-2" else []),
            )
        sidecars = {}
        for service in ("web", "api"):
            e = Echo(tmp_path, f"{service}-app")
            procs.append(e.proc)
            token = cp.ctl("token", "create", "--role", "join", "--service", service)["secret"]
            sc = Process(
                "isdp-sidecar",
                [
                    "--node-id", f"{service}-node",
                    "--control-plane", cp.url,
                    "--ca-file", cp.data / "ca.pem",
                    "--admin-listen", "127.0.0.1:0",
                    "--inbound-listen", "127.0.0.1:0",
                    "--outbound-listen", "127.0.0.1:0",
                    "--service", f"name={service},port={e.port},protocol=http",
                    # web calls payments through its shared outbound listener.
                    *(["--upstream", "name=payments"] if service == "web" else []),
                ],
                tmp_path / f"sidecar-{service}.log",
                env=clean_env(ISDP_JOIN_TOKEN=token),
            )
            procs.append(sc)
            sidecars[service] = sc

            def ready(sc=sc):
                try:
                    with urllib.request.urlopen(f"http://{sc.addrs['admin']}/ready", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False

            eventually(30, f"sidecar {service} /ready", ready)
        yield cp, echoes, sidecars, tmp_path
    finally:
        alive = cp.alive()
        for p in reversed(procs):
            p.stop()
        assert alive, f"control plane died during the test; stderr:\n{cp.stderr(tail=40)}"


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--ignore-certificate-errors", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver, name):
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def wait(driver, what, cond):
    # A form post or a live update can replace an element between finding it
    # and reading it; that is a reason to look again, not a failure.
    retry = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2, ignored_exceptions=retry).until(lambda d: cond(d))
    except Exception:
        shot(driver, "failed-" + what.replace(" ", "-"))
        pytest.fail(f"browser: {what} not within {WAIT_S}s", pytrace=False)


def status_of(driver, instance):
    rows = driver.find_elements(By.CSS_SELECTOR, f'#services-list tr[data-instance="{instance}"]')
    return rows[0].get_attribute("data-status") if rows else None


def login(driver, cp, token):
    driver.get(cp.http_url + "/ui/login")
    box = driver.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    driver.find_element(By.ID, "submit").click()


def test_a_wrong_token_is_refused(world, browser):
    cp, *_ = world
    login(browser, cp, "isdp_0123456789abcdef_not-a-token")
    error = wait(browser, "the refusal", lambda d: d.find_element(By.ID, "error").text or None)
    assert "token refused: unknown or revoked token" in error
    assert browser.current_url.endswith("/ui/login")
    assert not browser.get_cookies(), "no session cookie for a refused token"
    shot(browser, "01-wrong-token")
    # The page itself sends a browser without a session back to the form.
    browser.get(cp.http_url + "/ui/")
    wait(browser, "the login form", lambda d: d.current_url.endswith("/ui/login"))


def test_the_dashboard_follows_the_mesh_live(world, browser):
    cp, echoes, sidecars, tmp = world
    read = cp.ctl("token", "create", "--role", "read")["secret"]
    login(browser, cp, read)
    wait(browser, "the dashboard after login", lambda d: d.current_url.endswith("/ui/"))
    cookie = browser.get_cookie("isdp_session")
    assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict", cookie
    assert read not in cookie["value"]
    # Mark the page: a reload would lose it, so its presence later proves
    # that every change arrived without one.
    browser.execute_script("window.__noReload = 1")

    # Three services and their instances.
    browser.find_element(By.ID, "tab-services").click()
    names = wait(browser, "three services", lambda d: (lambda n: n if {"payments", "web", "api"} <= n else None)(
        {e.get_attribute("data-service") for e in d.find_elements(By.CSS_SELECTOR, ".service")}))
    assert {"payments", "web", "api"} <= names
    for i in ("payments-1", "payments-2", "web-node.web", "api-node.api"):
        wait(browser, f"instance {i}", lambda d, i=i: status_of(d, i))
    wait(browser, "payments-1 healthy", lambda d: status_of(d, "payments-1") == "healthy")
    row = browser.find_element(By.CSS_SELECTOR, '#services-list tr[data-instance="payments-1"]')
    assert "zone-1" in row.text and "version=v1" in row.text
    prio = lambda i: browser.find_element(By.CSS_SELECTOR, f'#services-list tr[data-instance="{i}"] td.priority').text
    assert (prio("payments-1"), prio("payments-2")) == ("0", "1")
    shot(browser, "02-services")

    # The filter narrows the list without a round trip.
    browser.find_element(By.ID, "filter").send_keys("paym")
    wait(browser, "the filter", lambda d: [e.get_attribute("data-service") for e in d.find_elements(By.CSS_SELECTOR, ".service")] == ["payments"])
    browser.find_element(By.ID, "filter").clear()
    browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")

    # Kill an instance: its check fails and the page shows it unhealthy.
    echoes["payments-2"].proc.kill()
    wait(browser, "payments-2 unhealthy", lambda d: status_of(d, "payments-2") == "unhealthy")
    assert status_of(browser, "payments-1") == "healthy"
    shot(browser, "03-instance-unhealthy")
    browser.find_element(By.ID, "tab-transitions").click()
    wait(browser, "the transition", lambda d: any(
        "payments-2" in r.text and "unhealthy" in r.text
        for r in d.find_elements(By.CSS_SELECTOR, "#transitions-list tr")))
    shot(browser, "04-transitions")

    # Apply a traffic policy: it appears as a document.
    policy = tmp / "payments-policy.json"
    policy.write_text(json.dumps({"service": "payments", "timeouts": {"request": "2s"}, "retries": {"attempts": 2}}))
    cp.ctl("policy", "apply", "-f", policy)
    browser.find_element(By.ID, "tab-policies").click()
    doc = wait(browser, "the policy", lambda d: (lambda e: e[0].text if e else None)(
        d.find_elements(By.CSS_SELECTOR, 'article[data-policy="payments"]')))
    assert '"attempts": 2' in doc, doc
    shot(browser, "05-policy")

    # Sidecars show their acknowledged versions.
    browser.find_element(By.ID, "tab-sidecars").click()
    wait(browser, "the sidecars", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#proxies tr[data-node]")) >= 2)
    assert "ACKs" in browser.find_element(By.ID, "proxies").text
    shot(browser, "06-sidecars")

    # Traffic through web's sidecar to payments draws an edge with a rate.
    stop = threading.Event()
    outbound = sidecars["web"].addrs["outbound"]

    def drive():
        while not stop.is_set():
            try:
                req = urllib.request.Request(f"http://{outbound}/orders", headers={"Host": "payments"})
                urllib.request.urlopen(req, timeout=5).read()
            except OSError:
                pass
            time.sleep(0.02)

    threads = [threading.Thread(target=drive, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        browser.find_element(By.ID, "tab-topology").click()
        rps = wait(browser, "the web->payments edge", lambda d: (lambda e: float(e[0].get_attribute("data-rps")) if e and float(e[0].get_attribute("data-rps")) > 0 else None)(
            d.find_elements(By.CSS_SELECTOR, '#edges tr[data-edge="web->payments"]')))
        assert rps > 0
        assert browser.find_elements(By.CSS_SELECTOR, '#graph g.edge[data-edge="web->payments"]')
        assert browser.find_elements(By.CSS_SELECTOR, '#graph g.node[data-node="payments"]')
        shot(browser, "07-topology")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)

    assert browser.execute_script("return window.__noReload") == 1, "the page reloaded"

    # Logout ends the session.
    browser.find_element(By.ID, "logout").click()
    wait(browser, "the login form after logout", lambda d: d.current_url.endswith("/ui/login"))
    browser.get(cp.http_url + "/ui/")
    wait(browser, "no session after logout", lambda d: d.current_url.endswith("/ui/login"))


def test_a_few_hundred_services_page_and_filter(tmp_path, browser):
    import requests

    (tmp_path / "cp").mkdir()
    cp = ControlPlane(tmp_path / "cp")
    try:
        admin = {"Authorization": f"Bearer {cp.admin_token()}"}
        with requests.Session() as s:
            for n in range(300):
                body = {"service": f"svc-{n:03}", "address": "127.0.0.1", "port": 10000 + n, "metadata": {"zone": f"z{n % 3}"}}
                r = s.post(f"{cp.http_url}/v1/instances", json=body, headers=admin, verify=str(cp.data / "ca.pem"), timeout=10)
                assert r.status_code == 200, r.text
        login(browser, cp, cp.admin_token())
        wait(browser, "the dashboard", lambda d: d.current_url.endswith("/ui/"))
        browser.find_element(By.ID, "tab-services").click()
        wait(browser, "the first page", lambda d: "page 1 of 6 (300 of 300 services)" in d.find_element(By.ID, "pager").text)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".service")) == 50
        browser.find_element(By.ID, "next").click()
        first = browser.find_elements(By.CSS_SELECTOR, ".service")[0].get_attribute("data-service")
        assert first == "svc-050", first
        browser.find_element(By.ID, "filter").send_keys("svc-29")
        wait(browser, "the filter", lambda d: len(d.find_elements(By.CSS_SELECTOR, ".service")) == 10)
        assert "page 1 of 1 (10 of 300 services)" in browser.find_element(By.ID, "pager").text
        shot(browser, "08-three-hundred-services")
    finally:
        alive = cp.alive()
        cp.stop()
        assert alive, f"control plane died during the test; stderr:\n{cp.stderr(tail=40)}"
