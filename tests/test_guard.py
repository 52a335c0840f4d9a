"""The service's guard, against a real server on 127.0.0.1: slow senders, Host names, content types, security
headers and prompts in the log.

One server, auth off (the default, and the case a slow-body attack or a cross-site page can use), prompts logged
(`service.log_prompts: true`, the switch the other modules leave off), at most 4 requests in flight per client.
Attackers connect from 127.0.0.2, another client address on the loopback network, so the well-behaved client on
127.0.0.1 is a different client, as it would be on a real network.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tipsen.testing import (SERVICE_CORRUPT, SERVICE_PARAMS, SERVICE_SLUGS, Server, random_bank, slow_post,
                            write_params)

pytestmark = pytest.mark.slow  # a real server on the tiny models

CAP = 4  # service.max_client_requests
BODY_TIMEOUT = 3  # service.body_timeout_s
PARAMS = {**SERVICE_PARAMS, "service": {**SERVICE_PARAMS["service"], "max_client_requests": CAP,
                                        "body_timeout_s": BODY_TIMEOUT, "min_body_rate": 1024, "log_prompts": True,
                                        "allowed_hosts": ["tipsen.example", ".example.org"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    bank = random_bank(tmp / "bank", SERVICE_SLUGS, corrupt=SERVICE_CORRUPT)
    srv = Server(tmp, params=write_params(tmp / "params.yaml", PARAMS), bank=bank)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_slow_bodies_do_not_starve_the_service(server):
    """Ninety connections sending a body a byte at a time, the attack that made every endpoint answer 429: the
    attacker's share is capped, its slow bodies are cut off, and a well-behaved client is served throughout."""
    port = int(server.url.rsplit(":", 1)[1])
    results: list[tuple[int | None, str]] = []
    start = threading.Barrier(91)

    def attack():
        start.wait()
        results.append(slow_post(port, body_len=400, chunk=b" ", every_s=0.25, bound_s=20, source="127.0.0.2"))

    attackers = [threading.Thread(target=attack) for _ in range(90)]
    for t in attackers:
        t.start()
    start.wait()
    served = []
    while any(t.is_alive() for t in attackers) or not served:
        served.append(httpx.get(f"{server.url}/keywords", timeout=120).status_code)
        served.append(httpx.post(f"{server.url}/refine", json={"prompt": "약과"}, timeout=120).status_code)
    for t in attackers:
        t.join()
    statuses = Counter(status for status, _ in results)
    assert set(served) == {200}, Counter(served)
    assert set(statuses) == {408, 429} and statuses[408] >= 1, statuses
    for status, body in results:
        if status == 408:
            assert json.loads(body)["error"].startswith("body: arriving slower than 1024 bytes a second"), body
        else:
            assert json.loads(body)["error"].startswith(f"busy: this client already has {CAP} requests"), body
    assert httpx.post(f"{server.url}/refine", json={"prompt": "약과"}, timeout=120).status_code == 200


def test_a_body_must_arrive_within_its_deadline(server):
    port = int(server.url.rsplit(":", 1)[1])
    # fast enough for the rate (4 KiB a second) but 32 KiB would take 8 s, more than body_timeout_s
    status, body = slow_post(port, body_len=32 * 1024, chunk=b" " * 1024, every_s=0.25, bound_s=30)
    assert status == 408 and json.loads(body)["error"] == f"body: not received within {BODY_TIMEOUT} s " \
                                                          "(service.body_timeout_s)", body


def test_host_header_is_checked(server):
    def get(host: str, path: str = "/keywords") -> httpx.Response:
        return httpx.get(f"{server.url}{path}", headers={"Host": host}, timeout=60)

    port = server.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", "127.0.0.1", "[::1]:3000", "tipsen.example", "TIPSEN.example:80",
                 "example.org", "a.b.example.org"):
        assert get(host).status_code == 200, host
    for host in ("evil.example", "tipsen.example.evil.com", "notexample.org", "localhost.evil.com"):
        r = get(host)
        assert r.status_code == 400 and r.json()["error"].startswith(f"host: {host.lower()!r} is not a name"), r.text
        assert "service.allowed_hosts" in r.json()["error"]
    assert get("evil.example", "/readyz").status_code == 200  # probes come by any name
    r = httpx.post(f"{server.url}/refine", json={"prompt": "약과"}, headers={"Host": "evil.example"}, timeout=60)
    assert r.status_code == 400  # a rebound name cannot reach the APIs either


def test_json_apis_accept_json_only(server):
    body = json.dumps({"prompt": "약과"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(f"{server.url}/refine", content=body, headers=headers, timeout=60)
        assert r.status_code == 415, (ctype, r.text)
        assert r.json()["error"].startswith("content-type:") and r.json()["error"].endswith(
            "allowed: application/json"), r.text
    r = httpx.post(f"{server.url}/refine", content=body, headers={"Content-Type": "application/json; charset=utf-8"},
                   timeout=60)
    assert r.status_code == 200, r.text


def test_security_headers(server):
    page = httpx.get(f"{server.url}/", timeout=60)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    for r in (page, httpx.get(f"{server.url}/ui/app.js", timeout=60), httpx.get(f"{server.url}/keywords", timeout=60),
              httpx.get(f"{server.url}/nope", timeout=60)):
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["referrer-policy"] == "no-referrer", r.url


def test_the_page_has_no_inline_script_or_style():
    """What the CSP forbids must not be in the page (the browser tests run it under that policy)."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Scan(HTMLParser):
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "script" and not attrs.get("src"):
                found.append("inline <script>")
            if tag == "style" or "style" in attrs:
                found.append(f"inline style on <{tag}>")
            found.extend(f"handler {a} on <{tag}>" for a in attrs if a.startswith("on"))

    Scan().feed((Path(__file__).resolve().parent.parent / "service" / "static" / "index.html").read_text("utf-8"))
    assert not found, found


def test_prompts_are_logged_when_switched_on(server):
    words = "할머니댁 마당의 장독대 7391"
    assert httpx.post(f"{server.url}/refine", json={"prompt": words}, timeout=120).status_code == 200
    assert words in server.logs()  # the other servers of the suite keep them out (test_service)
