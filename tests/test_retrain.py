"""The retraining policy without Prefect: change detection, adapter currency, the gate, the bank swap, lineage."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tipsen import retrain
from tipsen.bank import WEIGHTS_NAME, Bank, build_bank
from tipsen.errors import ConfigError
from tipsen.io import sha256_file
from tipsen.live import read_metric
from tipsen.testing import write_curated


def adapter(folder: Path, value: float, **meta: str) -> Path:
    """A real safetensors adapter file (a LoRA-shaped tensor and tipsen.* metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"unet.down.lora_A.weight": torch.full((4, 8), value)}, str(folder / WEIGHTS_NAME),
              metadata={"tipsen.rank": "4", "tipsen.alpha": "4", **{f"tipsen.{k}": v for k, v in meta.items()}})
    return folder / WEIGHTS_NAME


@pytest.fixture()
def live(tmp_path, registry):
    """models/{loras/gimjang, loras/sebae, bank.json} and candidates for both."""
    models = tmp_path / "models"
    for slug, v in (("gimjang", 1.0), ("sebae", 2.0)):
        adapter(models / "loras" / slug, v)
        adapter(models / "candidates" / slug, v + 10)
    build_bank(models / "loras", models / "bank.json", keywords=["gimjang", "sebae"], registry=registry,
               base_model="tiny:sdxl")
    return models


def run_promote(models: Path, decisions, registry, **kw) -> dict:
    return retrain.promote(decisions, candidates=models / "candidates", loras=models / "loras",
                           bank=models / "bank.json", keywords=["gimjang", "sebae"], registry=registry,
                           base_model="tiny:sdxl", **kw)


# ---------------------------------------------------------------- the gate


def test_gate_promotes_within_the_margin_and_refuses_beyond_it():
    assert retrain.decide("gimjang", 0.50, 0.50, 0.0).promote  # equal is not worse
    assert retrain.decide("gimjang", 0.495, 0.50, 0.01).promote
    refused = retrain.decide("gimjang", 0.48, 0.50, 0.01)
    assert not refused.promote and "worse than the margin 0.01" in refused.reason
    assert not retrain.decide("gimjang", 0.49, 0.50, 0.0).promote  # a margin of 0 forbids any drop
    first = retrain.decide("gimjang", 0.10, None, 0.0)
    assert first.promote and first.reason == "no current adapter"
    assert not retrain.decide("gimjang", float("nan"), 0.50, 1.0).promote  # a broken score never wins


def test_a_broken_live_adapter_loses_to_its_candidate(live, registry):
    weights = live / "loras" / "gimjang" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8])  # the live file no longer matches the index
    bank, curated = live / "bank.json", live / "curated"
    problem = retrain.unusable(bank, "gimjang")
    assert problem == "checksum mismatch" and retrain.score_key(bank, curated, "gimjang") is None
    assert retrain.unusable(bank, "sebae") is None and retrain.score_key(bank, curated, "sebae")
    decision = retrain.decide("gimjang", 0.30, None, 0.0, live_problem=problem)
    assert decision.promote and "current adapter cannot be used (checksum mismatch)" in decision.reason
    (live / "loras" / "sebae" / WEIGHTS_NAME).unlink()
    assert retrain.unusable(bank, "sebae") == f"file missing: {WEIGHTS_NAME}"
    result = run_promote(live, [decision], registry)
    assert result["promoted"] == ["gimjang"] and retrain.unusable(bank, "gimjang") is None  # replaced, and sound


