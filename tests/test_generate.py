"""Generation runtime on tiny:sdxl at 64 px: routing, reproducibility, mixed-adapter batches, bank safety, CLI."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tipsen.errors import ConfigError, NoTopic
from tipsen.testing import a1111_png_info, random_bank

SLUGS = ["gimjang", "yakgwa", "hanok"]
STEPS = 2


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _same(a, b) -> bool:
    return int(np.abs(_pixels(a) - _pixels(b)).max()) <= 1  # float noise may move a rounding by one level


def _differ(a, b) -> float:
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory, registry) -> Path:
    """Three random LoRAs saved as the trainer saves them, indexed by the real bank builder."""
    root = tmp_path_factory.mktemp("bank")
    random_bank(root, SLUGS, scale=4.0, registry=registry)  # lora_B x4: each adapter visibly changes the output
    return root


@pytest.fixture(scope="session")
def gen(demo_params, lora_root, registry):
    from tipsen.generate import Generator

    return Generator(demo_params, bank=lora_root / "bank.json", registry=registry)


def _copy_bank(lora_root: Path, tmp_path: Path, registry) -> Path:
    from tipsen.bank import build_bank

    shutil.copytree(lora_root / "loras", tmp_path / "loras")
    build_bank(tmp_path / "loras", tmp_path / "bank.json", keywords=SLUGS, registry=registry, base_model="tiny:sdxl")
    return tmp_path


def test_all_adapters_resident_in_the_store(gen):
    """The bank is held by the store: stacked per layer, with no peft wrapper created for any adapter."""
    from tipsen.lora_batch import lora_layers

    status = gen.status()
    assert sorted(status["adapters"]) == sorted(SLUGS) and gen.available == sorted(SLUGS)
    assert not lora_layers(gen.modules)
    stacks = gen.store.version.stacks
    assert stacks and all(sorted(s.slot) == sorted(SLUGS) for s in stacks.values())
    for slug in SLUGS:
        info = status["adapters"][slug]
        assert info["path"] == "store" and info["modules"] == len(stacks) and info["bytes"] > 0
        assert info["sha256"] == gen.entries[slug].sha256


def test_routing(gen):
    assert gen.route("어릴 적 김장하던 날").slug == "gimjang"
    assert gen.route("GIM  JANG with grandma").slug == "gimjang"  # case- and spacing-insensitive
    both = gen.route("김장 하던 날, 세종대왕 동상 앞에서")  # two keywords: the first named is drawn
    assert (both.slug, both.also) == ("gimjang", ("sejong",))
    explicit = gen.route("어릴 적 김장하던 날", keyword="yakgwa")
    assert (explicit.slug, explicit.source) == ("yakgwa", "explicit")
    assert gen.route("a quiet morning by the sea").as_dict() == {
        "slug": None, "matched": None, "source": "none", "confidence": 0.0, "evidence": [], "also": [], "ask": [],
        "settled": None}
    plan = gen.resolve({"prompt": "김장 하던 날, 세종대왕 동상 앞에서", "assist": False})
    assert plan.route.slug == "gimjang" and plan.adapters == ("gimjang",)  # sejong has no adapter in this bank
    assert plan.warnings == ("no LoRA for sejong (not in the bank); drawn without it",)
    two = gen.resolve({"prompt": "김장 하던 날 약과를 먹었다", "assist": False})
    assert two.adapters == ("gimjang", "yakgwa") and two.warnings == ()  # routed together, drawn together


def test_keywords_chosen_by_the_caller(gen):
    both = gen.resolve({"prompt": "어릴 적 김장하던 날", "keywords": ["yakgwa", "gimjang"], "assist": False})
    assert (both.adapters, both.route.source, both.route.slugs) == (("yakgwa", "gimjang"), "explicit",
                                                                     ("yakgwa", "gimjang"))
    assert both.warnings == () and both.scales == (0.7, 0.7)
    own = gen.resolve({"prompt": "grandma's kitchen", "keywords": ["yakgwa", "gimjang"], "lora_scale": [1.0, 0.4]})
    assert own.scales == (1.0, 0.4) and own.prompt == "A photo of Yakgwa Food and Gimjang Tradition, grandma's kitchen"
    assert both.prompt.startswith("A photo of Yakgwa Food, a deep-fried") and "; A photo of Gimjang" in both.prompt
    english = gen.resolve({"prompt": "a bowl of soup", "keywords": [], "assist": False})  # every one taken back
    assert (english.adapter, english.route.slug, english.route.source, english.prompt) == \
        (None, None, "explicit", "a bowl of soup")
    with pytest.raises(NoTopic):  # Korean words and no keyword left: nothing SDXL can read
        gen.resolve({"prompt": "어릴 적 김장하던 날", "keywords": [], "assist": False})
    off = gen.resolve({"prompt": "차례", "keywords": ["charye"], "use_lora": False, "assist": False})
    assert (off.adapter, off.route.slug) == (None, "charye")  # no adapter needed without LoRA


@pytest.mark.parametrize("change, message", [
    ({"keywords": ["gimjang", "gimjang"]}, "keywords: gimjang, gimjang names a keyword twice"),
    ({"keywords": ["gimjang", "yakgwa", "hanok"]}, "keywords: 3 keywords; allowed: at most 2"),
    ({"keywords": ["gimjang", "sebae"]}, "keywords: 'sebae' is not in the bank"),
    ({"keywords": ["gimjang", "yakgwa"], "lora_scale": [1.0]}, "lora_scale: 1 scales for 2 chosen keywords"),
    ({"lora_scale": [1.0, 0.5]}, "lora_scale: 2 scales for 0 chosen keywords"),
    ({"keywords": ["gimjang", "yakgwa"], "lora_scale": [1.0, 3.0]}, "lora_scale.1: Input should be less than"),
    ({"keywords": ["gimjang"], "keyword": "gimjang"}, "keywords: send either keyword or keywords"),
    ({"keywords": ["gimjang", "charye"]}, "keywords: 'charye' is not in the bank"),
    ({"keywords": ["pyramid"]}, "keywords: unknown keyword 'pyramid'"),
    ({"keywords": "gimjang"}, "keywords"),
])
def test_bad_keywords_name_the_field(gen, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        gen.resolve({"prompt": "김장", **change})


def test_routed_prompt_and_metadata(gen):
    routed, plain = gen.generate_batch([
        {"prompt": "어릴 적 김장하던 날", "seed": 1, "steps": STEPS},
        {"prompt": "a quiet morning by the sea", "seed": 1, "steps": STEPS}])
    meta = routed.metadata
    assert meta["keyword"] == meta["adapter"] == "gimjang"
    assert meta["route"] == {"slug": "gimjang", "matched": "김장", "source": "alias", "confidence": 1.0,
                             "evidence": ["김장"], "also": [], "ask": [], "settled": None}  # 김장 + 하 + 던
    # SDXL reads English only: the template and the keyword's description; the senior's words stay in `input`
    assert meta["prompt"] == "A photo of Gimjang Tradition, families making large batches of kimchi together in " \
                             "late autumn" and meta["input"] == "어릴 적 김장하던 날"
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["lora_scale"]) == (1, STEPS, 5.0, 0.7)
    assert (meta["width"], meta["height"], meta["model"]) == (64, 64, "tiny:sdxl")
    assert set(meta["timings"]) == {"queue", "refine", "diffusion", "total"}
    assert routed.images[0].size == (64, 64)
    assert plain.metadata["keyword"] is None and plain.metadata["adapter"] is None
    assert plain.metadata["route"]["source"] == "none" and plain.metadata["lora_scale"] is None
    assert plain.metadata["prompt"] == "a quiet morning by the sea"


def test_seed_reproducible_and_random_seed_reported(gen):
    req = {"prompt": "김장", "seed": 7, "steps": STEPS}
    a, b = gen.generate(req), gen.generate(req)
    assert np.array_equal(_pixels(a.images[0]), _pixels(b.images[0]))
    assert _differ(a.images[0], gen.generate({**req, "seed": 8}).images[0]) > 1.0
    drawn = gen.generate({"prompt": "김장", "steps": STEPS})
    assert isinstance(drawn.metadata["seed"], int)
    again = gen.generate({"prompt": "김장", "steps": STEPS, "seed": drawn.metadata["seed"]})
    assert np.array_equal(_pixels(drawn.images[0]), _pixels(again.images[0]))


def test_mixed_batch_matches_each_request_alone(gen, monkeypatch):
    reqs = [
        {"prompt": "김장하는 할머니들", "seed": 11, "steps": STEPS, "guidance": 5.0},
        {"prompt": "grandma's yakgwa", "seed": 12, "steps": STEPS, "guidance": 5.0, "lora_scale": 1.0},
        {"prompt": "our old hanok", "seed": 13, "steps": STEPS, "guidance": 5.0, "lora_scale": 0.4},
        {"prompt": "a quiet morning by the sea", "seed": 14, "steps": STEPS, "guidance": 5.0},
        {"prompt": "김장하는 할머니들", "seed": 11, "steps": STEPS, "guidance": 5.0, "lora_scale": 1.5},
    ]
    batches = []
    diffuse = gen._diffuse
    monkeypatch.setattr(gen, "_diffuse", lambda key, jobs: batches.append(len(jobs)) or diffuse(key, jobs))
    mixed = gen.generate_batch(reqs)
    assert batches == [5]  # three adapters, the base model and two scales of one adapter: one diffusion batch
    assert [r.metadata["adapter"] for r in mixed] == ["gimjang", "yakgwa", "hanok", None, "gimjang"]
    for req, result in zip(reqs, mixed):
        alone = gen.generate(req)
        assert _same(result.images[0], alone.images[0]), req
    assert _differ(mixed[0].images[0], mixed[4].images[0]) > 1.0  # each request's own LoRA scale is honoured


def _peft_unet(lora_root: Path, slugs):
    """tiny:sdxl's UNet with `slugs` loaded the stock way (peft layers, one named adapter each)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from tipsen.bank import WEIGHTS_NAME
    from tipsen.models import resolve_ref

    unet = UNet2DConditionModel.from_pretrained(resolve_ref("tiny:sdxl"), subfolder="unet", use_safetensors=True)
    for slug in slugs:  # as load_lora_weights does: the pipeline reads the file (any layout), the UNet takes it
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(lora_root / "loras" / slug),
                                                                 weight_name=WEIGHTS_NAME, use_safetensors=True)
        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=slug)
    return unet


