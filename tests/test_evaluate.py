"""Evaluation: the metric math against independent computations, and the whole stage on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tipsen import metrics


# ---------------------------------------------------------------- metric math


def _naive_alignment(gen, real):
    """Per-pair cosines with plain loops: the definition, not the implementation."""
    total = 0.0
    for g in gen:
        for r in real:
            total += float(np.dot(g, r) / (np.linalg.norm(g) * np.linalg.norm(r)))
    return total / (len(gen) * len(real))


def test_alignment_matches_an_independent_numpy_computation():
    rng = np.random.default_rng(7)
    gen, real = rng.normal(size=(9, 16)), rng.normal(size=(13, 16)) * 3.0  # scale must not matter
    assert metrics.alignment(gen, real) == pytest.approx(_naive_alignment(gen, real), abs=1e-12)
    assert metrics.cosine_matrix(gen, real).shape == (9, 13)
    # torch tensors in, the same number out
    assert metrics.alignment(torch.tensor(gen), torch.tensor(real)) == pytest.approx(
        _naive_alignment(gen, real), abs=1e-6)


def test_alignment_on_known_cosines():
    e = np.eye(4)
    assert metrics.alignment(e[:1], e[:1] * 5) == pytest.approx(1.0)  # identical direction
    assert metrics.alignment(e[:1], -e[:1]) == pytest.approx(-1.0)  # opposite
    assert metrics.alignment(e[:2], e[2:]) == pytest.approx(0.0)  # orthogonal
    # gen = [e0, e1], real = [e0, (e0 + e1)/sqrt2]: cosines 1, 1/sqrt2, 0, 1/sqrt2 -> mean (1 + sqrt2) / 4
    real = np.stack([e[0], (e[0] + e[1]) / np.sqrt(2)])
    assert metrics.alignment(e[:2], real) == pytest.approx((1 + np.sqrt(2)) / 4)
    np.testing.assert_allclose(metrics.cosine_matrix(e[:2], real), [[1, 2 ** -0.5], [0, 2 ** -0.5]], atol=1e-12)


def test_diversity_excludes_the_diagonal():
    e = np.eye(3)
    assert metrics.diversity(np.tile(e[:1], (5, 1))) == pytest.approx(0.0)  # identical images: no diversity
    assert metrics.diversity(e) == pytest.approx(1.0)  # orthogonal: distance 1 for every pair
    assert metrics.diversity(np.stack([e[0], -e[0]])) == pytest.approx(2.0)  # opposite
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 8))
    n = len(x)
    pairs = [1 - _naive_alignment(x[i:i + 1], x[j:j + 1]) for i in range(n) for j in range(n) if i != j]
    assert metrics.diversity(x) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert np.isnan(metrics.diversity(x[:1]))


def test_mean_std_is_population_std():
    m, s = metrics.mean_std([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and s == pytest.approx(np.sqrt(((0.2 ** 2) * 2) / 3))


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    v = np.random.default_rng(0).normal(0.6, 0.1, size=30)
    a = metrics.bootstrap_ci(v, samples=500, seed=1)
    assert a == metrics.bootstrap_ci(v, samples=500, seed=1)  # same seed, same interval
    assert a != metrics.bootstrap_ci(v, samples=500, seed=2)
    assert a[0] < v.mean() < a[1]
    # the percentile interval of an independent resampling loop with the same generator
    rng = np.random.default_rng(1)
    means = [v[rng.integers(0, len(v), size=len(v))].mean() for _ in range(500)]
    assert a == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    # roughly the normal-theory width 2 * 1.96 * sd / sqrt(n)
    assert (a[1] - a[0]) == pytest.approx(2 * 1.96 * v.std() / np.sqrt(len(v)), rel=0.25)
    assert metrics.bootstrap_ci([0.3, 0.3, 0.3], samples=100, seed=0) == pytest.approx((0.3, 0.3))
    assert metrics.bootstrap_ci(v, samples=0, seed=0) is None


def test_paired_comparison():
    rng = np.random.default_rng(5)
    base = rng.normal(0.6, 0.1, size=20)
    better = base + 0.05 + rng.normal(0, 0.005, size=20)  # better on every keyword
    cmp = metrics.paired(better, base, samples=400, seed=0)
    assert cmp["mean_diff"] == pytest.approx(np.mean(better - base))
    assert cmp["wins"] == 20 and cmp["n"] == 20 and cmp["significant"]
    assert 0 < cmp["ci95"][0] < cmp["mean_diff"] < cmp["ci95"][1]
    # the CI is of the differences, far narrower than the spread of either method's scores
    assert cmp["ci95"][1] - cmp["ci95"][0] < 0.01
    same = metrics.paired(base, base, samples=400, seed=0)
    assert same["mean_diff"] == 0 and same["wins"] == 0 and not same["significant"]
    with pytest.raises(ValueError):
        metrics.paired(base, base[:3], samples=10, seed=0)


# ---------------------------------------------------------------- protocol pieces


def test_seeds_are_deterministic_and_shared_by_methods():
    from tipsen.config import SEED_MAX
    from tipsen.evaluate import derive_seed

    seeds = [derive_seed(0, "gimjang", i) for i in range(50)]
    assert seeds == [derive_seed(0, "gimjang", i) for i in range(50)] and len(set(seeds)) == 50
    assert seeds != [derive_seed(0, "yakgwa", i) for i in range(50)]
    assert seeds != [derive_seed(1, "gimjang", i) for i in range(50)]
    assert all(0 <= s <= SEED_MAX for s in seeds)  # the one seed range, as requests accept


def test_real_images_prefer_heldout_and_fall_back_to_all(tmp_path, caplog):
    from tipsen.evaluate import real_images
    from tipsen.testing import write_curated

    write_curated(tmp_path, "gimjang", splits=["heldout" if i in (1, 3) else "train" for i in range(5)], res=8)
    files, source = real_images(tmp_path, "gimjang", 2)
    assert source == "heldout" and [f.name for f in files] == ["001.png", "003.png"]
    with caplog.at_level("INFO", logger="tipsen.evaluate"):
        files, source = real_images(tmp_path, "gimjang", 4)
    assert source == "all" and len(files) == 4 and "using all 5 kept images" in caplog.text
    assert real_images(tmp_path, "yakgwa", 4) == ([], "missing")


def test_comparison_pairs_cover_lora_vs_base_and_assistant_vs_lora():
    from tipsen.config import EvalMethod
    from tipsen.evaluate import comparison_pairs

    specs = [EvalMethod(name="SD", base="sd"), EvalMethod(name="SDXL", base="xl"),
             EvalMethod(name="+LoRA", base="xl", lora=True),
             EvalMethod(name="+asst", base="xl", lora=True, assist=True)]
    pairs = comparison_pairs(specs)
    assert pairs[:3] == [(1, 0), (2, 0), (3, 0)]  # every method vs the first
    assert (2, 1) in pairs and (3, 2) in pairs and len(pairs) == 5


# ---------------------------------------------------------------- end to end on tiny models

KEYWORDS = ["gimjang", "yakgwa"]
STEPS = 2


def _method(name, base="tiny:sdxl", **kw):
    from tipsen.config import EvalMethod

    return EvalMethod(name=name, base=base, steps=STEPS, **kw)


def _params(demo_params, methods, **eval_update):
    ev = demo_params.eval.model_copy(update={"methods": methods, "images_per_keyword": 2, "real_images": 2,
                                             "batch_size": 4, "bootstrap": 100, **eval_update})
    gen = demo_params.generate.model_copy(update={"steps": STEPS})  # keyword_alignment's SDXL+LoRA settings
    return demo_params.model_copy(update={"keywords": KEYWORDS, "eval": ev, "generate": gen})


BASE_METHODS = ["SDXL (tiny)", "SDXL+LoRA (tiny)", "SDXL+LoRA+assistant (tiny)", "broken base"]


@pytest.fixture(scope="module")
def setup(demo_raw, demo_params, registry, tmp_path_factory):
    """The real curation of two keywords of the demo export, and a bank of two random adapters."""
    import json
    import shutil

    from tipsen.curate import curate
    from tipsen.testing import random_bank

    root = tmp_path_factory.mktemp("eval")
    raw = root / "raw"
    items = [json.loads(line) for line in (demo_raw / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    keep = [i for i in items if i["image"].split("/")[1] in KEYWORDS]
    for item in keep:
        (raw / item["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_raw / item["image"], raw / item["image"])
    (raw / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in keep), encoding="utf-8")
    curate(demo_params.model_copy(update={"keywords": KEYWORDS}), raw, root / "curated", progress=False)

    random_bank(root / "models", KEYWORDS, scale=4.0, registry=registry)  # lora_B x4: visibly changes images
    return root


@pytest.fixture()
def count_generation(monkeypatch):
    """Every plan that reaches the Generation runtime, per batch."""
    from tipsen.generate import Generator

    calls, real = [], Generator.render

    def counted(self, plans):
        calls.append([(self.base, p.route.slug, p.adapter is not None, p.seed) for p in plans])
        return real(self, plans)

    monkeypatch.setattr(Generator, "render", counted)
    return calls


def _run(setup, params, name="out"):
    from tipsen.evaluate import evaluate

    return evaluate(params, curated=setup / "curated", bank=setup / "models" / "bank.json",
                    metrics_dir=setup / name / "metrics", reports_dir=setup / name / "reports",
                    cache_dir=setup / "cache", keywords=KEYWORDS)


@pytest.fixture(scope="module")
def first(setup, demo_params):
    """The first evaluation: three methods on tiny:sdxl, and one whose base model does not exist."""
    methods = [_method("SDXL (tiny)"), _method("SDXL+LoRA (tiny)", lora=True),
               _method("SDXL+LoRA+assistant (tiny)", lora=True, assist=True),
               _method("broken base", base=str(setup / "no-such-model"))]
    params = _params(demo_params, methods)
    return params, _run(setup, params, "first")


def test_outputs_exist_and_are_valid(first, setup):
    import csv
    import json

    from PIL import Image

    params, result = first
    out = setup / "first"
    assert json.loads((out / "reports" / "eval.json").read_text(encoding="utf-8")) == result
    headline = json.loads((out / "metrics" / "eval" / "metrics.json").read_text(encoding="utf-8"))  # dvclive's summary
    assert headline == {k: {"mean": m["clip_align_mean"], "std": m["clip_align_std"]} if m["status"] == "ok"
                        else {"status": "failed"} for k, m in result["methods"].items()}
    assert any(v == {"status": "failed"} for v in headline.values())  # this setup has a model that cannot load
    assert result["profile"] == "demo" and result["keywords"] == KEYWORDS
    assert "random tiny models" in result["note"] and "tiny:clip" in result["note"]
    assert result["models"]["clip"] == "tiny:clip" and result["dino"]["status"] == "ok"
    assert result["images"]["generated_per_keyword"] == 2
    assert result["images"]["real_per_keyword"] == {"gimjang": 2, "yakgwa": 2}  # demo curation holds out 2 of 10
    assert set(result["images"]["real_source"].values()) == {"heldout"}
    methods = {m["name"]: m for m in result["methods"].values()}
    assert list(methods) == BASE_METHODS
    broken = methods.pop("broken base")
    assert broken["status"] == "failed" and "no-such-model" in broken["reason"] and "clip_align_mean" not in broken
    for m in methods.values():
        assert m["status"] == "ok" and m["keywords"] == 2
        assert -1 <= m["clip_align_mean"] <= 1 and m["clip_align_std"] >= 0
        assert m["ci95"][0] <= m["clip_align_mean"] <= m["ci95"][1]
        assert 0 <= m["diversity_mean"] <= 2 and -1 <= m["dino_align_mean"] <= 1 and -1 <= m["clip_t_mean"] <= 1
    # LoRA changes the images, so its scores differ from the base model's
    assert methods["SDXL+LoRA (tiny)"]["clip_align_mean"] != methods["SDXL (tiny)"]["clip_align_mean"]
    assert {(c["a"], c["b"]) for c in result["comparisons"].values()} == {
        ("SDXL+LoRA (tiny)", "SDXL (tiny)"), ("SDXL+LoRA+assistant (tiny)", "SDXL (tiny)"),
        ("SDXL+LoRA+assistant (tiny)", "SDXL+LoRA (tiny)")}

    rows = list(csv.DictReader((out / "reports" / "per_keyword.csv").open(encoding="utf-8")))
    assert len(rows) == 2 * 3 and {r["keyword"] for r in rows} == set(KEYWORDS)
    plotted = json.loads((out / "metrics" / "eval" / "plots" / "custom" / "per_keyword.json").read_text())
    assert [{k: str(v) for k, v in p.items()} for p in plotted] == rows  # dvclive's custom plot: the same rows
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["eval"]  # nothing hand-written beside the log
    for name, m in methods.items():  # the table's mean and ddof=0 std are over the CSV's keyword rows
        scores = [float(r["clip_align"]) for r in rows if r["method"] == name]
        assert m["clip_align_mean"] == pytest.approx(np.mean(scores), abs=2e-6)
        assert m["clip_align_std"] == pytest.approx(np.std(scores, ddof=0), abs=2e-6)

    table = (out / "reports" / "eval_table.md").read_text(encoding="utf-8")
    assert "| Method | Image-align (mean ± std) |" in table and "ddof=0" in table and "random tiny models" in table
    sdxl = methods["SDXL (tiny)"]
    assert f"| SDXL (tiny) | {sdxl['clip_align_mean']:.4f} ± {sdxl['clip_align_std']:.4f} |" in table
    assert "| broken base | failed:" in table and "profile: `demo`" in table
    grid = Image.open(out / "reports" / "eval_grid.png")
    assert grid.size == (128 * 6, 64 + 128 * 2)  # label column, real images, four methods; header, two keywords
    # the first image of each generated cache file is a PNG at the model's native size
    pngs = sorted((setup / "cache" / "images").rglob("*.png"))
    assert len(pngs) == 3 * 2 * 2 and Image.open(pngs[0]).size == (64, 64)
    specs = [json.loads(Image.open(p).text["tipsen"]) for p in pngs]
    refined = [s["prompt"] for s in specs if s["assist"] is not None]  # the assistant's prompts, one per seed
    assert len(refined) == 4 and all(p.startswith("A realistic photo of") for p in refined)
    templates = {s["prompt"] for s in specs if s["assist"] is None}
    assert templates == {"A photo of Gimjang Tradition", "A photo of Yakgwa Food"}
    assert [p.name for p in setup.rglob("*bank*.json")] == ["bank.json"]  # the real bank only, no stand-in index


def test_score_matches_an_independent_clip_computation(first, setup):
    """Re-embed one keyword's cached images with open_clip directly: the CSV's score is the all-pairs mean."""
    import csv
    import json

    from PIL import Image

    from tipsen.models import load_clip

    model, preprocess, _ = load_clip("tiny:clip")
    rows = [json.loads(line) for line in (setup / "curated" / "yakgwa" / "metadata.jsonl").read_text().splitlines()]
    real = [setup / "curated" / "yakgwa" / r["file_name"] for r in rows if r["split"] == "heldout"]
    gen = {False: [], True: []}  # by LoRA use, from each cached PNG's own provenance record
    for png in (setup / "cache" / "images").rglob("*.png"):
        spec = json.loads(Image.open(png).text["tipsen"])
        if spec["keyword"] == "yakgwa" and spec["assist"] is None:
            assert spec["prompt"] == "A photo of Yakgwa Food"  # the paper's template prompt, nothing appended
            gen[spec["lora"]].append(png)
    assert len(real) == 2 and len(gen[False]) == len(gen[True]) == 2

    def unit(paths):
        with torch.no_grad():
            e = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]))
        e = e.double().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    r = unit(real)
    got = {x["method"]: float(x["clip_align"]) for x in
           csv.DictReader((setup / "first" / "reports" / "per_keyword.csv").open(encoding="utf-8"))
           if x["keyword"] == "yakgwa"}
    assert got["SDXL (tiny)"] == pytest.approx(float((unit(gen[False]) @ r.T).mean()), abs=2e-5)
    assert got["SDXL+LoRA (tiny)"] == pytest.approx(float((unit(gen[True]) @ r.T).mean()), abs=2e-5)


def test_rerun_reuses_the_cache_and_gives_identical_metrics(first, setup, count_generation):
    params, result = first
    again = _run(setup, params, "rerun")
    assert count_generation == []  # every image came from the cache
    assert again == result
    for same in ("reports/per_keyword.csv", "metrics/eval/metrics.json", "metrics/eval/plots/custom/per_keyword.json"):
        assert (setup / "rerun" / same).read_bytes() == (setup / "first" / same).read_bytes(), same


def test_adding_a_method_generates_only_that_method(first, setup, count_generation):
    params, result = first
    sd = _method("SD (tiny)", base="tiny:sd")
    more = params.model_copy(update={"eval": params.eval.model_copy(
        update={"methods": [sd, *params.eval.methods]})})
    out = _run(setup, more, "added")
    requests = [r for batch in count_generation for r in batch]
    assert {base for base, *_ in requests} == {"tiny:sd"} and not any(lora for _, _, lora, _ in requests)
    assert len(requests) == 2 * 2 and max(map(len, count_generation)) == 4  # one mixed-keyword batch
    assert {kw for _, kw, _, _ in count_generation[0]} == set(KEYWORDS)
    assert out["methods"]["sd_tiny"]["status"] == "ok"
    for key, m in result["methods"].items():  # the old methods' numbers are unchanged
        assert out["methods"][key] == m
    # the new first method is now every comparison's reference
    assert ("SDXL (tiny)", "SD (tiny)") in {(c["a"], c["b"]) for c in out["comparisons"].values()}


def test_dino_unavailable_is_skipped_with_a_reason(first, setup, count_generation):
    params, result = first
    models = params.models.model_copy(update={"dino": str(setup / "no-dino-here")})
    out = _run(setup, params.model_copy(update={"models": models}), "nodino")
    assert out["dino"]["status"] == "skipped" and "no-dino-here" in out["dino"]["reason"]
    sdxl = out["methods"]["sdxl_tiny"]
    assert sdxl["dino_align_mean"] is None
    assert sdxl["clip_align_mean"] == result["methods"]["sdxl_tiny"]["clip_align_mean"]
    assert count_generation == []
    off = _run(setup, params.model_copy(update={"models": params.models.model_copy(update={"dino": None})}), "nodino")
    assert off["dino"] == {"status": "skipped", "reason": "models.dino is null"}


def test_keyword_alignment_scores_an_adapter_on_the_same_images(first, setup, count_generation):
    """The promotion gate's score: SDXL+LoRA at the generate settings, on the held-out images."""
    import csv

    from tipsen.evaluate import keyword_alignment

    params, _ = first
    score = keyword_alignment(params, "gimjang", bank=setup / "models" / "bank.json", curated=setup / "curated",
                              cache_dir=setup / "cache")
    assert count_generation == []  # the same seeds and settings as the table's SDXL+LoRA method: cached
    rows = csv.DictReader((setup / "first" / "reports" / "per_keyword.csv").open(encoding="utf-8"))
    table = next(float(r["clip_align"]) for r in rows
                 if r["keyword"] == "gimjang" and r["method"] == "SDXL+LoRA (tiny)")
    assert score == pytest.approx(table, abs=1e-6)


