"""Hardening probes: hand-made bad requests and a slow-body attack against a real server, bad CLI inputs.

`python -m benchmarks.hardening [--smoke]`. Counts, not timings: how many bad inputs were tried, how many gave a
5xx or a traceback, how many CLI inputs exited 0 when they should not, and how many well-behaved requests were
served while ninety connections sent their bodies a byte a second (from 127.0.0.2, another client address).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parent.parent
SLUGS = ["gimjang", "yakgwa", "songpyeon", "kimbap"]

J = {"Content-Type": "application/json"}


def bad_requests() -> list[tuple[str, str, dict, bytes | None]]:
    """(method, path, headers, body): what an attacker or a broken client sends."""
    big = json.dumps({"prompt": "가" * 40_000}).encode()
    cases: list[tuple[str, str, dict, bytes | None]] = []
    for body in (b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe", b'{"prompt": "\x00"}', b"{" * 5000 + b"}" * 5000,
                 json.dumps({"prompt": "a", "steps": 10 ** 30}).encode(), big, b'{"prompt": 1}',
                 b'{"prompt": "a", "seed": -1}', b'{"prompt": "a", "seed": 4294967296}', b'{"prompt": "a", "steps": true}',
                 b'{"prompt": "a", "steps": "2"}', b'{"prompt": "a", "guidance": NaN}', b'{"prompt": "a", "width": 7}',
                 b'{"prompt": "a", "keyword": "../../etc/passwd"}', b'{"prompt": "a", "keyword": "stabilityai/sdxl"}',
                 b'{"prompt": "a", "keyword": "nope"}', b'{"prompt": "a", "num_images": 1000}', b'{"prompt": "   "}',
                 b'{"prompt": "a", "extra": 1}', b'{"prompt": "a", "lora_scale": -5}', b'{"prompt": ["a"]}'):
        for path in ("/generate", "/generate_png", "/refine"):
            cases.append(("POST", path, J, body))
    body = json.dumps({"prompt": "약과"}).encode()
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                  "application/octet-stream", "application/x-pickle", None):
        cases.append(("POST", "/generate", {"Content-Type": ctype} if ctype else {}, body))
    for host in ("evil.example", "localhost.evil.com", "", "a" * 300):
        cases.append(("GET", "/keywords", {"Host": host}, None))
    for path in ("/generate_batch", "/nope", "/../etc/passwd", "/ui/../../params.yaml", "/ui/%2e%2e/service.py",
                 "/route?text=" + "가" * 5000, "/route?text=%00", "/docs.json", "/metrics"):
        cases.append(("GET", path, {}, None))
    for method in ("PUT", "DELETE", "PATCH"):
        cases.append((method, "/generate", J, body))
    return cases


def probe_http(url: str) -> dict:
    statuses: Counter = Counter()
    server_errors = []
    with httpx.Client(timeout=120) as client:
        for method, path, headers, body in bad_requests():
            try:
                r = client.request(method, url + path, headers=headers, content=body)
                status = r.status_code
            except httpx.HTTPError as exc:  # the server closed the connection: no 5xx, but recorded
                status = type(exc).__name__
            statuses[status] += 1
            if isinstance(status, int) and status >= 500:
                server_errors.append(f"{method} {path[:60]} -> {status}")
    return {"tried": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "server_errors": len(server_errors), "examples": server_errors[:5]}


def slow_body_attack(url: str, *, attackers: int, seconds: float) -> dict:
    from tipsen.testing import slow_post

    port = int(url.rsplit(":", 1)[1])
    answers: list[int | None] = []
    start = threading.Barrier(attackers + 1)

    def attack():  # each attacker reconnects as soon as it is cut off, for the whole attack
        start.wait()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            answers.append(slow_post(port, body_len=10_000, chunk=b" ", every_s=1.0, bound_s=left,
                                     source="127.0.0.2")[0])

    threads = [threading.Thread(target=attack) for _ in range(attackers)]
    for t in threads:
        t.start()
    start.wait()
    good: Counter = Counter()
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as client:
        while any(t.is_alive() for t in threads):
            good[client.get(f"{url}/keywords").status_code] += 1
            good[client.post(f"{url}/refine", json={"prompt": "약과"}).status_code] += 1
    for t in threads:
        t.join()
    return {"attackers": attackers, "byte_every_s": 1.0, "attack_s": round(time.monotonic() - t0, 1),
            "attacker_connections": len(answers),
            "attacker_answers": {str(k): v for k, v in Counter(answers).items()},
            "good_requests": sum(good.values()), "good_served": good[200],
            "good_refused": sum(v for k, v in good.items() if k != 200)}


def cli_cases(tmp: Path) -> list[tuple[str, list[str], bool]]:
    """(what, argv after `tipsen`, must fail)."""
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp / "folder.yaml").mkdir()
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "broken.yaml").write_text("profile: [demo\n")
    (tmp / "dupes.yaml").write_text((ROOT / "params.yaml").read_text() + "\nkeywords: [yakgwa, yakgwa]\n")
    (tmp / "afile").write_text("keep me\n")
    (tmp / "pickle.pkl").write_bytes(b"\x80\x04\x95")
    return [
        ("binary params file", ["config", "--params", str(tmp / "binary.yaml")], True),
        ("folder as params file", ["config", "--params", str(tmp / "folder.yaml")], True),
        ("params not a mapping", ["config", "--params", str(tmp / "list.yaml")], True),
        ("params YAML syntax error", ["config", "--params", str(tmp / "broken.yaml")], True),
        ("duplicate keywords", ["config", "--params", str(tmp / "dupes.yaml")], True),
        ("missing params file", ["config", "--params", str(tmp / "nope.yaml")], True),
        ("unknown profile", ["config", "--profile", "nope"], True),
        ("unknown command", ["frobnicate"], True),
        ("demo-data into a file", ["demo-data", str(tmp / "afile"), "--per-keyword", "1"], True),
        ("curate output under a file", ["curate", "--raw", str(tmp / "nope"), "--out", str(tmp / "afile" / "c")], True),
        ("curate missing raw export", ["curate", "--raw", str(tmp / "nope"), "--out", str(tmp / "cur")], True),
        ("train unknown keyword", ["train", "--keyword", "pyramid"], True),
        ("bank build from a typo", ["bank", "build", "--loras", str(tmp / "lorsa"), "--out", str(tmp / "b.json")],
         True),
        ("bank show a pickle", ["bank", "show", "--bank", str(tmp / "pickle.pkl")], True),
        ("generate into a folder", ["generate", "약과", "--out", str(tmp)], True),
        ("generate unknown keyword", ["generate", "약과", "--keyword", "pyramid"], True),
        ("generate steps 0", ["generate", "약과", "--steps", "0"], True),
        ("generate seed too big", ["generate", "약과", "--seed", "4294967296"], True),
        ("serve bad port", ["serve", "--port", "70000"], True),
        ("evaluate unknown method", ["evaluate", "--methods", "nope"], True),
    ]


def probe_cli(tmp: Path) -> dict:
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for what, argv, must_fail in cli_cases(tmp):
        r = subprocess.run([sys.executable, "-m", "tipsen.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        lines = [line for line in r.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
        rows.append({"what": what, "rc": r.returncode, "traceback": "Traceback" in r.stderr,
                     "error_lines": sum(": error: " in line for line in lines),
                     "wrong_exit": must_fail and r.returncode == 0})
    kept = (tmp / "afile").read_text() == "keep me\n"
    return {"tried": len(rows), "tracebacks": sum(r["traceback"] for r in rows),
            "wrong_exit": sum(r["wrong_exit"] for r in rows), "file_kept": kept, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--port", type=int, default=3921)
    args = ap.parse_args()

    from tipsen.config import load_params
    from tipsen.testing import SERVICE_PARAMS, Server, random_bank, write_params

    tmp = Path(tempfile.mkdtemp(prefix="tipsen-hardening-"))
    bank = random_bank(tmp / "bank", SLUGS, seed=0, corrupt="hanbok")
    params = write_params(tmp / "params.yaml", {**SERVICE_PARAMS, "service": {}})  # the service's own defaults
    server = Server(tmp, params=params, bank=bank, port=args.port)
    results: dict = {}
    try:
        server.wait_ready(timeout=600)
        before = server.logs().count("Traceback")
        results["http"] = probe_http(server.url)
        results["slow_body"] = slow_body_attack(server.url, attackers=10 if args.smoke else 90,
                                                seconds=3 if args.smoke else 20)
        results["http"]["server_tracebacks"] = server.logs().count("Traceback") - before
    finally:
        server.stop()
    (tmp / "cli").mkdir()
    results["cli"] = probe_cli(tmp / "cli")
    for name, r in results.items():
        print(name, json.dumps({k: v for k, v in r.items() if k != "rows"}, ensure_ascii=False))
    for row in results["cli"]["rows"]:
        if row["traceback"] or row["wrong_exit"] or row["error_lines"] != 1:
            print("  cli:", row)
    out = write_result("hardening" + ("-smoke" if args.smoke else ""), results,
                       params={"smoke": args.smoke,
                               "service": load_params(params, profile="demo").service.model_dump()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