def test_promote_installs_the_winner_and_swaps_the_bank_in_one_rename(live, registry, tmp_path, monkeypatch):
    old_bank = json.loads((live / "bank.json").read_text())
    candidate = sha256_file(live / "candidates" / "gimjang" / WEIGHTS_NAME)
    kept = sha256_file(live / "loras" / "sebae" / WEIGHTS_NAME)
    curve = tmp_path / "cand-metrics" / "train" / "gimjang" / "plots" / "metrics" / "loss.tsv"  # a dvclive log
    curve.parent.mkdir(parents=True)
    curve.write_text("step\tloss\n1\t0.5\n")
    (tmp_path / "metrics" / "train" / "gimjang").mkdir(parents=True)
    (tmp_path / "metrics" / "train" / "gimjang" / "metrics.json").write_text("{}")  # the old adapter's log
    reader = open(live / "bank.json", encoding="utf-8")  # a service holding the old index open
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(Path(dst).name), real_replace(src, dst))[1])
    decisions = [retrain.decide("gimjang", 0.6, 0.5, 0.01), retrain.decide("sebae", 0.3, 0.5, 0.01)]
    out = run_promote(live, decisions, registry, candidate_metrics=tmp_path / "cand-metrics",
                      metrics=tmp_path / "metrics")

    assert out["promoted"] == ["gimjang"] and list(out["refused"]) == ["sebae"]
    assert renames.count("bank.json") == 1  # the index changes in exactly one rename
    assert json.load(reader) == old_bank  # the old index stays whole for whoever had it open
    reader.close()
    bank = Bank(live / "bank.json")
    assert bank.entries["gimjang"].sha256 == candidate and bank.entries["sebae"].sha256 == kept
    assert bank.verify("gimjang") is None and bank.verify("sebae") is None
    assert not (live / "candidates" / "gimjang").exists()  # installed
    assert (live / "candidates" / "sebae" / WEIGHTS_NAME).is_file()  # refused: kept for inspection
    assert read_metric(tmp_path / "metrics" / "train" / "gimjang", "loss") == [(1, 0.5)]  # the log came along
    assert not (tmp_path / "metrics" / "train" / "gimjang" / "metrics.json").exists()  # whole: the old one is gone
    assert not (tmp_path / "cand-metrics" / "train" / "gimjang").exists()
    assert sorted(p.name for p in live.iterdir()) == ["bank.json", "candidates", "loras", "promotions.jsonl"]
    history = [json.loads(line) for line in (live / "promotions.jsonl").read_text().splitlines()]
    assert [(h["slug"], h["promote"]) for h in history] == [("gimjang", True), ("sebae", False)]
    assert "worse than" in history[1]["reason"]


def test_refusing_every_candidate_leaves_the_bank_untouched(live, registry):
    before = (live / "bank.json").stat()
    content = (live / "bank.json").read_bytes()
    out = run_promote(live, [retrain.decide("gimjang", 0.1, 0.5, 0.0)], registry)
    assert out["promoted"] == [] and out["refused"]["gimjang"].endswith("worse than the margin 0.0")
    after = (live / "bank.json").stat()
    assert (live / "bank.json").read_bytes() == content and after.st_ino == before.st_ino
    assert (live / "promotions.jsonl").read_text().count("\n") == 1


# ---------------------------------------------------------------- what changed


def test_raw_digests_change_only_for_the_keyword_whose_items_changed(raw_copy, registry):
    before = retrain.raw_digests(raw_copy, registry)
    assert {"gimjang", "sebae"} <= before.keys() and "pyramid" not in before  # unknown keywords are ignored
    assert retrain.raw_digests(raw_copy, registry) == before  # deterministic

    items = raw_copy / "items.jsonl"
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    first = next(r for r in rows if r["keyword"] == "gimjang")
    shutil.copy2(raw_copy / first["image"], raw_copy / "images" / "gimjang" / "new.png")
    with open(items, "a", encoding="utf-8") as f:
        new = {"id": "new-1", "keyword": "김장", "image": "images/gimjang/new.png", "text": "사진"}  # Korean alias
        f.write(json.dumps(new, ensure_ascii=False) + "\n")
        f.write(json.dumps({"id": "new-2", "keyword": "pyramid", "image": "images/gimjang/new.png"}) + "\n")
        f.write(json.dumps({"id": "new-3", "keyword": "sebae", "image": "../../outside.png"}) + "\n")
        f.write("not json\n")
    added = retrain.raw_digests(raw_copy, registry)
    assert retrain.changed(added, before) == ["gimjang", "sebae"]  # sebae: an item added (its path is not read)

    sebae = next(r for r in rows if r["keyword"] == "sebae")
    Image.new("RGB", (200, 200), "red").save(raw_copy / sebae["image"], format="PNG")  # same record, new bytes
    assert retrain.changed(retrain.raw_digests(raw_copy, registry), added) == ["sebae"]
    assert retrain.changed({"a": "1"}, {"a": "1", "b": "2"}) == ["b"]  # removed entirely