def _unet_inputs(cfg, rows: int):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(rows, 77, cfg.cross_attention_dim, generator=g)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return x, ctx, {"text_embeds": torch.randn(rows, pooled, generator=g), "time_ids": torch.rand(rows, 6, generator=g)}


def test_store_equals_peft_mixed_batch(gen, lora_root):
    """The store's stacked rows (one, two or no adapters each) against peft's own forward on a stock-loaded UNet:
    peft's mixed batch for one adapter per row, and both adapters active at their scales for a two-adapter row."""
    import torch

    from tipsen.lora_batch import per_sample

    peft_unet = _peft_unet(lora_root, SLUGS)
    names, scales = ["gimjang", None, "yakgwa", "gimjang", "hanok"], [0.7, 0.0, 1.0, 1.5, 0.4]
    rows = 2 * len(names)  # classifier-free guidance: each sample twice
    x, ctx, extra = _unet_inputs(peft_unet.config, rows)
    with torch.no_grad():
        base = gen.pipe.unet(x, 500, ctx, added_cond_kwargs=extra).sample
        with per_sample([peft_unet], names, scales, gather=False):
            peft_mixed = peft_unet(x, 500, ctx, added_cond_kwargs=extra).sample
        with gen.store.batch([(n,) if n else () for n in names], [(s,) for s in scales]):
            stored = gen.pipe.unet(x, 500, ctx, added_cond_kwargs=extra).sample
    assert torch.allclose(stored, peft_mixed, atol=1e-5, rtol=1e-4)
    lora_effect = (stored - base).abs().amax(dim=(1, 2, 3))
    assert torch.all(lora_effect[[0, 2, 3, 4, 5, 7, 8, 9]] > 1e-3)  # every LoRA row really moved...
    assert torch.equal(stored[[1, 6]], base[[1, 6]])  # ...and the base-model rows did not

    x, ctx, extra = _unet_inputs(peft_unet.config, 2)
    peft_unet.set_adapters(["gimjang", "yakgwa"], [0.7, 1.2])  # stock diffusers: both adapters on every row
    with torch.no_grad():
        both = peft_unet(x, 500, ctx, added_cond_kwargs=extra).sample
        with gen.store.batch([("gimjang", "yakgwa")], [(0.7, 1.2)]):
            stored = gen.pipe.unet(x, 500, ctx, added_cond_kwargs=extra).sample
    assert torch.allclose(stored, both, atol=1e-5, rtol=1e-4)


