"""Hot swap of the LoRA bank on a real BentoML server (`tipsen serve` on the tiny models, auth off).

The server's bank lives in a temporary folder that the tests rewrite as a retraining would: new adapter files,
then a new index (`build_bank`), then `POST /bank/reload`.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tipsen.testing import SERVICE_PARAMS, Server, random_bank, write_params

pytestmark = pytest.mark.slow  # a real server on the tiny models

SLUGS = ["gimjang", "yakgwa", "songpyeon", "kimbap"]
PROMPTS = [("김장하는 할머니들", "gimjang"), ("grandma's yakgwa", "yakgwa"), ("추석에 송편 빚기", "songpyeon"),
           ("소풍 갈 때 김밥", "kimbap"), ("a quiet morning by the sea", None)]


def _index(bank: Path) -> dict:
    return json.loads(bank.read_text(encoding="utf-8"))


def _keywords(url: str) -> dict[str, dict]:
    answer = httpx.get(f"{url}/keywords", timeout=30)
    assert answer.status_code == 200, answer.text
    return {k["slug"]: k for k in answer.json()["keywords"]}


def _retrain(root: Path, slug: str, seed: int, **meta) -> str:
    """A new adapter for `slug` in place, as a promotion installs it; the index is rebuilt. Returns its sha256."""
    from safetensors.torch import load_file, save_file

    from tipsen.bank import WEIGHTS_NAME, build_bank
    from tipsen.registry import Registry

    fresh = root.parent / f"fresh-{slug}-{seed}"
    random_bank(fresh, [slug], seed=seed, scale=4.0)
    src = fresh / "loras" / slug / WEIGHTS_NAME
    if meta:  # an adapter with other metadata (another base model): rewritten with it
        save_file(load_file(str(src)), str(src), metadata={f"tipsen.{k}": v for k, v in meta.items()})
    shutil.copy2(src, root / "loras" / slug / WEIGHTS_NAME)
    slugs = [s for s in SLUGS if (root / "loras" / s / WEIGHTS_NAME).is_file()]
    index = build_bank(root / "loras", root / "bank.json", keywords=slugs, registry=Registry.load(),
                       base_model="tiny:sdxl")
    return next(a["sha256"] for a in index["adapters"] if a["slug"] == slug)


def _outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None if it has none."""
    import psutil  # a dependency of BentoML

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


@pytest.fixture(scope="module")
def bank_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reload") / "models"
    random_bank(root, SLUGS, scale=4.0)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, bank_root):
    where = tmp_path_factory.mktemp("server")
    params = {**SERVICE_PARAMS, "generate": {**SERVICE_PARAMS["generate"], "steps": 2}}
    server = Server(where, params=write_params(where / "params.yaml", params), bank=bank_root / "bank.json",
                    host="0.0.0.0")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_keywords_show_each_adapters_sha256_and_load_time(server, bank_root):
    rows = _keywords(server.url)
    shas = {a["slug"]: a["sha256"] for a in _index(bank_root / "bank.json")["adapters"]}
    for slug in SLUGS:
        assert rows[slug]["available"] and rows[slug]["sha256"] == shas[slug] and rows[slug]["path"] == "store"
        assert time.strptime(rows[slug]["loaded_at"], "%Y-%m-%dT%H:%M:%SZ")


def test_swap_under_16_concurrent_requests_fails_none(server, bank_root):
    """16 clients draw mixed keywords without pause while gimjang is retrained and the bank reloaded: every request
    succeeds, and each answer names the bank version and the exact adapter weights that drew it."""
    before = _keywords(server.url)["gimjang"]
    stop, statuses, answers, lock = threading.Event(), Counter(), [], threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            n = 0
            while not stop.is_set() or n < 2:
                prompt, _ = PROMPTS[(i + n) % len(PROMPTS)]
                r = http.post("/generate", json={"prompt": prompt, "seed": i * 100 + n, "steps": 2})
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        answers.append(r.json())
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    while sum(statuses.values()) < 16:  # the load is on
        time.sleep(0.2)
    new_sha = _retrain(bank_root, "gimjang", seed=777)
    reload = httpx.post(f"{server.url}/bank/reload", timeout=300)
    served_after = sum(statuses.values())
    time.sleep(3)  # the load goes on for a while on the new version
    stop.set()
    for t in threads:
        t.join(timeout=600)
    assert reload.status_code == 200, reload.text
    changes = reload.json()
    assert changes["changed"] == ["gimjang"] and changes["added"] == changes["removed"] == []
    assert dict(statuses) == {200: sum(statuses.values())}, statuses  # zero failed requests
    assert served_after > 16
    versions = {a["bank_version"] for a in answers}
    assert versions == {changes["version"] - 1, changes["version"]}, versions  # both versions served
    for a in answers:
        if a["adapter"] == "gimjang":
            assert a["adapter_sha256"] == (new_sha if a["bank_version"] == changes["version"] else before["sha256"])
    after = _keywords(server.url)["gimjang"]
    assert after["sha256"] == new_sha and after["loaded_at"] >= before["loaded_at"]
    unchanged = _keywords(server.url)["yakgwa"]
    assert unchanged["loaded_at"] <= before["loaded_at"]  # an unchanged adapter is not read again


