"""Every bad input the CLI meets is one line and a non-zero exit, never a traceback, and nothing half-written.

Each case runs `python -m tipsen.cli` in a child process, as a user's shell would, on the tiny models."""
from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tipsen.bank import SUMMARY_NAME, WEIGHTS_NAME
from tipsen.live import read_metric
from tipsen.testing import random_bank, write_curated, write_params

ROOT = Path(__file__).resolve().parent.parent
SLUG = "yakgwa"
TOO_LARGE = os.strerror(errno.EFBIG)


def _cli(*args: str, cwd: Path, max_file_bytes: int | None = None, env: dict | None = None,
         stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    def limit():
        # A full disk cannot be made without privileges; RLIMIT_FSIZE fails writes the same way: Python ignores
        # SIGXFSZ, so a write past the limit fails with OSError EFBIG, down the code path of ENOSPC.
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tipsen.cli", *args], cwd=cwd, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=600,
                          preexec_fn=limit if max_file_bytes else None)


def _error_line(r: subprocess.CompletedProcess, command: str, code: int) -> str:
    """The one error line of a failed run (logging may come before it), after checking the exit and no traceback."""
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tipsen {command}: error: "), r.stderr[-3000:]
    return last.removeprefix(f"tipsen {command}: error: ")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def work(tmp_path_factory, registry) -> Path:
    """A params file (2 training steps, no validation grid), one curated keyword, a raw export and a bank."""
    from tipsen.demodata import demo_data

    root = tmp_path_factory.mktemp("faults")
    write_params(root / "params.yaml", {"train": dict(steps=2, checkpoint_every=1000, log_every=1,
                                                      validation_seeds=[])}, keywords=[SLUG, "gimjang"])
    write_curated(root / "curated", SLUG, n=2, heldout=0, registry=registry)
    demo_data(root / "raw", registry=registry, per_keyword=2)
    random_bank(root / "bank", ["gimjang", SLUG], registry=registry)  # builds tiny:sdxl first, if it is missing
    return root


# ---------------------------------------------------------------- the params file


@pytest.mark.parametrize("case", ["binary", "folder", "syntax", "not a mapping", "key twice", "keyword twice"])
def test_a_bad_params_file_is_one_line_naming_the_file(case, tmp_path):
    path = tmp_path / "params.yaml"
    if case == "binary":
        path.write_bytes(b"profile: demo\n\x89PNG\r\n\x1a\n\x00\xff\xfe")
    elif case == "folder":
        path.mkdir()
    elif case == "syntax":
        path.write_text("profile: demo\nprofiles:\n  demo: {\n  train: [\n", encoding="utf-8")
    elif case == "not a mapping":
        path.write_text("- demo\n- paper\n", encoding="utf-8")
    elif case == "key twice":  # PyYAML alone keeps the second `train:` and drops the first without a word
        path.write_text("profile: demo\nkeywords: [gimjang]\nprofiles:\n  demo:\n    train: {steps: 3}\n"
                        "    generate: {}\n    train: {steps: 4}\n", encoding="utf-8")
    else:
        write_params(path, keywords=["gimjang", SLUG, "gimjang"])
    r = _cli("config", "--params", str(path), cwd=tmp_path)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    expected = {
        "binary": f"{path}: not a UTF-8 YAML file (invalid start byte at byte 14)",
        "folder": f"{path}: is a folder; --params needs a params file (YAML)",
        "syntax": f"{path}: line 5, column 1: not valid YAML: expected the node content, but found '<stream end>'",
        "not a mapping": f"{path}: expected a mapping with 'profile' and 'profiles', got a list",
        "key twice": f"{path}: line 7, column 5: not valid YAML: key 'train' is given twice in one mapping "
                     "(first at line 5)",
        "keyword twice": f"{path}: keywords: listed twice: gimjang (got ['gimjang', 'yakgwa', 'gimjang'])",
    }[case]
    assert _error_line(r, "config", 2) == expected


def test_a_merge_key_override_is_not_a_key_given_twice(tmp_path):
    from tipsen.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("profile: demo\nkeywords: [gimjang]\nprofiles:\n  base: &base\n    train: {steps: 3}\n"
                    "  demo:\n    <<: *base\n    train: {steps: 4}\n", encoding="utf-8")
    assert load_params(path).train.steps == 4  # YAML's own override, meant as written


# ---------------------------------------------------------------- outputs that cannot be written


