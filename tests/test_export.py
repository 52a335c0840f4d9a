"""`tipsen export`: a trained adapter in the kohya/A1111 layout, loaded back by diffusers' non-diffusers path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tipsen.bank import WEIGHTS_NAME, build_bank
from tipsen.cli import main
from tipsen.testing import write_curated
from tipsen.train import train

SLUG, OTHER = "yakgwa", "gimjang"


@pytest.fixture(scope="module")
def bank(tmp_path_factory, demo_params, registry) -> Path:
    """A bank of one adapter made by the trainer, with alpha twice its rank (scale 2, so a lost alpha shows), and a
    second entry whose file was damaged after indexing."""
    tmp = tmp_path_factory.mktemp("export")
    write_curated(tmp / "data", SLUG, registry=registry)
    params = demo_params.model_copy(update={"train": demo_params.train.model_copy(
        update={"steps": 2, "rank": 4, "alpha": 8.0, "validation_seeds": [], "learning_rate": 1e-2})})
    train(params, SLUG, tmp / "data", tmp / "models" / "loras" / SLUG, checkpoint_dir=tmp / "ckpt", progress=False)
    broken = tmp / "models" / "loras" / OTHER
    broken.mkdir()
    (broken / WEIGHTS_NAME).write_bytes((tmp / "models" / "loras" / SLUG / WEIGHTS_NAME).read_bytes())
    index = tmp / "models" / "bank.json"
    build_bank(tmp / "models" / "loras", index, keywords=[SLUG, OTHER], registry=registry, base_model="tiny:sdxl")
    (broken / WEIGHTS_NAME).write_bytes((broken / WEIGHTS_NAME).read_bytes()[:-4])  # no longer the indexed file
    return index


def _draw(pipe, **lora):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="A photo of Yakgwa Food", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_kohya_file_draws_what_the_adapter_draws(bank, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tipsen.models import resolve_ref

    out = tmp_path / "yakgwa_kohya.safetensors"
    assert main(["export", SLUG, "--format", "kohya", "--out", str(out), "--bank", str(bank)]) == 0
    report = json.loads(capsys.readouterr().out)
    tensors = load_file(out)
    assert report["tensors"] == len(tensors) and report["trigger"] == "Yakgwa Food"
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and meta["ss_output_name"] == SLUG
    assert meta["ss_sd_model_name"] == "tiny:sdxl" and meta["ss_steps"] == "2" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"]) == {SLUG: {"Yakgwa Food": 1}}
    assert meta["ss_base_model_version"] == "unknown"  # tiny:sdxl's cross-attention width is none of SD's
    blob = out.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    import hashlib

    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest() == report["sha256"]

    # a loader nobody here wrote: diffusers' non-diffusers (kohya) path, against the diffusers-format adapter
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_ref("tiny:sdxl"), use_safetensors=True)
    base = _draw(pipe)
    pipe.load_lora_weights(str(bank.parent / "loras" / SLUG), adapter_name="diffusers", use_safetensors=True)
    ours = _draw(pipe)
    pipe.delete_adapters("diffusers")
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    theirs = _draw(pipe)
    assert np.abs(ours - base).max() > 1e-3  # the adapter changes the picture
    assert np.abs(theirs - ours).max() < 1e-5  # and the kohya file draws the same one

    # round trip: diffusers reads the kohya file back into its own layout, the same update at every layer
    from diffusers.utils import convert_unet_state_dict_to_peft

    def peft(state):
        return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})

    back, alphas = StableDiffusionXLPipeline.lora_state_dict(str(out))
    back, original = peft(back), peft(load_file(bank.parent / "loras" / SLUG / WEIGHTS_NAME))
    assert sorted(back) == sorted(original) and len(original) == len(tensors) * 2 // 3
    assert all(torch.equal(back[k], original[k]) for k in original)  # the same tensors, bit for bit
    assert len(alphas) == len(original) // 2 and set(alphas.values()) == {8.0}  # and each layer's alpha


def test_export_all_costs_a_broken_adapter_only_itself(bank, tmp_path, capsys):
    assert main(["export", "--all", "--out", str(tmp_path / "all"), "--bank", str(bank)]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["slug"] for line in captured.out.splitlines()] == [SLUG]
    assert f"tipsen export: {OTHER}: slug: {OTHER!r} cannot be exported: checksum mismatch" in captured.err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [f"{SLUG}.safetensors"]


@pytest.mark.parametrize("argv, says", [
    (["export", "nosuch", "--out", "x.safetensors"], "slug"),
    (["export", "--out", "x.safetensors"], "slug: name one adapter's slug, or pass --all"),
    (["export", "yakgwa", "--all", "--out", "x"], "not both"),
    (["export", "yakgwa", "--format", "ckpt", "--out", "x"], "invalid choice: 'ckpt'"),
])
def test_bad_export_requests_are_one_line(bank, tmp_path, monkeypatch, capsys, argv, says):
    import contextlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if "--format" in argv else contextlib.nullcontext():  # argparse's own exit 2
        assert main([*argv, "--bank", str(bank)]) != 0
    err = capsys.readouterr().err
    assert says in err.strip().splitlines()[-1] and "Traceback" not in err  # one line (argparse's usage above it)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_bank_built_from_kohya_files_draws_the_same(bank, tmp_path, demo_params, registry, capsys):
    """Adapters trained elsewhere, in the kohya layout: indexed and verified as the bank's own, drawn the same."""
    from tipsen.generate import Generator

    other = tmp_path / "models"
    (other / "loras" / SLUG).mkdir(parents=True)
    assert main(["export", SLUG, "--out", str(other / "loras" / SLUG / WEIGHTS_NAME), "--bank", str(bank)]) == 0
    capsys.readouterr()
    index = build_bank(other / "loras", other / "bank.json", keywords=[SLUG], registry=registry,
                       base_model="tiny:sdxl")
    (entry,) = index["adapters"]
    assert (entry["layout"], entry["rank"], entry["alpha"]) == ("kohya", 4, 8.0)  # from its ss_* metadata
    ours = json.loads(bank.read_text())["adapters"][0]
    assert (ours["layout"], ours["rank"], ours["alpha"]) == ("diffusers", 4, 8.0)

    request = {"prompt": "A photo of Yakgwa Food", "keyword": SLUG, "seed": 3, "steps": 2}
    drawn = [Generator(demo_params, bank=b, registry=registry).generate(request) for b in (bank, other / "bank.json")]
    assert all(d.metadata["adapter"] == SLUG for d in drawn)
    a, b = (np.asarray(d.images[0], dtype=np.int16) for d in drawn)
    assert np.abs(a - b).max() <= 1  # the same picture, through the same mixed-batch path

    weights = other / "loras" / SLUG / WEIGHTS_NAME  # and the same checks: a changed byte is refused, not drawn
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    broken = Generator(demo_params, bank=other / "bank.json", registry=registry)
    assert broken.status()["adapters"][SLUG]["reason"] == "checksum mismatch"