def test_adapters_of_different_ranks_and_a_kohya_file(demo_params, lora_root, tmp_path, registry):
    """A rank-8 adapter beside rank-4 ones (zero-padded in the stacks), and an adapter in the kohya layout (read
    through diffusers' own conversion, alpha 2 of rank 4): the store draws each as peft does."""
    import torch
    from safetensors.torch import save_file

    from tipsen.bank import WEIGHTS_NAME, build_bank
    from tipsen.export import to_kohya
    from tipsen.generate import Generator
    from tipsen.lora_batch import per_sample

    random_bank(tmp_path, ["sebae"], rank=8, scale=4.0, seed=41, registry=registry)
    shutil.copytree(lora_root / "loras" / "gimjang", tmp_path / "loras" / "gimjang")
    (tmp_path / "loras" / "hanok").mkdir()
    kohya = to_kohya(lora_root / "loras" / "hanok" / WEIGHTS_NAME, alpha=2.0)
    save_file(kohya, str(tmp_path / "loras" / "hanok" / WEIGHTS_NAME))
    build_bank(tmp_path / "loras", tmp_path / "bank.json", keywords=["gimjang", "sebae", "hanok"], registry=registry,
               base_model="tiny:sdxl")
    gen = Generator(demo_params, bank=tmp_path / "bank.json", registry=registry)
    assert {s: a["path"] for s, a in gen.status()["adapters"].items()} == dict.fromkeys(["gimjang", "sebae", "hanok"],
                                                                                      "store")
    peft_unet = _peft_unet(tmp_path, ["gimjang", "sebae", "hanok"])
    names = ["gimjang", "sebae", "hanok", None]
    x, ctx, extra = _unet_inputs(peft_unet.config, 2 * len(names))
    with torch.no_grad():
        with per_sample([peft_unet], names, [1.0] * len(names), gather=False):
            want = peft_unet(x, 500, ctx, added_cond_kwargs=extra).sample
        with gen.store.batch([(n,) if n else () for n in names], [(1.0,)] * len(names)):
            got = gen.pipe.unet(x, 500, ctx, added_cond_kwargs=extra).sample
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert gen.store.version.stacks[next(iter(gen.store.version.stacks))].a.shape[1] == 8  # padded to the largest


