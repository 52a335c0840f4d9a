"""The bank index as an attacker or a typo would leave it: one bad entry costs only its own keyword."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tipsen.bank import WEIGHTS_NAME, Bank, build_bank
from tipsen.errors import ConfigError
from tipsen.io import sha256_file, write_json_atomic
from tipsen.testing import random_bank

ROOT = Path(__file__).resolve().parent.parent
SLUGS = ["gimjang", "yakgwa", "hanok"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, registry) -> Path:
    return random_bank(tmp_path_factory.mktemp("bank"), SLUGS, registry=registry).parent


def _index(root: Path) -> dict:
    return json.loads((root / "bank.json").read_text(encoding="utf-8"))


def _with(root: Path, tmp_path: Path, change) -> Path:
    """A copy of the bank whose index is `change`d; returns the index path."""
    import shutil

    shutil.copytree(root, tmp_path / "b")
    index = _index(tmp_path / "b")
    change(index, tmp_path / "b")
    write_json_atomic(tmp_path / "b" / "bank.json", index)
    return tmp_path / "b" / "bank.json"


def _entry(index: dict, slug: str) -> dict:
    return next(e for e in index["adapters"] if isinstance(e, dict) and e.get("slug") == slug)


def _outside(index, root):
    os.symlink("/etc", root / "loras" / "link")
    _entry(index, "yakgwa")["path"] = "loras/link/passwd"  # a symlink out of the folder


FAULTS = {
    "missing key": (lambda i, r: _entry(i, "yakgwa").pop("sha256"), "yakgwa", "sha256: Field required"),
    "wrong type": (lambda i, r: _entry(i, "yakgwa").update(rank="twenty"), "yakgwa", "rank: Input should be"),
    "null entry": (lambda i, r: i["adapters"].insert(0, None), "adapters[0]", "must be an object"),
    "NUL byte": (lambda i, r: _entry(i, "yakgwa").update(path="loras/yakgwa/\x00x"), "yakgwa", "path: String"),
    "traversal": (lambda i, r: _entry(i, "yakgwa").update(path="../../etc/passwd"), "yakgwa", "points outside"),
    "absolute": (lambda i, r: _entry(i, "yakgwa").update(path="/etc/passwd"), "yakgwa", "points outside"),
    "symlink out": (_outside, "yakgwa", "points outside"),
    "twice": (lambda i, r: i["adapters"].append(dict(_entry(i, "yakgwa"))), "yakgwa", "listed twice"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_entry_costs_only_its_own_keyword(fault, built, tmp_path):
    change, name, reason = FAULTS[fault]
    bank = Bank(_with(built, tmp_path, change))
    assert reason in bank.invalid[name] and name not in bank.entries
    assert {"gimjang", "hanok"} <= set(bank.entries) and bank.verify("gimjang") is None
    assert reason in bank.reason(name)


def test_the_generator_reports_refused_and_nonfinite_adapters_and_serves_the_rest(built, tmp_path, demo_params,
                                                                                   registry):
    import torch
    from safetensors.torch import load_file, save_file

    from tipsen.generate import Generator

    def poison(index, root):
        _entry(index, "yakgwa")["path"] = "../../etc/passwd"
        weights = root / "loras" / "hanok" / WEIGHTS_NAME  # every number NaN, checksum updated to match
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, str(weights))
        _entry(index, "hanok")["sha256"] = sha256_file(weights)

    gen = Generator(demo_params, bank=_with(built, tmp_path, poison), registry=registry)
    adapters = gen.status()["adapters"]
    assert adapters["gimjang"]["available"] and gen.available == ["gimjang"]
    assert adapters["yakgwa"]["reason"].startswith("refused by the index: path '../../etc/passwd' points outside")
    assert adapters["hanok"]["reason"].startswith("non-finite values in ")
    assert adapters["yakgwa"]["keyword"] == "Yakgwa"  # named from the registry: the entry itself was refused
    with pytest.raises(ConfigError, match=r"keyword: 'hanok' is unavailable \(non-finite"):
        gen.resolve({"prompt": "x", "keyword": "hanok"})


def test_an_index_that_is_not_json_leaves_the_base_model(built, tmp_path, demo_params, registry):
    from tipsen.generate import Generator

    bad = tmp_path / "bank.json"
    bad.write_bytes(b"\x00\xff{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Bank(bad)
    gen = Generator(demo_params, bank=bad, registry=registry)
    assert gen.status()["adapters"] == {} and "is not valid JSON" in gen.status()["bank"]["error"]


def test_build_refuses_a_missing_folder_and_never_empties_a_served_bank(built, tmp_path, registry):
    index = built / "bank.json"
    before = index.read_bytes()
    with pytest.raises(ConfigError, match=r"--loras .*: not a folder of trained adapters"):
        build_bank(built / "lroas", index, keywords=SLUGS, registry=registry, base_model="tiny:sdxl")
    (built / "empty").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=r"has adapters and is kept \(pass --allow-empty"):
        build_bank(built / "empty", index, keywords=SLUGS, registry=registry, base_model="tiny:sdxl")
    assert index.read_bytes() == before
    fresh = build_bank(built / "empty", built / "new.json", keywords=SLUGS, registry=registry, base_model="tiny:sdxl")
    assert fresh["adapters"] == [] and fresh["missing"] == SLUGS  # a new, empty index is allowed
    copy = tmp_path / "copy.json"
    copy.write_bytes(before)
    with pytest.raises(ConfigError, match="must be inside the index's folder"):
        build_bank(built / "loras", copy, keywords=SLUGS, registry=registry, base_model="tiny:sdxl")


def test_bank_cli_typo_is_one_line_and_allow_empty_is_explicit(built, tmp_path):
    import shutil

    shutil.copytree(built, tmp_path / "m")
    (tmp_path / "m" / "none").mkdir()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tipsen.cli", "bank", *args, "--params", str(ROOT / "params.yaml"),
                               "--profile", "demo", "--out", str(tmp_path / "m" / "bank.json")],
                              capture_output=True, text=True, timeout=300)

    r = cli("build", "--loras", str(tmp_path / "m" / "lroas"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"tipsen bank: error: --loras {tmp_path / 'm' / 'lroas'}: not a folder "
                                             "of trained adapters"]
    assert _index(tmp_path / "m")["adapters"]
    assert cli("build", "--loras", str(tmp_path / "m" / "none")).returncode == 2
    assert cli("build", "--loras", str(tmp_path / "m" / "none"), "--allow-empty").returncode == 0
    assert _index(tmp_path / "m")["adapters"] == []
    index = _index(tmp_path / "m")
    index["adapters"] = [None, {"slug": "gimjang"}]
    write_json_atomic(tmp_path / "m" / "bank.json", index)
    shown = cli("show")
    assert shown.returncode == 0 and "Traceback" not in shown.stderr
    assert "adapters[0]\t-\t-\trefused: an entry must be an object" in shown.stdout
    assert "gimjang\t-\t-\trefused: bad entry: keyword: Field required" in shown.stdout