def test_state_round_trip_and_a_corrupt_state_file(tmp_path, caplog):
    path = tmp_path / "models" / ".retrain_state.json"
    assert retrain.load_state(path) == {"raw": {}, "curated": {}}
    retrain.save_state(path, {"raw": {"gimjang": "r"}, "curated": {"gimjang": "c"}})
    assert retrain.load_state(path) == {"raw": {"gimjang": "r"}, "curated": {"gimjang": "c"}}
    path.write_text("{truncated")
    with caplog.at_level(logging.WARNING):
        assert retrain.load_state(path) == {"raw": {}, "curated": {}}
    assert "treating every keyword as changed" in caplog.text


def test_folder_digest_sees_names_and_bytes(tmp_path):
    assert retrain.folder_digest(tmp_path / "missing") is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"1")
    first = retrain.folder_digest(tmp_path / "d")
    (tmp_path / "d" / "a.png").write_bytes(b"2")
    second = retrain.folder_digest(tmp_path / "d")
    (tmp_path / "d" / "a.png").rename(tmp_path / "d" / "b.png")
    assert len({first, second, retrain.folder_digest(tmp_path / "d")}) == 3


def test_adapter_status_compares_the_recorded_data_and_params_hashes(tmp_path, demo_params):
    from tipsen import train_data as td
    from tipsen.train import params_hash

    data, r = tmp_path / "curated", demo_params.train.resolution
    write_curated(data, "gimjang", n=3, heldout=0, res=r)
    examples = td.load_examples(data, "gimjang", resolution=r)
    out = tmp_path / "loras" / "gimjang"
    assert retrain.adapter_status(demo_params, "gimjang", data, out) == "no adapter"
    adapter(out, 1.0, params_hash=params_hash(demo_params), dataset_hash=td.dataset_hash(examples))
    assert retrain.adapter_status(demo_params, "gimjang", data, out) is None
    more = demo_params.override("train", {"steps": 31})
    assert retrain.adapter_status(more, "gimjang", data, out) == "train params or base model changed"
    for change in ({"checkpoint_every": 7}, {"log_every": 3}, {"validation_seeds": []}):  # weights unchanged
        assert retrain.adapter_status(demo_params.override("train", change), "gimjang", data, out) is None, change
    Image.new("RGB", (r, r), "white").save(data / "gimjang" / "001.png")
    assert retrain.adapter_status(demo_params, "gimjang", data, out) == "data changed"
    with pytest.raises(ConfigError, match="metadata.jsonl not found"):
        retrain.adapter_status(demo_params, "sebae", data, tmp_path / "loras" / "sebae")


# ---------------------------------------------------------------- lineage


def test_record_lineage_commits_what_was_written_and_reruns_what_follows(tmp_path):
    """A toy DVC pipeline (shell stages): outputs rewritten by hand, as a flow would, then recorded."""
    repo = tmp_path / "repo"
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "a.txt").write_text("a\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  curate: {cmd: mkdir -p data/curated && cp data/raw/a.txt data/curated/a.txt, deps: [data/raw],"
        " outs: [data/curated]}\n"
        "  bank: {cmd: cat data/curated/a.txt > bank.json, deps: [data/curated], outs: [bank.json]}\n"
        "  evaluate: {cmd: wc -c bank.json > eval.txt, deps: [bank.json], outs: [eval.txt]}\n")

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True,
                              text=True).stdout

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    dvc("add", "-q", "data/raw")
    dvc("repro", "-q")
    (repo / "data" / "raw" / "a.txt").write_text("a\nb\n")  # new raw data, then what the flow would write
    (repo / "data" / "curated" / "a.txt").write_text("a\nb\n")
    (repo / "bank.json").write_text("a\nb\n")

    out = retrain.record_lineage(repo, [repo / "data" / "raw", repo / "data" / "curated", repo / "bank.json",
                                        tmp_path / "elsewhere"], downstream_of=repo / "bank.json")
    assert out["committed"] == ["bank", "curate", "data/raw.dvc"]
    assert out["untracked"] == [str(tmp_path / "elsewhere")]
    assert (repo / "eval.txt").read_text().split()[0] == "4"  # the downstream stage reran on the new bank
    assert out["dvc_status"] == {} and json.loads(dvc("status", "--json")) == {}