def test_two_keywords_in_one_picture_match_stock_diffusers(gen, demo_params, lora_root):
    """A two-adapter request drawn by the store equals stock diffusers' `set_adapters([a, b], [s_a, s_b])` on the
    same prompt and seed, to rounding; and a batch mixing two-, one- and zero-adapter rows equals each alone."""
    import torch

    from tipsen.models import load_base

    req = {"prompt": "grandma's kitchen", "keywords": ["gimjang", "yakgwa"], "lora_scale": [0.7, 1.2], "seed": 5,
           "steps": STEPS, "guidance": 5.0}
    ours = gen.generate(req)
    assert [(a["slug"], a["scale"]) for a in ours.metadata["adapters"]] == [("gimjang", 0.7), ("yakgwa", 1.2)]
    assert ours.metadata["adapters"][1]["sha256"] == gen.entries["yakgwa"].sha256
    pipe = load_base(demo_params)
    for slug in ("gimjang", "yakgwa"):
        pipe.load_lora_weights(str(lora_root / "loras" / slug), adapter_name=slug, use_safetensors=True)
    pipe.set_adapters(["gimjang", "yakgwa"], [0.7, 1.2])
    out = pipe(prompt=[ours.metadata["prompt"]], negative_prompt=None, num_inference_steps=STEPS, guidance_scale=5.0,
               width=64, height=64, generator=[torch.Generator("cpu").manual_seed(5)], output_type="np")
    assert _same(ours.images[0], pipe.numpy_to_pil(out.images)[0])
    one = gen.generate({**req, "keywords": ["gimjang"], "lora_scale": [0.7]})
    assert _differ(ours.images[0], one.images[0]) > 1.0  # the second adapter really draws

    reqs = [req, {**req, "keywords": ["hanok"], "lora_scale": 0.4, "seed": 6},
            {**req, "keywords": [], "lora_scale": None, "seed": 7}, {**req, "keywords": ["yakgwa", "hanok"]}]
    mixed = gen.generate_batch(reqs)
    assert [len(r.metadata["adapters"]) for r in mixed] == [2, 1, 0, 2]
    for r, result in zip(reqs, mixed):
        assert _same(result.images[0], gen.generate(r).images[0]), r


def test_what_the_store_cannot_hold_goes_through_peft(demo_params, lora_root, tmp_path, registry):
    """An adapter with LoRA biases is drawn by peft's path, reported as such, and mixes in one batch with store
    adapters (also in one row) exactly as each request alone."""
    from tipsen.bank import build_bank
    from tipsen.generate import Generator

    random_bank(tmp_path, ["charye"], lora_bias=True, scale=4.0, seed=31, registry=registry)
    shutil.rmtree(tmp_path / "bank.json", ignore_errors=True)
    for slug in ("gimjang", "yakgwa"):
        shutil.copytree(lora_root / "loras" / slug, tmp_path / "loras" / slug)
    build_bank(tmp_path / "loras", tmp_path / "bank.json", keywords=["gimjang", "yakgwa", "charye"],
               registry=registry, base_model="tiny:sdxl")
    gen = Generator(demo_params, bank=tmp_path / "bank.json", registry=registry)
    adapters = gen.status()["adapters"]
    assert [adapters[s]["path"] for s in ("gimjang", "yakgwa", "charye")] == ["store", "store", "peft"]
    assert "lora_B.bias" in adapters["charye"]["why_peft"] or "bias" in adapters["charye"]["why_peft"]
    base = {"prompt": "a family in autumn", "steps": STEPS, "guidance": 5.0}
    reqs = [{**base, "keyword": "charye", "seed": 1}, {**base, "keyword": "gimjang", "seed": 2},
            {**base, "keywords": ["yakgwa", "charye"], "seed": 3}, {**base, "keywords": [], "seed": 4}]
    mixed = gen.generate_batch(reqs)
    assert [[a["slug"] for a in r.metadata["adapters"]] for r in mixed] == [["charye"], ["gimjang"],
                                                                            ["yakgwa", "charye"], []]
    for r, result in zip(reqs, mixed):
        assert _same(result.images[0], gen.generate(r).images[0]), r
    plain = gen.generate({**base, "keywords": [], "seed": 1})
    assert _differ(mixed[0].images[0], plain.images[0]) > 1.0  # the peft adapter really draws


def test_different_adapters_give_different_images(gen):
    base = {"prompt": "a family in autumn", "seed": 3, "steps": STEPS}
    images = {slug: gen.generate({**base, "keyword": slug}).images[0] for slug in SLUGS}
    plain = gen.generate({**base, "keyword": "gimjang", "use_lora": False})
    assert plain.metadata["adapter"] is None and plain.metadata["keyword"] == "gimjang"
    assert _differ(images["gimjang"], images["yakgwa"]) > 2.0
    assert _differ(images["gimjang"], images["hanok"]) > 2.0
    assert _differ(images["gimjang"], plain.images[0]) > 2.0  # same prompt and seed: only the LoRA differs


def test_batches_split_only_on_incompatible_parameters(gen, monkeypatch):
    batches = []
    diffuse = gen._diffuse
    monkeypatch.setattr(gen, "_diffuse", lambda key, jobs: batches.append((key, len(jobs))) or diffuse(key, jobs))
    monkeypatch.setattr(gen, "cfg", gen.cfg.model_copy(update={"max_batch_size": 2}))
    reqs = [{"prompt": p, "seed": 1, "steps": STEPS} for p in ("김장", "약과", "한옥")]
    reqs.append({"prompt": "김장", "seed": 1, "steps": STEPS + 1, "num_images": 2})
    results = gen.generate_batch(reqs)
    assert [n for _, n in batches] == [2, 1, 2]  # max_batch_size 2; other steps in its own batch
    assert len(results[3].images) == 2 and not _same(results[3].images[0], results[3].images[1])


