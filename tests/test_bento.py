"""The Bento: what `bentoml build` packs and refuses, and how a built Bento serves its packed models.

Real `bentoml build` subprocesses with BENTOML_HOME in tmp_path, from a temporary copy of the project where a test
needs another params.yaml or bank. The Hugging Face Hub is outside the project and unreachable here: a real HTTP
server on 127.0.0.1 serves tiny repositories in the Hub's layout under the paper profile's ids (tiny:sdxl and
tiny:llm saved with save_pretrained, plus files no loader may take), and HF_ENDPOINT points at it in the
subprocesses that need it, with HF_HUB_OFFLINE unset there only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tipsen.testing import Hub, Server, free_port, random_bank, write_params

pytestmark = pytest.mark.slow  # bentoml build subprocesses; one test serves a built Bento

ROOT = Path(__file__).resolve().parent.parent
BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # the paper profile's models.base and models.llm
LLM = "meta-llama/Meta-Llama-3-8B-Instruct"
UNET = "unet/diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------- a Hub on 127.0.0.1


def repo_files(folder: Path, extra: dict[str, bytes]) -> dict[str, bytes]:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {**files, **extra}


@pytest.fixture(scope="module")
def hub():
    """tiny:sdxl under the SDXL id and tiny:llm under the Llama 3 id, each with the files real repositories also
    hold and no loader here may take: pickles, fp16 variants, single-file checkpoints, other frameworks' weights."""
    from tipsen.models import resolve_ref

    sdxl, llm = Path(resolve_ref("tiny:sdxl")), Path(resolve_ref("tiny:llm"))
    pickle = b"\x80\x04K\x01."  # a pickle's bytes: it must never be fetched, let alone loaded
    hub = Hub({
        BASE: repo_files(sdxl, {
            "unet/diffusion_pytorch_model.bin": pickle,
            "unet/diffusion_pytorch_model.fp16.safetensors": (sdxl / UNET).read_bytes(),
            "sd_xl_base_1.0.safetensors": (sdxl / UNET).read_bytes(),  # the repository's single-file checkpoint
            "text_encoder/flax_model.msgpack": b"\x80",
            "vae/diffusion_pytorch_model.ckpt": pickle,
            "README.md": b"# SDXL\n",
        }),
        LLM: repo_files(llm, {
            "original/consolidated.00.pth": pickle,
            "pytorch_model.bin": pickle,
            "README.md": b"# Llama 3\n",
        }),
    })
    yield hub
    hub.close()


# ---------------------------------------------------------------- building


