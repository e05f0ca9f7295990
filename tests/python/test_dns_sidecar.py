"""The sidecar's DNS server (`--dns-listen`) as dnspython, a DNS stack
written by others, sees it: A, AAAA and SRV of the healthy instances of an
upstream, NXDOMAIN and REFUSED, TC on a UDP answer too big for 512 bytes
with the retry over TCP, a dead instance gone from the answers within the
health-check time, and malformed packets answered FORMERR (or not at all)
while the server keeps serving.

The instances are registered by an operator (`isdpctl register`) with an
HTTP health check served here, so a test can make one die.
"""

import http.server
import socket
import threading
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from harness import ControlPlane, Process, clean_env
from xds_mesh import eventually

# The health contract: a dead instance is seen within 2 s.
DETECT_S = 2.0
# Instances of `many`: 40 A records overflow a 512-byte UDP answer.
MANY = 40


class Health:
    """An HTTP server answering 200 on /healthz until `stop`."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mesh(tmp_path):
    (tmp_path / "cp").mkdir()
    cp = ControlPlane(tmp_path / "cp")
    healths = []
    for n in range(3):
        h = Health()
        healths.append(h)
        cp.ctl("register", "--service", "payments", "--address", f"127.0.0.{11 + n}", "--port", 9000 + n,
               "--id", f"p{n}", "--check", h.url, "--interval", "200ms", "--timeout", "500ms")
    cp.ctl("register", "--service", "payments", "--address", "::1", "--port", 9100, "--id", "p6")
    for n in range(MANY):
        cp.ctl("register", "--service", "many", "--address", f"127.0.1.{n + 1}", "--port", 8000 + n, "--id", f"m{n}")
    sidecar = Process(
        "isdp-sidecar",
        [
            "--node-id", "web",
            "--identity", "web",
            "--control-plane", cp.url,
            "--ca-file", cp.data / "ca.pem",
            "--admin-listen", "127.0.0.1:0",
            "--inbound-listen", "127.0.0.1:0",
            "--outbound-listen", "127.0.0.1:0",
            "--upstream", "name=payments,listen=127.0.0.1:0",
            "--upstream", "name=many,listen=127.0.0.1:0",
            "--dns-listen", "127.0.0.1:0",
            "--dns-max-answers", "64",
            "--dns-ttl", "0s",
        ],
        tmp_path / "sidecar.log",
        env=clean_env(ISDP_JOIN_TOKEN=cp.admin_token()),
    )
    host, port = sidecar.addrs["dns"].rsplit(":", 1)
    yield {"host": host, "port": int(port), "healths": healths}
    sidecar.stop()
    for h in healths:
        h.stop()
    alive = cp.alive()
    cp.stop()
    assert alive, f"control plane died during the test; stderr:\n{cp.stderr(tail=40)}"


def ask(m, name, rdtype, **kw):
    q = dns.message.make_query(name, rdtype, **kw)
    return dns.query.udp(q, m["host"], port=m["port"], timeout=2)


def data(response, rdtype):
    return sorted(rd.to_text() for rrset in response.answer if rrset.rdtype == rdtype for rd in rrset)


def test_a_aaaa_srv_and_the_names_that_are_not(mesh):
    a = eventually(10, "three A records", lambda: ask(mesh, "payments.service.isdp.", "A"),
                   lambda r: len(data(r, dns.rdatatype.A)) == 3)
    assert data(a, dns.rdatatype.A) == ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
    assert a.flags & dns.flags.AA and not a.flags & dns.flags.RA
    assert all(rrset.ttl == 0 for rrset in a.answer)

    aaaa = ask(mesh, "payments.service.isdp.", "AAAA")
    assert data(aaaa, dns.rdatatype.AAAA) == ["::1"]

    srv = ask(mesh, "payments.service.isdp.", "SRV")
    records = sorted((rd.port, rd.target.to_text()) for rrset in srv.answer for rd in rrset)
    assert records == [
        (9000, "p0.instance.isdp."),
        (9001, "p1.instance.isdp."),
        (9002, "p2.instance.isdp."),
        (9100, "p6.instance.isdp."),
    ]
    extra = {rrset.name.to_text(): [rd.to_text() for rd in rrset] for rrset in srv.additional}
    assert extra["p0.instance.isdp."] == ["127.0.0.11"]
    assert extra["p6.instance.isdp."] == ["::1"]
    one = ask(mesh, "P1.Instance.ISDP.", "A")
    assert data(one, dns.rdatatype.A) == ["127.0.0.12"]

    assert ask(mesh, "nope.service.isdp.", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask(mesh, "p9.instance.isdp.", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask(mesh, "example.com.", "A").rcode() == dns.rcode.REFUSED
    txt = ask(mesh, "payments.service.isdp.", "TXT")
    assert txt.rcode() == dns.rcode.NOERROR and not txt.answer


def test_a_big_answer_is_truncated_over_udp_and_whole_over_tcp(mesh):
    q = dns.message.make_query("many.service.isdp.", "A")
    eventually(10, "many answered", lambda: ask(mesh, "many.service.isdp.", "A", use_edns=0, payload=4096),
               lambda r: len(data(r, dns.rdatatype.A)) == MANY)
    udp = dns.query.udp(q, mesh["host"], port=mesh["port"], timeout=2)
    assert udp.flags & dns.flags.TC and not udp.answer
    response, used_tcp = dns.query.udp_with_fallback(q, mesh["host"], port=mesh["port"], timeout=2)
    assert used_tcp
    assert len(data(response, dns.rdatatype.A)) == MANY
    # An EDNS client saying it takes 4096 gets 1232 at most: 40 A records
    # (about 700 bytes) fit.
    big = ask(mesh, "many.service.isdp.", "A", use_edns=0, payload=4096)
    assert not big.flags & dns.flags.TC and big.edns == 0 and big.payload == 1232


def test_a_dead_instance_leaves_the_answers(mesh):
    eventually(10, "three A records", lambda: ask(mesh, "payments.service.isdp.", "A"),
               lambda r: len(data(r, dns.rdatatype.A)) == 3)
    mesh["healths"][1].stop()
    killed = time.monotonic()
    eventually(DETECT_S * 2, "p1 gone", lambda: ask(mesh, "payments.service.isdp.", "A"),
               lambda r: data(r, dns.rdatatype.A) == ["127.0.0.11", "127.0.0.13"])
    gone = time.monotonic() - killed
    assert gone <= DETECT_S, f"dead instance answered for {gone:.2f}s"


def test_malformed_packets_get_formerr_or_nothing(mesh):
    eventually(10, "an answer", lambda: ask(mesh, "payments.service.isdp.", "A"),
               lambda r: len(data(r, dns.rdatatype.A)) == 3)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((mesh["host"], mesh["port"]))
    good = dns.message.make_query("payments.service.isdp.", "A")
    good.id = 7
    # Too short for a header: no answer; the next reply is the next query's.
    s.send(b"\x12\x34\x01")
    s.send(good.to_wire())
    assert dns.message.from_wire(s.recv(2048)).id == 7
    for wire in [
        b"\x00\x08\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xfe",  # garbage question
        b"\x00\x08\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # no question
        b"\x00\x08\x01\x00\x00\x02" + good.to_wire()[6:],  # two promised, one sent
    ]:
        s.send(wire)
        reply = s.recv(2048)
        assert reply[:2] == b"\x00\x08" and reply[3] & 0x0F == dns.rcode.FORMERR, reply
    two = dns.message.make_query("payments.service.isdp.", "A")
    two.question.append(dns.message.make_query("many.service.isdp.", "A").question[0])
    s.send(two.to_wire())
    assert dns.message.from_wire(s.recv(2048)).rcode() == dns.rcode.FORMERR
    s.close()
    # Still serving, over both transports.
    assert len(data(ask(mesh, "payments.service.isdp.", "A"), dns.rdatatype.A)) == 3
    tcp = dns.query.tcp(good, mesh["host"], port=mesh["port"], timeout=2)
    assert len(data(tcp, dns.rdatatype.A)) == 3