def test_negative_prompt_and_sampler_per_request(gen, monkeypatch):
    from tipsen.generate import SAMPLERS

    base = {"prompt": "a quiet morning by the sea", "seed": 5, "steps": STEPS}
    plain = gen.generate(base)
    assert plain.metadata["negative_prompt"] == gen.cfg.negative_prompt == "" and plain.metadata["sampler"] is None
    assert plain.metadata["sampler_name"] == type(gen.pipe.scheduler).__name__  # the model's own
    negative = gen.generate({**base, "negative_prompt": "blurry, text, watermark"})
    assert negative.metadata["negative_prompt"] == "blurry, text, watermark"
    assert _differ(plain.images[0], negative.images[0]) > 0.5  # the negative prompt steers the picture
    default_negative = gen.cfg.model_copy(update={"negative_prompt": "blurry, text, watermark"})
    monkeypatch.setattr(gen, "cfg", default_negative)  # generate.negative_prompt is the default...
    assert _same(gen.generate(base).images[0], negative.images[0])
    assert _same(gen.generate({**base, "negative_prompt": ""}).images[0], plain.images[0])  # ..."" turns it off
    monkeypatch.undo()

    batches = []
    diffuse = gen._diffuse
    monkeypatch.setattr(gen, "_diffuse", lambda key, jobs: batches.append(key[-1]) or diffuse(key, jobs))
    reqs = [{**base, "sampler": name} for name in SAMPLERS]
    mixed = gen.generate_batch([*reqs, base])
    assert sorted(batches, key=str) == sorted([*SAMPLERS, None], key=str)  # the sampler splits the batch
    names = [r.metadata["sampler_name"] for r in mixed]
    assert names[:-1] == ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "DDIM"]
    assert _differ(mixed[SAMPLERS.__len__() - 1].images[0], plain.images[0]) > 0.5  # DDIM draws otherwise
    assert _same(mixed[-1].images[0], plain.images[0])  # and the model's own scheduler is back afterwards
    for req, result in zip(reqs, mixed):
        assert _same(gen.generate(req).images[0], result.images[0]), req  # reproducible, alone or batched
    assert type(gen.pipe.scheduler).__name__ == plain.metadata["sampler_name"]


def test_bad_negative_prompt_and_sampler_name_the_field(gen):
    with pytest.raises(ConfigError, match=r"^sampler: Input should be 'euler', 'euler_a', .* or 'ddim' \(got 'k_lms'\)"):
        gen.resolve({"prompt": "x", "sampler": "k_lms"})
    with pytest.raises(ConfigError, match=r"^negative_prompt: 1001 characters; allowed: at most 1000"):
        gen.resolve({"prompt": "x", "negative_prompt": "a" * 1001})
    plan = gen.resolve({"prompt": "the sea", "negative_prompt": "흐릿한"})
    assert any("negative_prompt: SDXL reads only English" in w for w in plan.warnings)


def test_bad_input_names_field_and_choices(gen):
    with pytest.raises(ConfigError, match=r"keyword: unknown keyword 'bulgogi'; allowed: .*gimjang.*yakgwa"):
        gen.resolve({"prompt": "x", "keyword": "bulgogi"})
    with pytest.raises(ConfigError, match=r"width: 65 is not a multiple of 8; allowed: multiples of 8 from 32 to 256"):
        gen.resolve({"prompt": "x", "width": 65})
    with pytest.raises(ConfigError, match=r"height: 512 is out of bounds; allowed: .* to 256"):
        gen.resolve({"prompt": "x", "height": 512})
    with pytest.raises(ConfigError, match=r"prompt: empty; allowed: 1 to 1000 characters"):
        gen.resolve({"prompt": "   "})
    for field, value, bound in [("steps", 0, "1"), ("steps", 80, "50"), ("guidance", 30.0, "20"),
                                ("lora_scale", 3.0, "2"), ("num_images", 5, "4"), ("seed", 2**32, "4294967295"),
                                ("seed", -1, "0")]:
        with pytest.raises(ConfigError, match=rf"^{field}: .*{bound}.*\(got {value}\)"):
            gen.resolve({"prompt": "x", field: value})
    for field, value in [("steps", True), ("steps", "2"), ("guidance", "5"), ("seed", 3.0)]:  # strict types
        with pytest.raises(ConfigError, match=rf"^{field}: Input should be a valid (integer|number)"):
            gen.resolve({"prompt": "x", field: value})
    with pytest.raises(ConfigError, match=r"colour: unknown field; allowed: prompt, keyword"):
        gen.resolve({"prompt": "x", "colour": "red"})


def test_long_prompt_truncated_with_warning(gen, caplog):
    prompt = "김장하는 할머니들 " * 200
    with caplog.at_level(logging.WARNING, logger="tipsen.generate"):
        assert len(gen.resolve({"prompt": prompt}).input) == 1000
    assert any("truncated" in r.getMessage() for r in caplog.records)
    result = gen.generate({"prompt": prompt, "seed": 0, "steps": STEPS})
    assert result.metadata["keyword"] == "gimjang"
    assert any("truncated from 1999 to 1000" in w for w in result.metadata["warnings"])


