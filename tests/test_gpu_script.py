"""The GPU benchmark script must not rot: `--smoke` runs every section on the CPU (tiny configs derived from the real
SDXL ones, 64 px, fp32) and must report numbers for each. No timing is asserted."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0, as published: the configs in the repo must match.
SDXL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_smoke")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_sdxl", "--smoke", "--out", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "UNet at 64 px" in proc.stdout and "LoRA training step" in proc.stdout  # the printed table
    return json.loads((out / "gpu_sdxl-smoke.json").read_text())


@pytest.mark.slow  # reads the --smoke run of every section
def test_every_section_reports_numbers(smoke):
    assert smoke["status"] == "complete" and smoke["errors"] == {}
    res = smoke["results"]
    assert set(res) == {"infer", "train", "vae", "text", "compile"}
    rows = res["infer"]["rows"]
    expected = {(v, b) for v in ("base", "lora", "fused") for b in (1, 8)} | {("mixed", 8)}
    assert {(r["variant"], r["batch"]) for r in rows} == expected
    for r in rows:
        assert r["unet_batch"] == 2 * r["batch"]  # classifier-free guidance doubles the UNet batch
        assert all(_num(r["s_per_step"][k]) and r["s_per_step"][k] > 0 for k in ("median", "min", "max"))
        assert r["s_per_step"]["min"] <= r["s_per_step"]["median"] <= r["s_per_step"]["max"]
        assert _num(r["images_per_s"]) and _num(r["tflops"]) and r["tflops"] > 0 and r["finite"]
        assert r["s_per_image"] == pytest.approx(28 * r["s_per_step"]["median"] / r["batch"])
    train = res["train"]
    assert train["batch"] == 2 and train["rank"] == 20 and train["trainable_params"] > 0 and train["loss_finite"]
    assert train["projected_500_steps_s"] == pytest.approx(500 * train["s_per_step"]["median"])
    assert _num(train["tflops"]) and _num(train["last_loss"])
    for section in ("vae", "text"):
        assert [r["batch"] for r in res[section]["rows"]] == [1, 8]
        assert all(_num(r["s_per_image"]) and r["s_per_image"] > 0 for r in res[section]["rows"])
    (row,) = res["compile"]["rows"]
    assert "error" not in res["compile"], res["compile"]
    assert _num(row["compile_s"]) and _num(row["speedup"]) and _num(row["compiled_s_per_step"]["median"])


@pytest.mark.slow  # reads the --smoke run of every section
def test_mixed_batch_computes_each_samples_own_adapter(smoke):
    assert smoke["results"]["infer"]["mixed_path"].startswith("tipsen.lora_batch")  # the serving path is measured
    check = smoke["results"]["infer"]["mixed_check"]
    assert check["max_abs_diff_between_adapters"] > 1e-2  # the adapters really differ...
    assert check["ratio"] < 1e-4  # ...and each sample of the mixed batch got its own


@pytest.mark.slow  # reads the --smoke run of every section
def test_flops_counted_and_configs_are_sdxl(smoke):
    flops = smoke["flops"]
    assert flops["unet_forward"] > 0 and flops["vae_decode"] > 0 and flops["text_encode"] > 0
    assert any("attention" in op for op in flops["unet_forward_ops"])  # attention counted, not only matmuls
    assert flops["train_step"] > 2 * flops["unet_forward"]  # batch 2 forward plus the backward
    assert smoke["params"]["published_params"] == SDXL_PARAMS
    assert smoke["params"]["resolution"] == 64 and smoke["params"]["dtype"] == "float32"
    summary = smoke["summary"]
    assert summary["image_tflop_cfg"] * 1e12 == pytest.approx(
        28 * 2 * flops["unet_forward"] + flops["vae_decode"] + flops["text_encode"])
    assert summary["meets_target_s_per_image"] is None  # no verdict from a CPU smoke run


def test_bad_section_is_a_usage_error():
    from benchmarks.gpu_sdxl import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--sections", "infer,warp"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_without_gpu_the_full_run_refuses_cleanly(capsys):
    from benchmarks.gpu_sdxl import main

    assert main(["--sections", "vae"]) == 2
    assert "--smoke" in capsys.readouterr().err