def test_curate_into_a_path_under_a_file_is_one_line_and_creates_nothing(work, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    r = _cli("curate", "--params", str(work / "params.yaml"), "--raw", str(work / "raw"), "--out",
             str(blocker / "curated"), "--metrics", str(tmp_path / "metrics"), "--no-relevance", "--no-progress",
             cwd=tmp_path)
    assert _error_line(r, "curate", 1) == f"{blocker}: is a file, where a folder is needed"
    assert _names(tmp_path) == ["afile"] and blocker.read_text() == "not a folder"


def test_demo_data_into_a_file_is_refused_and_the_file_kept(tmp_path):
    # Needs publish_dir (tipsen/io.py) to refuse a final path that is not a folder; before that the file is lost.
    kept = tmp_path / "notes.txt"
    kept.write_text("a user's file, not an export")
    r = _cli("demo-data", str(kept), "--per-keyword", "2", cwd=tmp_path)
    assert _error_line(r, "demo-data", 2) and len(r.stderr.strip().splitlines()) == 1
    assert _names(tmp_path) == ["notes.txt"] and kept.read_text() == "a user's file, not an export"


# ---------------------------------------------------------------- a full disk


def test_curate_on_a_full_disk_keeps_the_previous_dataset(work, tmp_path):
    out = tmp_path / "curated"
    out.mkdir()
    (out / "previous.txt").write_text("the previous dataset")
    r = _cli("curate", "--params", str(work / "params.yaml"), "--raw", str(work / "raw"), "--out", str(out),
             "--metrics", str(tmp_path / "metrics"), "--no-relevance", "--no-progress", cwd=tmp_path,
             max_file_bytes=1024)  # under one 64 px PNG
    assert "items in" in r.stderr  # it failed writing the dataset, not before
    assert _error_line(r, "curate", 1) == TOO_LARGE
    assert _names(tmp_path) == ["curated"] and _names(out) == ["previous.txt"]  # no .curated.tmp-*, no metrics


def test_bank_build_on_a_full_disk_keeps_the_previous_index(work, tmp_path):
    shutil.copytree(work / "bank", tmp_path / "bank")
    index = tmp_path / "bank" / "bank.json"
    before = index.read_bytes()
    assert len(before) > 512
    r = _cli("bank", "build", "--params", str(work / "params.yaml"), "--loras", str(tmp_path / "bank" / "loras"),
             "--out", str(index), cwd=tmp_path, max_file_bytes=512)
    assert _error_line(r, "bank", 1) == TOO_LARGE
    assert index.read_bytes() == before and _names(tmp_path / "bank") == ["bank.json", "loras"]


def test_generate_on_a_full_disk_keeps_the_previous_picture(work, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"the previous picture")
    r = _cli("generate", "김장", "--params", str(work / "params.yaml"), "--bank", str(work / "bank" / "bank.json"),
             "--steps", "2", "--seed", "1", "--out", str(out), cwd=tmp_path, max_file_bytes=2048)
    assert "generator ready" in r.stderr  # the model loaded: the PNG's write is what failed
    assert _error_line(r, "generate", 1) == TOO_LARGE and r.stdout == ""
    assert out.read_bytes() == b"the previous picture" and _names(tmp_path) == ["out.png"]  # no .out.png.tmp-*


@pytest.mark.slow  # subprocess training
def test_train_on_a_full_disk_keeps_the_previous_adapter(work, tmp_path):
    out = tmp_path / "models" / "loras" / SLUG
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("the previous adapter")
    # 256 KiB: over every latent cache file, under the adapter (about 1 MB), which safetensors' Rust writer writes.
    r = _cli("train", SLUG, "--params", str(work / "params.yaml"), "--data", str(work / "curated"), "--out", str(out),
             "--metrics", str(tmp_path / "metrics"), "--no-progress", cwd=tmp_path, max_file_bytes=256 * 1024)
    assert "step 2 loss" in r.stderr  # trained: the adapter's write is what failed
    assert _error_line(r, "train", 1) == TOO_LARGE
    assert _names(out.parent) == [SLUG] and _names(out) == ["previous.txt"]  # no .yakgwa.tmp-*
    # the training log is a log, written as the steps run: it shows the failed run, and the next run rewrites it
    assert [step for step, _ in read_metric(tmp_path / "metrics" / "train" / SLUG, "loss")][-1] >= 2
    assert _names(tmp_path / "models" / ".checkpoints") == [f"{SLUG}.lock"]


# ---------------------------------------------------------------- the rest


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("argv", [["bank", "show"], ["--help"]])
def test_a_reader_that_left_is_not_an_error(work, tmp_path, argv, buffered):
    # `tipsen bank show | head -1` where head has already exited: a pipe with no reader.
    read, write = os.pipe()
    os.close(read)
    extra = ["--params", str(work / "params.yaml"), "--out", str(work / "bank" / "bank.json")] if argv[0] == "bank" \
        else []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a user's shell: stdout is buffered
    try:
        r = subprocess.run([sys.executable, "-m", "tipsen.cli", *argv, *extra], cwd=tmp_path, stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=300,
                           env={**env, "PYTHONPATH": str(ROOT), **({} if buffered else {"PYTHONUNBUFFERED": "1"})})
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (0, "")


def test_generate_out_ending_in_a_slash_is_refused_before_loading(work, tmp_path, capsys):
    from tipsen.cli import main

    folder = tmp_path / "pictures"  # not there yet: the '/' says it is meant as a folder
    code = main(["generate", "김장", "--params", str(work / "params.yaml"), "--bank", str(work / "bank" / "bank.json"),
                 "--steps", "2", "--out", f"{folder}/"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"tipsen generate: error: --out {folder}/: is a folder; give the PNG's file name"
    assert _names(tmp_path) == []  # before: a PNG named `pictures`


@pytest.mark.parametrize("damage", ["pickle", "summary"])
def test_bank_build_names_an_adapter_that_is_not_safetensors(damage, work, tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from tipsen.cli import main

    shutil.copytree(work / "bank", tmp_path / "bank")
    loras, index = tmp_path / "bank" / "loras", tmp_path / "bank" / "bank.json"
    before = index.read_bytes()
    if damage == "pickle":  # a real, loadable pickle of the same weights, under the safetensors name
        torch.save(load_file(loras / SLUG / WEIGHTS_NAME), loras / SLUG / WEIGHTS_NAME)
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))  # never unpickled
    else:
        (loras / SLUG / SUMMARY_NAME).write_text("{not json")
    code = main(["bank", "build", "--params", str(work / "params.yaml"), "--loras", str(loras), "--out", str(index)])
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"pickle": f"{SLUG}/{WEIGHTS_NAME} is not a safetensors file (Error while deserializing header: "
                          "header too large)",
                "summary": f"{SLUG}/{SUMMARY_NAME} is not valid JSON (Expecting property name enclosed in double "
                           "quotes)"}[damage]
    assert code == 2 and err[-1] == f"tipsen bank: error: --loras {loras}: {expected}; retrain the keyword or " \
                                    "remove the file"
    assert index.read_bytes() == before


def test_serve_on_a_busy_port_is_one_line(work):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _cli("serve", "--params", str(work / "params.yaml"), "--bank", str(work / "bank" / "bank.json"),
                 "--port", str(port), cwd=work)
    assert _error_line(r, "serve", 2) == (f"--port: port {port} is in use on 127.0.0.1; stop what listens there, "
                                          "or choose another with --port")
    r = _cli("serve", "--params", str(work / "params.yaml"), "--host", "192.0.2.1", cwd=work)  # TEST-NET-1
    assert _error_line(r, "serve", 2) == "--host: 192.0.2.1 is not an address of this machine"


def test_the_resolved_config_and_expected_library_warnings_only_with_verbose(work, tmp_path):
    """The resolved config shows only with -v. A bank of two UNet-only adapters loads through the bank store, so
    diffusers' "no LoRA keys for the text encoders" and peft's "already found a peft_config" never appear (they
    did, twice per adapter, when peft loaded the bank)."""
    args = ("generate", "a quiet sea", "--params", str(work / "params.yaml"), "--bank",
            str(work / "bank" / "bank.json"), "--steps", "1")
    quiet = _cli(*args, "--out", str(tmp_path / "a.png"), cwd=work)
    loud = _cli(*args, "--out", str(tmp_path / "b.png"), "-v", cwd=work)
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr[-2000:], loud.stderr[-2000:])
    assert "resolved config" not in quiet.stderr and "resolved config" in loud.stderr
    for noise in ("No LoRA keys associated to", "Already found a `peft_config`"):
        assert noise not in quiet.stderr and noise not in loud.stderr, noise
    assert "generator ready" in quiet.stderr  # our own progress still shows