def test_corrupt_adapter_unavailable_others_serve(demo_params, lora_root, registry, tmp_path):
    from tipsen.generate import Generator

    root = _copy_bank(lora_root, tmp_path, registry)
    weights = root / "loras" / "yakgwa" / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])  # flipped after the bank was built
    weights.write_bytes(bytes(data))
    gen = Generator(demo_params, bank=root / "bank.json", registry=registry)
    adapters = gen.status()["adapters"]
    assert adapters["yakgwa"] == {"available": False, "reason": "checksum mismatch", "keyword": "Yakgwa",
                                  "ko": registry["yakgwa"].ko, "class_token": registry["yakgwa"].class_token}
    assert adapters["gimjang"]["available"] and adapters["hanok"]["available"]
    bad, good = gen.generate_batch([{"prompt": "약과", "seed": 1, "steps": STEPS},
                                    {"prompt": "김장", "seed": 1, "steps": STEPS}])
    assert bad.metadata["keyword"] == "yakgwa" and bad.metadata["adapter"] is None
    assert any("checksum mismatch" in w for w in bad.metadata["warnings"])
    assert good.metadata["adapter"] == "gimjang"
    # Named explicitly, the keyword must be drawn with its adapter: a refusal, not a quiet base-model picture
    # (the service answers 400 with the same line: tests/test_service.py).
    with pytest.raises(ConfigError, match=r"^keyword: 'yakgwa' is unavailable \(checksum mismatch\); "
                                          r"allowed: gimjang, hanok$"):
        gen.resolve({"prompt": "x", "keyword": "yakgwa"})
    base = gen.resolve({"prompt": "x", "keyword": "yakgwa", "use_lora": False})  # the base model, as asked
    assert base.adapter is None and base.route.slug == "yakgwa" and base.warnings == ()


