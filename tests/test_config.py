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
    (lambda r: r["profiles"]["demo"]["train"].update(steps=True), "profiles.demo.train.steps: Input should be a valid "
                                                                  "integer (got True)"),  # strict: true is not 1
    (lambda r: r["profiles"]["demo"]["generate"].update(steps="2"), "profiles.demo.generate.steps: Input should be a "
                                                                    "valid integer (got '2')"),
    (lambda r: r["profiles"]["demo"]["assistant"].update(backend="gpt"), "profiles.demo.assistant.backend"),
    (lambda r: r.update(profile="nope"), "profile 'nope' is not defined; allowed: demo, paper"),
    (lambda r: r.update(colour="red"), "unknown top-level key 'colour'"),
    (lambda r: r["profiles"]["demo"].update(sampler={}), "profiles.demo.sampler: unknown key; allowed:"),
    (lambda r: r["profiles"]["demo"]["service"].update(allowed_hosts=["http://tipsen.example/"]),
     "profiles.demo.service.allowed_hosts.0: String should match pattern"),  # a name, not a URL
    (lambda r: r["profiles"]["demo"]["service"].update(body_timeout_s=120),
     "body_timeout_s (120) must be less than timeout_s (120)"),
    (lambda r: r["profiles"]["demo"]["service"].update(max_queue=100),
     "max_concurrency (80) must be at least max_queue (100)"),
    (lambda r: r["profiles"]["demo"]["service"].update(log_prompts="yes"),
     "profiles.demo.service.log_prompts: Input should be a valid boolean"),
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


def test_override_revalidates_and_names_the_key_or_flag(demo_params):
    changed = demo_params.override("train", {"steps": 3, "seed": 7})
    assert (changed.train.steps, changed.train.seed) == (3, 7) and demo_params.train.steps == 20  # a copy
    with pytest.raises(ConfigError, match=r"^train\.steps: Input should be greater than or equal to 1 \(got 0\)$"):
        demo_params.override("train", {"steps": 0})
    with pytest.raises(ConfigError, match=r"^--per-keyword: Input should be greater than or equal to 1 \(got 0\)$"):
        demo_params.override("curate", {"per_keyword": 0}, flags=True)
    with pytest.raises(ConfigError, match=r"^train\.stpes: unknown key; allowed: .*steps"):
        demo_params.override("train", {"stpes": 3})
    with pytest.raises(ConfigError, match=r"^sampler: not a params section; allowed: models, curate"):
        demo_params.override("sampler", {"steps": 3})
    with pytest.raises(ConfigError, match=r"^keywords: unknown slug 'pyramid'"):
        demo_params.override(None, {"keywords": ["gimjang", "pyramid"]})
    with pytest.raises(ConfigError, match=r"^eval\.methods\.0\.steps: Input should be less than or equal to 50"):
        demo_params.override("eval", {"methods": [{"name": "x", "base": "tiny:sdxl", "steps": 51}]})


def test_eval_methods_follow_the_generate_section_unless_they_say_otherwise(root):
    from tipsen.config import EvalMethod

    paper = load_params(root / "params.yaml", profile="paper")
    g = paper.generate
    for m in paper.eval.methods:  # the table draws exactly as the service and the promotion gate do
        assert m.sampling(g) == {"steps": g.steps, "guidance": g.guidance, "lora_scale": g.lora_scale,
                                 "width": g.width, "height": g.height}
    moved = paper.override("generate", {"lora_scale": 0.5, "steps": 30})
    assert {m.sampling(moved.generate)["lora_scale"] for m in moved.eval.methods} == {0.5}
    own = EvalMethod(name="own", base="x", steps=4, lora_scale=1.0)
    assert own.sampling(moved.generate) == {"steps": 4, "guidance": 5.0, "lora_scale": 1.0, "width": None,
                                            "height": None}


def test_each_stage_declares_the_params_it_reads(root):
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    declared = {name: set(stage.get("params") or stage["do"].get("params")) for name, stage in stages.items()}
    p = "profiles.${profile}."
    # curation filters by the keyword list and scores relevance with CLIP on models.device
    assert {"keywords", p + "curate", p + "models.clip", p + "models.device"} <= declared["curate"]
    assert {p + "train", p + "models.base", p + "models.pipeline_class", p + "models.device"} <= declared["train"]
    assert {"keywords", p + "models.base"} <= declared["bank"]
    assert {"keywords", p + "eval", p + "generate", p + "assistant", p + "models"} <= declared["evaluate"]
    assert "--metrics metrics" in stages["curate"]["cmd"] and "--metrics metrics" in stages["train"]["do"]["cmd"]
    raw = _raw(root)  # DVC refuses to run a stage whose declared param is missing from params.yaml
    for profile in raw["profiles"]:
        for key in set().union(*declared.values()):
            node = raw
            for part in key.replace("${profile}", profile).split("."):
                assert isinstance(node, dict) and part in node, f"{key} is not in params.yaml for {profile}"
                node = node[part]


@pytest.mark.parametrize("extra, key, value", [
    ({"train": {"steps": 25}}, "train.steps", "=25"),  # what `dvc exp run -S train.steps=25` writes
    ({"generate": {"steps": 5, "guidance": 3.0}}, "generate", "=..."),
])
def test_a_profile_setting_at_the_top_level_names_the_key_that_works(root, extra, key, value, monkeypatch):
    monkeypatch.delenv("TIPSEN_PROFILE", raising=False)
    raw = {**yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")), **extra}
    profile = raw["profile"]
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert str(info.value) == (f"params.yaml: {key}: a profile's setting given at the top level; set "
                               f"profiles.{profile}.{key} instead (dvc exp run -S profiles.{profile}.{key}{value})")
    with pytest.raises(ConfigError, match="unknown top-level key 'colour'; allowed: profile, keywords, profiles"):
        parse_params({**{k: v for k, v in raw.items() if k not in extra}, "colour": 1})