def test_dvc_metrics_and_plots_show_read_the_outputs(first, setup, tmp_path):
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = tmp_path / "repo"
    import yaml

    shutil.copytree(setup / "first" / "metrics", repo / "metrics")
    stage = yaml.safe_load((Path(__file__).resolve().parent.parent / "dvc.yaml").read_text())["stages"]["evaluate"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({  # the evaluate stage's own declarations, as top-level ones
        "metrics": [next(iter(m)) for m in stage["metrics"]],
        "plots": [{path: {k: v for k, v in props.items() if k != "cache"}} for p in stage["plots"]
                  for path, props in p.items()]}), encoding="utf-8")
    dvc_bin = Path(sys.executable).parent / "dvc"  # the dvc of this interpreter's environment
    dvc = lambda *a: subprocess.run([str(dvc_bin), *a], cwd=repo, check=True, capture_output=True,  # noqa: E731
                                    text=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    shown = dvc("metrics", "show", "--json")
    assert "failed to load" not in shown.stderr
    data = json.loads(shown.stdout)[""]["data"]["metrics/eval/metrics.json"]
    assert "error" not in data
    expected = first[1]["methods"]["sdxl_tiny"]["clip_align_mean"]
    assert data["data"]["sdxl_tiny"]["mean"] == expected
    table = dvc("metrics", "show").stdout.splitlines()  # readable: one short column per headline number
    assert max(map(len, table)) < 200 and "sdxl_tiny.mean" in table[0], table
    plots = json.loads(dvc("plots", "show", "--json").stdout)
    spec = plots["data"]["metrics/eval/plots/custom/per_keyword.json"][0]["content"]
    assert spec["encoding"]["y"]["field"] == "label" and len(spec["data"]["values"]) == 2 * 3


def test_cli_prints_the_table_and_rejects_unknown_keywords(first, setup, tmp_path, capsys, count_generation):
    from tipsen.cli import main
    from tipsen.testing import write_params

    params, result = first
    write_params(tmp_path / "params.yaml", {"eval": params.eval.model_dump(mode="json"), "generate": {"steps": STEPS}},
                 keywords=KEYWORDS)
    common = ["--params", str(tmp_path / "params.yaml"), "--curated", str(setup / "curated"),
              "--bank", str(setup / "models" / "bank.json"), "--cache", str(setup / "cache")]
    assert main(["evaluate", *common, "--metrics", str(tmp_path / "m"), "--reports", str(tmp_path / "r"),
                 "--keywords", "gimjang,yakgwa"]) == 0
    out = capsys.readouterr().out
    assert f"SDXL (tiny)\t{result['methods']['sdxl_tiny']['clip_align_mean']:.4f}" in out and "random tiny" in out
    assert (tmp_path / "r" / "eval_grid.png").is_file() and count_generation == []
    assert main(["evaluate", *common, "--keywords", "gimjang,nosuch"]) == 2
    err = capsys.readouterr().err
    assert "keywords: unknown keyword 'nosuch'; allowed:" in err and "Traceback" not in err