def test_cli_refuses_an_explicit_keyword_without_adapter(demo_params, lora_root, registry, root, tmp_path, capsys):
    from tipsen.cli import main

    bank = _copy_bank(lora_root, tmp_path, registry) / "bank.json"
    (tmp_path / "loras" / "hanok" / "pytorch_lora_weights.safetensors").unlink()
    out = tmp_path / "out.png"
    code = main(["generate", "우리 한옥", "--keyword", "hanok", "--params", str(root / "params.yaml"),
                 "--profile", "demo", "--out", str(out), "--steps", str(STEPS), "--bank", str(bank)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1] == ("tipsen generate: error: keyword: 'hanok' is unavailable (file missing: "
                       "pytorch_lora_weights.safetensors); allowed: gimjang, yakgwa")


def test_sdxl_reads_english_only(gen, registry):
    """With the assistant off, Korean words never reach SDXL: each routed keyword's template and description do;
    Korean words with no keyword are a NoTopic error; English words pass through after the template."""
    from tipsen.errors import NoTopic

    two = gen.resolve({"prompt": "송편을 먹고 강강술래를 했지요"})
    assert two.prompt == (f"A photo of Songpyeon Food, {registry['songpyeon'].description}; "
                          f"A photo of Ganggangsullae Dance, {registry['ganggangsullae'].description}")
    assert not any("\uac00" <= ch <= "\ud7a3" for ch in two.prompt) and two.input == "송편을 먹고 강강술래를 했지요"
    with pytest.raises(NoTopic, match=r"^prompt: no topic was recognised .* Topics: 약과 \(yakgwa\), 첨성대"):
        gen.resolve({"prompt": "바닷가에서 조개를 줍던 여름"})
    assert gen.resolve({"prompt": "a quiet morning by the sea"}).prompt == "a quiet morning by the sea"
    assert gen.resolve({"prompt": "grandma making kimbap"}).prompt == "A photo of Kimbap Food, grandma making kimbap"
    assert gen.resolve({"prompt": "바닷가에서 조개를 줍던 여름", "keyword": "hanok"}).prompt.startswith(
        "A photo of Hanok House, ")  # an explicit keyword is a topic


def test_plans_are_resolved_once_and_rendered_as_given(gen, demo_params, registry):
    import dataclasses

    from tipsen.generate import Generator, Plan

    plan = gen.resolve({"prompt": "어릴 적 김장하던 날", "seed": 3, "steps": STEPS})
    assert isinstance(plan, Plan) and dataclasses.is_dataclass(plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 4
    assert (plan.adapter, plan.lora_scale, plan.width, plan.height, plan.steps, plan.guidance) == \
        ("gimjang", 0.7, 64, 64, STEPS, 5.0)
    assert plan.prompt == f"A photo of Gimjang Tradition, {registry['gimjang'].description}"
    assert plan.input == "어릴 적 김장하던 날"
    rendered = gen.render([plan])[0]
    assert _same(rendered.images[0], gen.generate({"prompt": "어릴 적 김장하던 날", "seed": 3, "steps": STEPS}).images[0])
    # A plan built by hand is drawn exactly as given: here the bare template, with no words appended.
    bare = dataclasses.replace(plan, prompt="A photo of Gimjang Tradition")
    assert gen.render([bare])[0].metadata["prompt"] == "A photo of Gimjang Tradition"
    assert not _same(gen.render([bare])[0].images[0], rendered.images[0])
    with pytest.raises(ValueError, match="not resolved for this generator"):
        gen.render([dataclasses.replace(plan, adapters=("sebae",))])  # not in this bank
    plain = Generator(demo_params, bank=None, registry=registry)  # no bank: no adapters, none loaded
    assert plain.status()["adapters"] == {} and plain.status()["bank"] == {
        "path": None, "error": None, "refused": {}, "version": 1, "load_s": 0.0, "resident_bytes": 0}
    assert plain.resolve({"prompt": "김장", "steps": STEPS}).adapter is None
    with pytest.raises(ConfigError, match=r"^keyword: 'gimjang' has no adapter: no bank is loaded"):
        plain.resolve({"prompt": "김장", "keyword": "gimjang"})


def test_pickle_is_never_loaded(demo_params, lora_root, registry, tmp_path, monkeypatch):
    import torch

    from tipsen.generate import Generator
    from tipsen.io import sha256_file, write_json_atomic

    root = _copy_bank(lora_root, tmp_path, registry)
    for slug in ("gimjang", "hanok"):  # a pickle beside a missing safetensors file
        weights = root / "loras" / slug / "pytorch_lora_weights.safetensors"
        from safetensors.torch import load_file

        torch.save(load_file(weights), weights.with_suffix(".bin"))  # a real, loadable pickle of the same weights
        weights.unlink()
    index = json.loads((root / "bank.json").read_text())
    hanok = next(e for e in index["adapters"] if e["slug"] == "hanok")
    hanok["path"] = hanok["path"].replace(".safetensors", ".bin")  # an index pointing at the pickle itself
    hanok["sha256"] = sha256_file(root / hanok["path"])
    write_json_atomic(root / "bank.json", index)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)  # a guard: any pickle load would fail the adapter differently
    status = Generator(demo_params, bank=root / "bank.json", registry=registry).status()["adapters"]
    assert status["gimjang"] == {**status["gimjang"], "available": False,
                                 "reason": "file missing: pytorch_lora_weights.safetensors"}
    assert status["hanok"]["reason"] == "not a safetensors file: pytorch_lora_weights.bin"
    assert status["yakgwa"]["available"]


def test_missing_bank_serves_base_model(demo_params, registry, tmp_path):
    from tipsen.generate import Generator

    gen = Generator(demo_params, bank=tmp_path / "nope" / "bank.json", registry=registry)
    status = gen.status()
    assert status["adapters"] == {} and "not found" in status["bank"]["error"]
    result = gen.generate({"prompt": "김장", "seed": 0, "steps": STEPS})
    assert result.metadata["keyword"] == "gimjang" and result.metadata["adapter"] is None
    assert any("not found" in w for w in result.metadata["warnings"])


def test_fused_lora_matches_unfused_and_unfuses_on_switch(demo_params, lora_root, registry, gen):
    from tipsen.generate import Generator

    params = demo_params.model_copy(update={"generate": demo_params.generate.model_copy(update={"fuse_lora": True})})
    fused = Generator(params, bank=lora_root / "bank.json", registry=registry)
    g = {"prompt": "김장", "seed": 5, "steps": STEPS}
    y = {"prompt": "약과", "seed": 6, "steps": STEPS, "lora_scale": 1.2}
    first = fused.generate(g)
    assert fused.status()["fused"] == "gimjang"
    assert _same(first.images[0], gen.generate(g).images[0])
    assert _same(fused.generate(y).images[0], gen.generate(y).images[0])
    assert fused.status()["fused"] == "yakgwa"
    mixed = fused.generate_batch([g, y, {"prompt": "sea", "seed": 1, "steps": STEPS}])  # unfuses: mixed path
    assert fused.status()["fused"] is None
    assert _same(mixed[0].images[0], first.images[0]) and _same(mixed[1].images[0], gen.generate(y).images[0])


def test_assistant_prompt_is_used(demo_params, gen, monkeypatch):
    from pydantic import BaseModel

    # A stand-in for tipsen.assistant (built separately); only its settle() and refine_batch() contract matters.
    class Refined(BaseModel):
        prompt: str
        backend: str = "stub"

    calls = []

    class Stub:
        def settle(self, texts, routes):
            return routes

        def refine_batch(self, prompts, keywords=None, seeds=None):
            calls.extend(zip(prompts, [k.slug for k in keywords], seeds))
            return [Refined(prompt="A photo of Gimjang Tradition, grandmothers salting cabbages") for _ in prompts]

    monkeypatch.setattr(gen, "assistant", Stub())
    result = gen.generate({"prompt": "김장하는 할머니들", "seed": 4, "steps": STEPS, "assist": True})
    assert calls == [("김장하는 할머니들", "gimjang", 4)]
    assert result.metadata["prompt"] == "A photo of Gimjang Tradition, grandmothers salting cabbages"
    assert result.metadata["refined"] == {"prompt": result.metadata["prompt"], "backend": "stub"}


def test_cli_writes_png_and_prints_json(root, lora_root, tmp_path, capsys):
    from PIL import Image

    from tipsen.cli import main

    out = tmp_path / "out.png"
    code = main(["generate", "김장하는 할머니들", "--params", str(root / "params.yaml"), "--profile", "demo",
                 "--out", str(out), "--seed", "9", "--steps", str(STEPS), "--bank", str(lora_root / "bank.json")])
    stdout = capsys.readouterr().out
    assert code == 0 and "김장하는 할머니들" in stdout  # ensure_ascii=False
    meta = json.loads(stdout)
    assert meta["keyword"] == "gimjang" and meta["seed"] == 9 and meta["files"] == [str(out)]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)
        own = json.loads(image.text["tipsen"])
        parameters = image.text["parameters"]
    assert own["seed"] == 9 and own["input"] == "김장하는 할머니들" and own["route"]["slug"] == "gimjang"
    assert "timings" not in own and own["adapter_sha256"] == meta["adapter_sha256"] and len(meta["adapter_sha256"]) == 64
    prompt, negative, pairs = a1111_png_info(parameters)  # AUTOMATIC1111's "PNG info" reading
    assert prompt == meta["prompt"] and negative == ""
    from tipsen import __version__

    assert pairs == {"Steps": str(STEPS), "Sampler": meta["sampler_name"], "CFG scale": "5.0", "Seed": "9",
                     "Size": "64x64", "Model": "tiny:sdxl", "Lora hashes": f'"gimjang: {meta["adapter_sha256"][:12]}"',
                     "Version": f"tipsen {__version__}"}
    first = out.read_bytes()
    assert main(["generate", "김장하는 할머니들", "--params", str(root / "params.yaml"), "--profile", "demo",
                 "--out", str(out), "--seed", "9", "--steps", str(STEPS), "--bank", str(lora_root / "bank.json"),
                 "--num-images", "2", "--negative-prompt", "blurry, text", "--sampler", "euler_a"]) == 0
    capsys.readouterr()
    assert out.with_name("out-0.png").read_bytes() != first  # another sampler and negative prompt
    with Image.open(out.with_name("out-1.png")) as image:
        prompt, negative, pairs = a1111_png_info(image.text["parameters"])
    assert negative == "blurry, text" and pairs["Sampler"] == "Euler a" and pairs["Seed"] == "10"  # image 1: seed + 1
    assert main(["generate", "김장하는 할머니들", "--params", str(root / "params.yaml"), "--profile", "demo",
                 "--out", str(out), "--seed", "9", "--steps", str(STEPS), "--bank", str(lora_root / "bank.json")]) == 0
    assert out.read_bytes() == first  # same request and seed, same bytes: no timings in the file
    capsys.readouterr()
    for extra in ("out-0.png", "out-1.png"):
        out.with_name(extra).unlink()
    assert main(["generate", "grandma's kitchen", "--params", str(root / "params.yaml"), "--profile", "demo",
                 "--out", str(out), "--seed", "9", "--steps", str(STEPS), "--bank", str(lora_root / "bank.json"),
                 "--keyword", "yakgwa", "--keyword", "gimjang"]) == 0  # two keywords in one picture
    both = json.loads(capsys.readouterr().out)
    assert [a["slug"] for a in both["adapters"]] == ["yakgwa", "gimjang"]
    with Image.open(out) as image:
        hashes = a1111_png_info(image.text["parameters"])[2]["Lora hashes"]
    assert hashes == f'"yakgwa: {both["adapters"][0]["sha256"][:12]}, gimjang: {both["adapters"][1]["sha256"][:12]}"'
    code = main(["generate", "x", "--params", str(root / "params.yaml"), "--profile", "demo", "--out", str(out),
                 "--steps", "99", "--bank", str(lora_root / "bank.json")])
    assert code == 2 and "steps:" in capsys.readouterr().err
    folder = tmp_path / "a-folder"
    (folder / "x").mkdir(parents=True)  # --out names a folder that is not empty: the PNG cannot replace it
    code = main(["generate", "김장", "--params", str(root / "params.yaml"), "--profile", "demo", "--out",
                 str(folder), "--seed", "1", "--steps", str(STEPS), "--bank", str(lora_root / "bank.json")])
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == \
        f"tipsen generate: error: --out {folder}: is a folder; give the PNG's file name"
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    code = main(["generate", "김장", "--params", str(root / "params.yaml"), "--profile", "demo", "--out",
                 str(blocked / "x.png"), "--seed", "1", "--steps", str(STEPS), "--bank", str(lora_root / "bank.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == f"tipsen generate: error: {blocked}: is a file, where a folder is needed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "blocked", "out.png"]  # no temp file left


def test_sd1_base_generates_through_the_same_generator(demo_params, lora_root, registry):
    from tipsen.generate import Generator

    gen = Generator(demo_params, base="tiny:sd", bank=lora_root / "bank.json", registry=registry)
    status = gen.status()
    assert status["pipeline"] == "StableDiffusionPipeline"
    assert all(not a["available"] and "another base model" in a["reason"] for a in status["adapters"].values())
    a = gen.generate({"prompt": "김장", "seed": 2, "steps": STEPS})
    b = gen.generate({"prompt": "김장", "seed": 2, "steps": STEPS})
    assert a.images[0].size == (64, 64) and a.metadata["model"] == "tiny:sd" and a.metadata["adapter"] is None
    assert np.array_equal(_pixels(a.images[0]), _pixels(b.images[0]))


def test_a_replacement_with_nans_leaves_the_old_adapter_drawing(demo_params, lora_root, tmp_path, registry):
    """A retrained file that passes its checksum but holds a NaN fails the store's finiteness pass after stacking:
    the adapter it replaces keeps serving, with its weights really in the new version's stacks."""
    import torch
    from safetensors.torch import load_file, save_file

    from tipsen.bank import WEIGHTS_NAME, build_bank
    from tipsen.generate import Generator

    root = _copy_bank(lora_root, tmp_path, registry)
    gen = Generator(demo_params, bank=root / "bank.json", registry=registry)
    req = {"prompt": "a family in autumn", "keyword": "gimjang", "seed": 4, "steps": STEPS}
    before, sha = gen.generate(req).images[0], gen.entries["gimjang"].sha256
    file = root / "loras" / "gimjang" / WEIGHTS_NAME
    tensors = load_file(str(file))
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file))
    build_bank(root / "loras", root / "bank.json", keywords=SLUGS, registry=registry, base_model="tiny:sdxl")
    changes = gen.reload()
    assert changes["kept"] == ["gimjang"] and "non-finite values" in gen.reasons["gimjang"]
    assert all("gimjang" in s.slot for s in gen.store.version.stacks.values())
    after = gen.generate(req)
    assert after.metadata["adapter_sha256"] == sha and _same(after.images[0], before)
    assert torch.isfinite(torch.tensor(np.asarray(after.images[0], dtype=np.float32))).all()