def project_copy(tmp: Path) -> Path:
    """The files `bentoml build` reads, copied: a test may change params.yaml or the bank without touching ours."""
    tree = tmp / "project"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("tipsen", "service"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("bentofile.yaml", "params.yaml", "data/keywords.yaml"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    return tree


def build_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TIPSEN_PROFILE", "TIPSEN_PARAMS", "TIPSEN_BANK")}
    return {**env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **extra}


def bentoml_build(ctx: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bentoml", "build", str(ctx), "--output", "tag"], cwd=ctx, env=env,
                          capture_output=True, text=True, timeout=600)


def built(home: Path) -> list[Path]:
    return sorted((home / "bentos" / "tipsen").glob("*/bento.yaml"))


def test_bentoml_build(tmp_path):
    env = build_env(tmp_path / "bentoml")
    r = bentoml_build(ROOT, env)
    assert r.returncode == 0, r.stdout + r.stderr
    bentos = list((tmp_path / "bentoml" / "bentos" / "tipsen").glob("*/src"))
    assert len(bentos) == 1
    src = bentos[0]
    for need in ("service/service.py", "service/middleware.py", "service/static/index.html", "tipsen/generate.py",
                 "params.yaml", "data/keywords.yaml"):
        assert (src / need).is_file(), need
    assert not (src / "tests").exists() and not (src / "data" / "raw").exists()
    installed = (src.parent / "env" / "python" / "requirements.txt").read_text(encoding="utf-8")
    assert "torch==2.14.1" in installed.splitlines() and "bentoml==1.4.40" in installed.splitlines()  # the lock
    bento = yaml.safe_load((src.parent / "bento.yaml").read_text())
    assert bento["service"] == "service.service:Tipsen" and bento["name"] == "tipsen"
    assert r.stdout.strip().endswith(f"tipsen:{src.parent.name}")
    # Built offline for the demo profile: it serves that profile, and its tiny models are never packed.
    envs = {e["name"]: e["value"] for e in bento["envs"]}
    assert envs["TIPSEN_PROFILE"] == "demo"
    assert bento["models"] == [] and bento["services"][0]["models"] == []
    assert bento["services"][0]["config"]["resources"] == {"cpu": "2"}  # the demo profile's, as it serves
    shutil.rmtree(tmp_path / "bentoml", ignore_errors=True)


def test_a_bank_for_another_base_model_is_refused(tmp_path):
    tree = project_copy(tmp_path)
    index = random_bank(tree / "models", ["gimjang"])  # trained on tiny:sdxl, the demo profile's base
    home = tmp_path / "bentoml"
    ok = bentoml_build(tree, build_env(home))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(built(home)) == 1

    # The paper profile serves SDXL: the same bank is refused before anything asks the Hub.
    write_params(tree / "params.yaml", profile="paper")
    refused = bentoml_build(tree, build_env(home, HF_HUB_OFFLINE="1"))
    assert refused.returncode != 0
    lines = (refused.stdout + refused.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback
    assert "'tiny:sdxl'" in lines[0] and f"'{BASE}'" in lines[0] and "profile 'paper'" in lines[0], lines[0]
    assert len(built(home)) == 1  # no Bento was stored

    # One adapter trained on another base is enough, even under an index that names the right one.
    bank = json.loads(index.read_text(encoding="utf-8"))
    bank["base_model"] = BASE
    bank["adapters"][0]["base_model"] = "tiny:sdxl"
    index.write_text(json.dumps(bank), encoding="utf-8")
    refused = bentoml_build(tree, build_env(home, HF_HUB_OFFLINE="1"))
    assert refused.returncode != 0 and "'tiny:sdxl'" in refused.stderr, refused.stdout + refused.stderr
    assert len(built(home)) == 1


# ---------------------------------------------------------------- packing, then serving the packed models


def containerize_models(home: Path, tag: str, out: Path, env: dict[str, str]) -> str:
    """What `bentoml containerize` does before docker runs: BentoML's construct_containerfile copies the Bento and
    fetches each Hugging Face model into its hf-models/ folder. Docker is not here; the folder is kept in `out`
    and the Dockerfile returned."""
    script = (
        "import shutil, sys, bentoml\n"
        "from bentoml._internal.container import construct_containerfile\n"
        "with construct_containerfile(bentoml.get(sys.argv[1])) as (ctx, dockerfile):\n"
        "    shutil.copytree(ctx + '/hf-models', sys.argv[2], symlinks=True)\n"
        "    print(open(dockerfile).read())\n"
    )
    r = subprocess.run([sys.executable, "-c", script, tag, str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def snapshot(cache: Path, repo: str) -> Path:
    folders = list((cache / f"models--{repo.lower().replace('/', '--')}" / "snapshots").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, hub):
    """A Bento of the paper profile (on CPU, with the LLM packed too), built against the local Hub with no bank,
    and the model folder its image would hold."""
    tmp = tmp_path_factory.mktemp("packed")
    tree = project_copy(tmp)
    write_params(tree / "params.yaml", {"service": {"gpus": 0, "pack": ["base", "llm"]},
                                        "models": {"device": "auto"}}, profile="paper")  # the paper's asks for CUDA
    home = tmp / "bentoml"
    online = {k: v for k, v in build_env(home, HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf")).items()
              if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = bentoml_build(tree, online)
    assert r.returncode == 0, r.stdout + r.stderr
    tag = r.stdout.strip().rpartition("__tag__:")[2]
    dockerfile = containerize_models(home, tag, tmp / "hf-models", online)
    return {"tmp": tmp, "home": home, "tag": tag, "path": built(home)[0].parent,
            "bento": yaml.safe_load(built(home)[0].read_text()),
            "cache": tmp / "hf-models", "dockerfile": dockerfile}


def test_the_paper_bento_packs_its_models_as_safetensors_only(packed, hub):
    bento = packed["bento"]
    assert {e["name"]: e["value"] for e in bento["envs"]}["TIPSEN_PROFILE"] == "paper"
    models = {m["metadata"]["model_id"]: m for m in bento["services"][0]["models"]}
    assert set(models) == {BASE.lower(), LLM.lower()}
    for rid, m in models.items():
        assert m["registry"] == "huggingface" and m["metadata"]["revision"] == hub.sha[rid]  # pinned at build
        assert m["metadata"]["endpoint"] == hub.url
    assert "ENV BENTOML_HF_CACHE_DIR=" in packed["dockerfile"]  # where the image's service finds them

    base = snapshot(packed["cache"], BASE)
    files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    weights = [f for f in files if not f.endswith((".json", ".txt"))]
    assert weights and all(f.endswith(".safetensors") and ".fp16." not in f and "/" in f for f in weights), files
    assert UNET in files and "model_index.json" in files and "tokenizer_2/tokenizer.json" in files
    llm = snapshot(packed["cache"], LLM)
    files = sorted(p.relative_to(llm).as_posix() for p in llm.rglob("*") if p.is_file())
    assert "model.safetensors" in files and "tokenizer.json" in files, files
    assert not [f for f in files if "/" in f or not f.endswith((".json", ".safetensors", ".jinja"))], files


class BentoServer(Server):
    """`bentoml serve` of a built Bento on 127.0.0.1, as its image runs it: the packed models in
    BENTOML_HF_CACHE_DIR, and the Hub reachable. Waiting, logs and stopping are the project's Server's."""

    def __init__(self, packed, tmp: Path, *, cache: Path, hub_url: str):
        env = {k: v for k, v in build_env(packed["home"]).items()
               if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(BENTOML_HF_CACHE_DIR=str(cache), HF_ENDPOINT=hub_url, HF_HOME=str(tmp / "hf-serve"))
        self.port, self.log = free_port(), tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self._out = open(self.log, "wb")
        self.readiness = []
        self.proc = subprocess.Popen(
            # by its folder, as the image does: a tag named `tipsen` is first tried as the module of that name
            [sys.executable, "-m", "bentoml", "serve", str(packed["path"]), "--host", "127.0.0.1", "--port",
             str(self.port)],
            cwd=tmp, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_served_bento_loads_its_packed_models_and_never_downloads(packed, hub, tmp_path):
    cache = tmp_path / "hf-models"
    shutil.copytree(packed["cache"], cache, symlinks=True)
    hub.requests.clear()
    server = BentoServer(packed, tmp_path, cache=cache, hub_url=hub.url)
    try:
        server.wait_ready()
        keywords = httpx.get(f"{server.url}/keywords", timeout=30).json()
        assert keywords["base_model"] == BASE  # the name stays the Hub id; the weights came from the copy
        r = httpx.post(f"{server.url}/refine", json={"prompt": "김장하는 날", "seed": 1}, timeout=300)
        out = r.json()
        assert r.status_code == 200 and out["attempts"] >= 1, r.text
        # Llama 3's copy answered (tiny:llm is random, so its words may be refused, but only once it has run)
        assert out["backend"] == "transformers" or out["fallback_reason"].startswith("transformers: rejected"), out
        logs = server.logs()
        assert f"{BASE}: the packed copy at {cache}" in logs and f"{LLM}: the packed copy at {cache}" in logs
    finally:
        server.stop()
    assert hub.requests == []  # the Hub was up and never asked


def test_a_missing_packed_copy_is_one_line_and_never_downloaded(packed, hub, tmp_path):
    """What the service does with a packed model that is not all there: one line naming it, no request to the Hub."""
    from tipsen.errors import ConfigError
    from tipsen.models import PIPELINE_FILES, local_snapshot

    model = next(m for m in packed["bento"]["services"][0]["models"] if m["metadata"]["model_id"] == BASE.lower())
    cache = tmp_path / "hf-models"
    shutil.copytree(packed["cache"], cache, symlinks=True)
    revision = model["metadata"]["revision"]
    hub.requests.clear()
    found = local_snapshot(BASE, revision=revision, files=PIPELINE_FILES, cache_dir=str(cache))
    assert (found / UNET).is_file()
    (found / UNET).unlink()  # a copy the image lost
    with pytest.raises(ConfigError) as incomplete:
        local_snapshot(BASE, revision=revision, files=PIPELINE_FILES, cache_dir=str(cache))
    with pytest.raises(ConfigError) as absent:
        local_snapshot(BASE, revision=revision, files=PIPELINE_FILES, cache_dir=str(tmp_path / "empty"))
    for exc in (incomplete, absent):
        assert len(str(exc.value).splitlines()) == 1 and BASE in str(exc.value), exc.value
    assert UNET in str(incomplete.value) and "incomplete" in str(incomplete.value)
    assert "no packed copy" in str(absent.value)
    assert not (found / UNET).exists() and hub.requests == []  # nothing was fetched in its place


@pytest.mark.parametrize("models, says", [
    ({"base": "tiny:nope"}, "'tiny:nope': unknown tiny model"),
    ({"llm": "no-such-org/no-such-llm"}, "models.llm: 'no-such-org/no-such-llm' cannot be loaded"),  # before ready
])
def test_readyz_gives_the_reason_the_models_did_not_load(tmp_path, models, says):
    sections = {"models": models}
    if "llm" in models:
        sections["assistant"] = {"backend": "transformers"}
    params = write_params(tmp_path / "params.yaml", sections)
    bank = tmp_path / "bank.json"
    bank.write_text(json.dumps({"format": 1, "base_model": "tiny:nope", "adapters": []}), encoding="utf-8")
    server = Server(tmp_path, params=params, bank=bank)
    try:
        ready = None
        for _ in range(600):  # until the loader has given up
            try:
                ready = httpx.get(f"{server.url}/readyz", timeout=5)
                if ready.status_code != 503 or "not ready:" in ready.text:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            assert server.proc.poll() is None, server.logs()[-4000:]
            time.sleep(0.2)
        assert ready.status_code == 503 and says in ready.text, ready.text
        errors = [line for line in server.logs().splitlines() if "cannot load:" in line]
        assert len(errors) == 1 and says in errors[0], server.logs()[-4000:]
    finally:
        server.stop()
