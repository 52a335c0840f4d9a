"""params.yaml -> typed config: both profiles validate, and bad keys fail with a message naming the key."""
import subprocess
import sys

import pytest
import yaml

from tipsen.config import load_params, parse_params
from tipsen.errors import ConfigError
from tipsen.testing import write_params


def _raw(root):
    return yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))


def test_both_profiles_validate(root):
    demo = load_params(root / "params.yaml", profile="demo")
    paper = load_params(root / "params.yaml", profile="paper")
    assert demo.models.base == "tiny:sdxl" and demo.assistant.backend == "template"
    # The paper's settings.
    assert paper.models.base == "stabilityai/stable-diffusion-xl-base-1.0"
    t = paper.train
    assert (t.rank, t.learning_rate, t.batch_size, t.steps, t.resolution) == (20, 2e-4, 2, 500, 1024)
    g = paper.generate
    assert (g.steps, g.guidance, g.lora_scale) == (28, 5.0, 0.7)
    assert paper.assistant.temperature == 0.8 and "Llama-3" in paper.models.llm
    assert (paper.eval.images_per_keyword, paper.eval.real_images) == (100, 100)
    assert len(paper.eval.methods) == 5 and paper.keywords


def test_profile_switch_by_env(root, monkeypatch):
    monkeypatch.setenv("TIPSEN_PROFILE", "paper")
    assert load_params(root / "params.yaml").profile == "paper"


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["profiles"]["demo"]["train"].update(rnak=4), "profiles.demo.train.rnak: unknown key; allowed:"),
    (lambda r: r["profiles"]["demo"]["train"].update(rank="big"), "profiles.demo.train.rank"),
    (lambda r: r["profiles"]["demo"]["train"].update(rank=0), "profiles.demo.train.rank: Input should be greater"),
    (lambda r: r["profiles"]["demo"]["generate"].update(guidance=99), "profiles.demo.generate.guidance"),
    (lambda r: r["profiles"]["demo"]["assistant"].update(backend="gpt"), "profiles.demo.assistant.backend"),
    (lambda r: r.update(profile="nope"), "profile 'nope' is not defined; allowed: demo, paper"),
    (lambda r: r.update(colour="red"), "unknown top-level key 'colour'"),
    (lambda r: r["profiles"]["demo"].update(sampler={}), "profiles.demo.sampler: unknown key; allowed:"),
])
def test_bad_params_name_the_key(root, mutate, needle):
    raw = _raw(root)
    mutate(raw)
    with pytest.raises(ConfigError) as exc:
        parse_params(raw)
    assert needle in str(exc.value)


def test_unknown_keyword_slug(tmp_path):
    path = write_params(tmp_path / "params.yaml", keywords=["gimjang", "pyramid"])
    with pytest.raises(ConfigError, match="keywords: unknown slug 'pyramid'; allowed: yakgwa"):
        load_params(path)


def test_cli_reports_bad_params_in_one_line(tmp_path):
    path = write_params(tmp_path / "params.yaml", {"curate": {"per_keyword": -3}})
    proc = subprocess.run([sys.executable, "-m", "tipsen.cli", "config", "--params", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "profiles.demo.curate.per_keyword" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "tipsen.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo-data", "curate", "train", "bank", "generate", "refine", "evaluate", "serve"):
        assert f"  {cmd}" in out.stdout