def test_bad_entries_cost_only_themselves(server, bank_root, tmp_path):
    """A new index with a missing, a corrupt, a pickled, a traversing and a wrong-base adapter, beside a good change:
    the good one swaps in, each bad one is unavailable (or keeps its old version serving) with its reason."""
    from tipsen.io import sha256_file

    root = bank_root
    serving = _keywords(server.url)
    new_yakgwa = _retrain(root, "yakgwa", seed=901)
    _retrain(root, "kimbap", seed=902, base_model="other/base-model")  # trained on another base model
    _retrain(root, "songpyeon", seed=903)  # a new version, corrupted after indexing (below)
    index = _index(root / "bank.json")
    by_slug = {a["slug"]: a for a in index["adapters"]}
    songpyeon = root / by_slug["songpyeon"]["path"]
    data = bytearray(songpyeon.read_bytes())
    data[len(data) // 2] ^= 0xFF
    songpyeon.write_bytes(bytes(data))
    template = dict(by_slug["yakgwa"])

    def entry(slug: str, path: str, sha: str) -> dict:
        return {**template, "slug": slug, "path": path, "sha256": sha, "keyword": slug, "ko": slug}

    (root / "loras" / "sebae").mkdir()
    pickled = root / "loras" / "sebae" / "adapter.bin"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    outside = tmp_path / "pytorch_lora_weights.safetensors"
    shutil.copy2(root / by_slug["yakgwa"]["path"], outside)
    index["adapters"] += [
        entry("hanok", "loras/hanok/pytorch_lora_weights.safetensors", "0" * 64),  # missing
        entry("sebae", "loras/sebae/adapter.bin", sha256_file(pickled)),  # a pickle
        entry("charye", os.path.relpath(outside, root), sha256_file(outside)),  # ../ out of the bank
    ]
    (root / "bank.json").write_text(json.dumps(index), encoding="utf-8")

    answer = httpx.post(f"{server.url}/bank/reload", timeout=300)
    assert answer.status_code == 200, answer.text
    changes = answer.json()
    rows = _keywords(server.url)
    assert rows["yakgwa"]["sha256"] == new_yakgwa and "yakgwa" in changes["changed"]
    assert changes["unavailable"]["hanok"] == "file missing: pytorch_lora_weights.safetensors"
    assert changes["unavailable"]["sebae"] == "not a safetensors file: adapter.bin"
    assert "points outside" in changes["unavailable"]["charye"]
    # Corrupt and wrong-base replacements of serving adapters: the old version serves on, with the reason
    assert set(changes["kept"]) == {"songpyeon", "kimbap"}
    assert rows["songpyeon"]["available"] and rows["songpyeon"]["sha256"] == serving["songpyeon"]["sha256"]
    assert "checksum mismatch" in rows["songpyeon"]["reason"]
    assert rows["kimbap"]["available"] and rows["kimbap"]["sha256"] == serving["kimbap"]["sha256"]
    assert "trained on 'other/base-model'" in rows["kimbap"]["reason"]
    for slug in ("hanok", "sebae", "charye"):
        assert not rows[slug]["available"]
    drawn = httpx.post(f"{server.url}/generate", json={"prompt": "추석에 송편 빚기", "seed": 1}, timeout=300)
    assert drawn.status_code == 200 and drawn.json()["adapter_sha256"] == serving["songpyeon"]["sha256"]
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200


def test_a_reload_while_another_runs_is_409(server, bank_root, tmp_path):
    """The first reload is held reading the bank index from a FIFO (a slow disk, deterministically); the second is
    refused with 409, and the first then finishes. An adapter that is a FIFO is refused without blocking."""
    index = _index(bank_root / "bank.json")
    fifo = bank_root / "loras" / "hanbok" / "pytorch_lora_weights.safetensors"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    template = next(a for a in index["adapters"] if a["slug"] == "yakgwa")
    index["adapters"].append({**template, "slug": "hanbok", "path": "loras/hanbok/pytorch_lora_weights.safetensors",
                              "sha256": "1" * 64})
    saved = tmp_path / "bank.json"
    saved.write_text(json.dumps(index), encoding="utf-8")
    (bank_root / "bank.json").unlink()
    os.mkfifo(bank_root / "bank.json")
    first: dict = {}
    call = threading.Thread(target=lambda: first.update(r=httpx.post(f"{server.url}/bank/reload", timeout=300)))
    call.start()
    try:
        with open(bank_root / "bank.json", "w", encoding="utf-8") as writer:  # returns once the reload reads it
            second = httpx.post(f"{server.url}/bank/reload", timeout=60)
            writer.write(saved.read_text(encoding="utf-8"))
        call.join(timeout=300)
    finally:
        (bank_root / "bank.json").unlink()
        shutil.copy2(saved, bank_root / "bank.json")
    assert second.status_code == 409 and "already running" in second.json()["error"]
    assert first["r"].status_code == 200, first["r"].text
    assert first["r"].json()["unavailable"]["hanbok"] == "not a regular file: pytorch_lora_weights.safetensors"
    fifo.unlink()


def test_reload_without_a_key_answers_only_the_loopback(server):
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    url = server.url.replace("127.0.0.1", address)
    refused = httpx.post(f"{url}/bank/reload", timeout=60)
    assert refused.status_code == 403 and "loopback" in refused.json()["error"]
    assert httpx.get(f"{url}/keywords", timeout=60).status_code == 200  # the rest is open, as configured


def test_too_many_or_unknown_keywords_are_400(server):
    for body, field in [({"keywords": ["gimjang", "yakgwa", "kimbap"]}, "keywords: 3 keywords; allowed: at most 2"),
                        ({"keywords": ["gimjang", "nosuch"]}, "keywords"),
                        ({"keywords": ["gimjang"], "lora_scale": [0.5, 0.5]}, "lora_scale: 2 scales")]:
        r = httpx.post(f"{server.url}/generate", json={"prompt": "김장", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"].startswith(field.split(":")[0]), r.text
        assert field in r.json()["error"] or ":" not in field
