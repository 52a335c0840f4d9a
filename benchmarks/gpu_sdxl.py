"""SDXL at 1024 px on one CUDA GPU: UNet and LoRA inference (unfused, fused, 8 adapters in one mixed batch),
torch.compile, VAE decode, text encoding and one LoRA training step, with achieved TFLOP/s and peak memory.

The models are built from the published SDXL base 1.0 configs in benchmarks/configs/ with random weights: speed does
not depend on weight values, and nothing is downloaded. `--smoke` runs every section on the CPU in fp32 with
scaled-down configs derived from the same files, at 64 px.

    python -m benchmarks.gpu_sdxl                       # on any CUDA machine, < 8 min on an H200
    python -m benchmarks.gpu_sdxl --smoke               # CPU, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

try:  # the shared harness when run inside the repository; minimal stand-ins when this file travels alone
    from benchmarks import common
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from benchmarks import common
    except ImportError:
        common = None

try:
    from tipsen.io import write_text_atomic
except ImportError:
    write_text_atomic = None

NAME = "gpu_sdxl"
HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
SECTIONS = ("infer", "train", "vae", "text", "compile")  # most important first: a timeout keeps what matters
VARIANTS = ("base", "lora", "fused", "mixed")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
N_ADAPTERS = 8
REF = {"unet_forward_tflop": 6.8, "image_tflop_28_cfg": 389.0, "target_s_per_image_lora": 1.0,
       "target_train_500_steps_s": 180.0}  # public figures and our targets, compared against, never substituted
# Dense bf16 tensor TFLOP/s by device name, first match wins (so "H100 PCIe" precedes "H100", "A100" precedes "A10").
# H200: the figure our targets are quoted against; NVIDIA's SXM datasheet says 989 dense.
PEAK_TFLOPS = [("GH200", 989.0), ("H200", 790.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
               ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("4090", 165.0)]


# ---- harness -------------------------------------------------------------------------------------------------------
def summarize(samples: list[float]) -> dict[str, float]:
    if common is not None:
        return common.summarize(samples)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def machine_info(device: torch.device, peak: float | None, peak_source: str) -> dict[str, Any]:
    info = common.machine_info() if common is not None else {"cuda": torch.cuda.is_available()}
    info["versions"] = {**info.get("versions", {}), **_versions()}
    info["device"] = str(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    sm_count=p.multi_processor_count, cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    info.update(peak_tflops=peak, peak_tflops_source=peak_source)
    return info


def _versions() -> dict[str, str]:
    import diffusers, peft, transformers  # noqa: E401

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__}


def clock(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call: CUDA events around it on a GPU (synchronised before and after), wall time on the CPU."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def alternate(fns: dict[str, Callable[[], Any]], device: torch.device, reps: int, warmup: int) -> dict[str, dict]:
    """Warm every variant up, then time them in alternating order (A B C, C B A, ...) so drift cancels."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(reps):
        for k in order if i % 2 == 0 else order[::-1]:
            samples[k].append(clock(fns[k], device))
    return {k: summarize(v) for k, v in samples.items()}


def memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, float | None]]:
    """One extra call with the allocator's peak reset: weights resident before it, and the peak during it (GiB)."""
    if device.type != "cuda":
        return fn(), {"resident_gib": None, "peak_gib": None}
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, {"resident_gib": resident / 2**30, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call (forward and any backward it runs), with the per-op breakdown."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    raw = {}  # the CPU attention kernels have no formula upstream; same arithmetic as the CUDA ones
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        f = lambda q, k, v, *a, **kw: sdpa_flop_count(q.shape, k.shape, v.shape)  # noqa: E731
        f._get_raw = True
        raw[aten._scaled_dot_product_flash_attention_for_cpu] = f
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        b = lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)  # noqa: E731
        b._get_raw = True
        raw[aten._scaled_dot_product_flash_attention_for_cpu_backward] = b
    mode = FlopCounterMode(display=False, custom_mapping=raw)
    with mode:
        fn()
    ops = {str(op).split(".")[-1]: int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}
    return int(mode.get_total_flops()), ops


# ---- models --------------------------------------------------------------------------------------------------------
def load_configs(smoke: bool) -> dict[str, dict]:
    cfg = {k: json.loads((CONFIGS / f"sdxl_{k}.json").read_text()) for k in
           ("unet", "vae", "text_encoder", "text_encoder_2")}
    check_coherent(cfg)
    if smoke:
        cfg = scale_down(cfg)
        check_coherent(cfg)
    return cfg


def check_coherent(cfg: dict[str, dict]) -> None:
    """The UNet's conditioning widths must follow from the text encoders', as in the SDXL pipeline."""
    u, t1, t2 = cfg["unet"], cfg["text_encoder"], cfg["text_encoder_2"]
    assert u["cross_attention_dim"] == t1["hidden_size"] + t2["hidden_size"], "cross_attention_dim"
    assert u["projection_class_embeddings_input_dim"] == 6 * u["addition_time_embed_dim"] + t2["projection_dim"]
    assert u["in_channels"] == cfg["vae"]["latent_channels"], "latent channels"


def scale_down(cfg: dict[str, dict]) -> dict[str, dict]:
    """Tiny configs derived from the real ones: same block types and wiring, narrower and fewer layers."""
    te = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    t1, t2 = {**cfg["text_encoder"], **te}, {**cfg["text_encoder_2"], **te}
    u = cfg["unet"]
    unet = {**u, "block_out_channels": [32, 64], "layers_per_block": 1, "down_block_types": u["down_block_types"][:2],
            "up_block_types": u["up_block_types"][-2:], "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4], "addition_time_embed_dim": 8, "sample_size": 8,
            "cross_attention_dim": t1["hidden_size"] + t2["hidden_size"],
            "projection_class_embeddings_input_dim": 6 * 8 + t2["projection_dim"]}
    vae = {**cfg["vae"], "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
           "sample_size": 64}  # 4 blocks kept: the 8x latent scale must hold
    return {"unet": unet, "vae": vae, "text_encoder": t1, "text_encoder_2": t2}


def build(kind: str, cfg: dict, device: torch.device | str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):  # random init on the device itself: seconds, not minutes, for 2.6 B parameters
        if kind == "unet":
            return UNet2DConditionModel.from_config(cfg)
        if kind == "vae":
            return AutoencoderKL.from_config(cfg)
        text_cls = CLIPTextModelWithProjection if kind == "text_encoder_2" else CLIPTextModel
        return text_cls(CLIPTextConfig.from_dict(cfg))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def published_params() -> dict[str, int]:
    """Parameter counts of the real configs, built on the meta device (no memory, no time)."""
    return {k: n_params(build(k, c, "meta")) for k, c in load_configs(smoke=False).items()}


def add_adapters(unet: torch.nn.Module, names: list[str], rank: int, *, random_b: bool) -> None:
    from peft import LoraConfig

    for name in names:  # alpha = rank: scale 1.0, as the diffusers DreamBooth scripts do
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
            warnings.simplefilter("ignore", UserWarning)
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                        init_lora_weights=not random_b), adapter_name=name)


@contextlib.contextmanager
def adapter_names(unet: torch.nn.Module, names: list[str]):
    """One adapter per sample: every peft LoraLayer receives `adapter_names` through a forward pre-hook."""
    from peft.tuners.lora import LoraLayer

    hook = lambda module, args, kwargs: (args, {**kwargs, "adapter_names": names})  # noqa: E731
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


try:
    from tipsen.lora_batch import per_sample
except ImportError:
    per_sample = None
MIXED_PATH = "peft adapter_names" if per_sample is None else "tipsen.lora_batch.per_sample (gathered)"


# ---- the run -------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
            torch.float32 if self.device.type == "cpu" else
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)  # fp16 on pre-Ampere GPUs
        self.cfg = load_configs(args.smoke)
        self.latent = args.resolution // 2 ** (len(self.cfg["vae"]["block_out_channels"]) - 1)
        self.seq = self.cfg["text_encoder"]["max_position_embeddings"]
        self.template: torch.nn.Module | None = None
        self.models: dict[str, torch.nn.Module] = {}
        self.flops: dict[str, Any] = {}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        name = f"{NAME}-smoke.json" if args.smoke else f"{NAME}.json"
        self.paths = [Path(args.out or RESULTS) / name]
        peak, source = args.peak_tflops, "--peak-tflops" if args.peak_tflops else "none on the CPU"
        if peak is None and self.device.type == "cuda":
            gpu = torch.cuda.get_device_name(self.device)
            peak, source = next(((v, f"table: {k}") for k, v in PEAK_TFLOPS if k in gpu), (None, "unknown device"))
        self.peak = peak
        self.machine = machine_info(self.device, peak, source)
        self.params = {k: v for k, v in vars(args).items() if k != "out"}
        self.params["budget_s"] = None if math.isinf(args.budget_s) else args.budget_s  # JSON has no Infinity
        self.params.update(dtype=str(self.dtype).removeprefix("torch."), latent=self.latent, cfg_guidance=True,
                           lora_targets=LORA_TARGETS, n_adapters=N_ADAPTERS, published_params=published_params())

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self, *names: str) -> None:
        for n in names:
            self.models.pop(n, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unet(self, kind: str) -> torch.nn.Module:
        """base: the plain UNet; lora: 8 adapters, a0 active, unfused; fused: one adapter merged by fuse_lora."""
        if self.template is None:
            self.template = build("unet", self.cfg["unet"], self.device).to(self.dtype).eval().requires_grad_(False)
            self.params["model_params"] = {"unet": n_params(self.template)}
        if kind == "base":
            return self.template
        if kind not in self.models:
            m = copy.deepcopy(self.template)
            if kind == "lora":
                add_adapters(m, [f"a{i}" for i in range(N_ADAPTERS)], self.args.rank, random_b=True)
                m.set_adapter("a0")
            elif kind == "fused":
                add_adapters(m, ["a0"], self.args.rank, random_b=True)
                m.fuse_lora(adapter_names=["a0"])
            self.models[kind] = m.to(self.dtype).eval().requires_grad_(False)
        return self.models[kind]

    def unet_inputs(self, n: int) -> dict[str, Any]:
        u, t2, s = self.cfg["unet"], self.cfg["text_encoder_2"], self.latent
        r = self.args.resolution
        randn = lambda *shape: torch.randn(*shape, device=self.device, dtype=self.dtype)  # noqa: E731
        return {"sample": randn(n, u["in_channels"], s, s), "timestep": torch.tensor(500, device=self.device),
                "encoder_hidden_states": randn(n, self.seq, u["cross_attention_dim"]),
                "added_cond_kwargs": {"text_embeds": randn(n, t2["projection_dim"]),
                                      "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * n, device=self.device,
                                                               dtype=self.dtype)}}

    def unet_flops(self) -> int:
        if "unet_forward" not in self.flops:
            unet, x = self.unet("base"), self.unet_inputs(1)
            with torch.inference_mode():
                total, ops = count_flops(lambda: unet(**x, return_dict=False))
            self.flops.update(unet_forward=total, unet_forward_ops=ops)
        return self.flops["unet_forward"]

    def rate(self, flop: float, seconds: float) -> dict[str, float | None]:
        tflops = flop / seconds / 1e12
        return {"tflops": tflops, "pct_peak": 100 * tflops / self.peak if self.peak else None}

    # ---- sections --------------------------------------------------------------------------------------------------
    def infer(self) -> None:
        a, res = self.args, self.results.setdefault("infer", {"rows": []})
        variants = [v for v in a.variants.split(",") if v]
        per_sample = self.unet_flops()
        if "mixed" in variants:
            res["mixed_path"], res["mixed_check"] = MIXED_PATH, self.mixed_check()
        for b in a.batches:
            if self.left() < 20:
                res.setdefault("skipped", []).append({"batch": b, "why": "budget"})
                continue
            try:
                self.infer_batch(b, variants, per_sample)
            except torch.cuda.OutOfMemoryError as e:  # a smaller GPU still reports the batches that fit
                res.setdefault("skipped", []).append({"batch": b, "why": _one_line(e)})
                self.free()
            self.save()
        self.free("lora", "fused")

    def infer_batch(self, b: int, variants: list[str], per_sample: int) -> None:
        a, x, fns = self.args, self.unet_inputs(2 * b), {}
        for v in variants:
            if v == "mixed" and b < 2:
                continue  # one image per batch cannot mix adapters
            unet = self.unet("lora" if v == "mixed" else v)
            if v == "mixed":
                names = [f"a{i % N_ADAPTERS}" for i in range(b)]
                fns[v] = lambda u=unet, n=names: _mixed_call(u, x, n + n)  # CFG: uncond half, then cond half
            else:
                fns[v] = lambda u=unet: u(**x, return_dict=False)
        with torch.inference_mode():
            mem = {}
            for v, fn in fns.items():
                out, mem[v] = memory(fn, self.device)
                mem[v]["finite"] = bool(torch.isfinite(out[0]).all())
            times = alternate(fns, self.device, a.reps, a.warmup)
        for v, t in times.items():
            step = t["median"]
            self.results["infer"]["rows"].append(
                {"variant": v, "batch": b, "unet_batch": 2 * b, "s_per_step": t, "s_per_image": a.steps * step / b,
                 "images_per_s": b / (a.steps * step), **self.rate(2 * b * per_sample, step), **mem[v]})

    def mixed_check(self) -> dict[str, float]:
        """Each sample of a mixed batch must match the same adapter run alone; also how much the adapters differ."""
        unet, x = self.unet("lora"), self.unet_inputs(4)  # 2 images with CFG
        with torch.inference_mode():
            mixed = _mixed_call(unet, x, ["a0", "a1", "a0", "a1"])[0].float()
            single = {}
            for name in ("a0", "a1"):
                unet.set_adapter(name)
                single[name] = unet(**x, return_dict=False)[0].float()
            unet.set_adapter("a0")
        a0, a1 = [0, 2], [1, 3]
        diff = max((mixed[a0] - single["a0"][a0]).abs().max().item(), (mixed[a1] - single["a1"][a1]).abs().max().item())
        effect = (single["a0"][a1] - single["a1"][a1]).abs().max().item()
        return {"max_abs_diff_vs_single": diff, "max_abs_diff_between_adapters": effect,
                "ratio": diff / effect if effect else None}

    def train(self) -> None:
        from diffusers import DDPMScheduler

        a, b = self.args, self.args.train_batch
        unet = copy.deepcopy(self.unet("base"))
        add_adapters(unet, ["tuned"], a.rank, random_b=False)  # not "train": nn.Module.train
        trainable = [p for p in unet.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()  # LoRA weights and AdamW state in fp32, the frozen base in bf16
        if a.grad_ckpt:
            unet.enable_gradient_checkpointing()
        unet.train()
        opt = torch.optim.AdamW(trainable, lr=2e-4, fused=self.device.type == "cuda")
        sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")  # SDXL's training schedule
        ac = sched.alphas_cumprod.to(self.device)
        snr = ac / (1 - ac)
        x = self.unet_inputs(b)  # cached latents and text embeddings: random, of the right shapes
        latents = x.pop("sample").float()
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        losses = []

        def step() -> None:
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (b,), device=self.device)
            with autocast:
                pred = unet(sched.add_noise(latents, noise, t), t, **{k: v for k, v in x.items() if k != "timestep"},
                            return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (loss * torch.clamp(snr[t], max=a.snr_gamma) / snr[t]).mean()  # min-SNR weighting, epsilon target
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        total, ops = count_flops(step)
        self.flops.update(train_step=total, train_step_ops=ops)
        _, mem = memory(step, self.device)
        t = alternate({"train": step}, self.device, a.train_reps, a.warmup)["train"]
        self.sync()
        self.results["train"] = {"batch": b, "rank": a.rank, "lr": 2e-4, "snr_gamma": a.snr_gamma,
                                 "grad_ckpt": a.grad_ckpt, "trainable_params": sum(p.numel() for p in trainable),
                                 "s_per_step": t, "steps_per_s": 1 / t["median"],
                                 "projected_500_steps_s": 500 * t["median"], **self.rate(total, t["median"]),
                                 "last_loss": losses[-1].item(),
                                 "loss_finite": all(bool(torch.isfinite(v)) for v in losses),
                                 **mem}
        del unet, opt, trainable
        self.free()

    def vae(self) -> None:
        vae = build("vae", self.cfg["vae"], self.device).to(self.dtype).eval().requires_grad_(False)
        scale, rows = self.cfg["vae"]["scaling_factor"], []
        for b in sorted({1, max(self.args.batches)}):
            z = torch.randn(b, self.cfg["vae"]["latent_channels"], self.latent, self.latent, device=self.device,
                            dtype=self.dtype)
            fn = lambda z=z: vae.decode(z / scale, return_dict=False)[0]  # noqa: E731
            with torch.inference_mode():
                if b == 1:
                    self.flops["vae_decode"], self.flops["vae_decode_ops"] = count_flops(fn)
                _, mem = memory(fn, self.device)
                t = alternate({"decode": fn}, self.device, self.args.reps, self.args.warmup)["decode"]
            rows.append({"batch": b, "s_per_call": t, "s_per_image": t["median"] / b,
                         **self.rate(b * self.flops["vae_decode"], t["median"]), **mem})
        self.results["vae"] = {"rows": rows, "params": n_params(vae), "resolution": self.args.resolution}
        del vae
        self.free()

    def text(self) -> None:
        te1 = build("text_encoder", self.cfg["text_encoder"], self.device)
        te2 = build("text_encoder_2", self.cfg["text_encoder_2"], self.device)
        te1, te2 = (m.to(self.dtype).eval().requires_grad_(False) for m in (te1, te2))

        def encode(ids):  # as StableDiffusionXLPipeline.encode_prompt: penultimate states of both, pooled from #2
            h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
            o2 = te2(ids, output_hidden_states=True)
            return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds

        rows = []
        for b in sorted({1, max(self.args.batches)}):
            ids = torch.randint(0, self.cfg["text_encoder"]["vocab_size"], (2 * b, self.seq), device=self.device)
            fn = lambda ids=ids: encode(ids)  # noqa: E731  (prompt and negative prompt per image)
            with torch.inference_mode():
                if b == 1:
                    self.flops["text_encode"], _ = count_flops(fn)
                _, mem = memory(fn, self.device)
                t = alternate({"encode": fn}, self.device, self.args.reps, self.args.warmup)["encode"]
            rows.append({"batch": b, "sequences": 2 * b, "s_per_call": t, "s_per_image": t["median"] / b, **mem})
        self.results["text"] = {"rows": rows,
                                "params": {"text_encoder": n_params(te1), "text_encoder_2": n_params(te2)}}
        del te1, te2
        self.free()

    def compile(self) -> None:
        """A LoRA fused then unloaded (a plain UNet with merged weights), eager against torch.compile."""
        a, res = self.args, self.results.setdefault("compile", {"mode": self.args.compile_mode,
                                                                "backend": self.args.compile_backend, "rows": []})
        unet = copy.deepcopy(self.unet("base"))
        add_adapters(unet, ["a0"], a.rank, random_b=True)
        unet.fuse_lora(adapter_names=["a0"])
        unet.unload_lora()
        unet = unet.to(self.dtype).eval()
        torch._dynamo.reset()
        compiled = torch.compile(unet, mode=None if a.compile_mode == "default" else a.compile_mode,
                                 backend=a.compile_backend, dynamic=False)
        per_sample, need = self.unet_flops(), a.compile_min_s
        for b in a.compile_batches:
            if self.left() < need:
                res["rows"].append({"batch": b, "skipped": f"budget: {self.left():.0f} s left, {need:.0f} s needed"})
                continue
            x = self.unet_inputs(2 * b)
            with torch.inference_mode():
                try:
                    t0 = time.perf_counter()
                    compiled(**x, return_dict=False)
                    self.sync()
                    compile_s = time.perf_counter() - t0
                    times = alternate({"eager": lambda: unet(**x, return_dict=False),
                                       "compiled": lambda: compiled(**x, return_dict=False)},
                                      self.device, a.reps, a.warmup)
                except Exception as e:  # recorded, not fatal: compile support varies across machines and versions
                    traceback.print_exc()
                    res["error"] = f"batch {b}: {_one_line(e)}"
                    break
            step = times["compiled"]["median"]
            res["rows"].append({"batch": b, "compile_s": compile_s, "eager_s_per_step": times["eager"],
                                "compiled_s_per_step": times["compiled"], "speedup": times["eager"]["median"] / step,
                                "s_per_image": a.steps * step / b, "images_per_s": b / (a.steps * step),
                                **self.rate(2 * b * per_sample, step)})
            need = 1.5 * compile_s + 20  # a new batch size recompiles
            self.save()
        del compiled, unet
        torch._dynamo.reset()
        self.free()

    # ---- output ----------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        s: dict[str, Any] = {"reference": REF}
        f = self.flops
        if "unet_forward" in f:
            s["unet_forward_tflop"] = f["unet_forward"] / 1e12
            image = self.args.steps * 2 * f["unet_forward"] + f.get("vae_decode", 0) + f.get("text_encode", 0)
            s["image_tflop_cfg"] = image / 1e12
            s["image_tflop_counts"] = ["unet"] + [k for k in ("vae_decode", "text_encode") if k in f]
            s["floor_s_per_image"] = image / 1e12 / self.peak if self.peak else None

        def per_image(section: str, b: int) -> float:  # the same batch if measured, else batch 1
            rows = {r["batch"]: r["s_per_image"] for r in self.results.get(section, {}).get("rows", [])}
            return rows.get(b, rows.get(1, 0.0))

        for r in self.results.get("infer", {}).get("rows", []):
            s[f"{r['variant']}_b{r['batch']}_s_per_image_end_to_end"] = (
                r["s_per_image"] + per_image("vae", r["batch"]) + per_image("text", r["batch"]))
        lora_b1 = {f"{r['variant']} (eager)": r["s_per_image"] for r in self.results.get("infer", {}).get("rows", [])
                   if r["batch"] == 1 and r["variant"] in ("lora", "fused")}
        lora_b1.update({"fused (compiled)": r["s_per_image"] for r in self.results.get("compile", {}).get("rows", [])
                        if r["batch"] == 1 and "s_per_image" in r})
        if lora_b1:
            best = min(lora_b1, key=lora_b1.get)
            s["best_lora_b1"] = best
            s["best_lora_b1_s_per_image_end_to_end"] = t = lora_b1[best] + per_image("vae", 1) + per_image("text", 1)
            s["meets_target_s_per_image"] = None if self.args.smoke else t <= REF["target_s_per_image_lora"]
        tr = self.results.get("train")
        if tr:
            s["train_projected_500_steps_s"] = tr["projected_500_steps_s"]
            s["meets_target_train"] = None if self.args.smoke else (
                tr["projected_500_steps_s"] <= REF["target_train_500_steps_s"])
        s["end_to_end_includes"] = ["unet"] + [k for k in ("vae", "text") if k in self.results]
        return s

    def save(self, status: str = "running") -> None:
        payload = {"benchmark": NAME, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "status": status,
                   "elapsed_s": time.perf_counter() - self.t0, "machine": self.machine, "params": self.params,
                   "flops": self.flops, "results": self.results, "summary": self.summary(), "errors": self.errors}
        text = json.dumps(payload, indent=2, default=str) + "\n"
        for path in self.paths:  # rewritten after every section, so a timeout keeps what was measured
            if write_text_atomic is not None:
                write_text_atomic(path, text)
            else:  # travelling alone, without tipsen: a plain write (a kill mid-write loses only this section)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _mixed_call(unet: torch.nn.Module, x: dict[str, Any], names: list[str]):
    """`names` per UNet row (guidance: the unconditional half, then the conditional half). tipsen's own mixed-batch
    path (gathered LoRA) when this file runs inside the repository; peft's `adapter_names` when it travels alone."""
    if per_sample is None:
        with adapter_names(unet, names):
            return unet(**x, return_dict=False)
    half = names[:len(names) // 2]
    assert names == half + half, names
    with per_sample([unet], half, [1.0] * len(half)):
        return unet(**x, return_dict=False)


def report(bench: Bench) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines, r = [], bench.results

    def table(title: str, rows: list[dict], cols: list[str]) -> None:
        if rows:
            cells = [[fmt(row.get(c, {}).get("median") if isinstance(row.get(c), dict) else row.get(c)) for c in cols]
                     for row in rows]
            w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
            lines.extend(["", title, "  ".join(c.ljust(n) for c, n in zip(cols, w))]
                         + ["  ".join(x.ljust(n) for x, n in zip(row, w)) for row in cells])

    table(f"UNet at {bench.args.resolution} px, {bench.args.steps} steps with CFG (s_per_step = median)",
          sorted(r.get("infer", {}).get("rows", []), key=lambda x: (x["batch"], VARIANTS.index(x["variant"]))),
          ["variant", "batch", "s_per_step", "s_per_image", "images_per_s", "tflops", "pct_peak", "peak_gib"])
    table("LoRA training step", [r["train"]] if "train" in r else [],
          ["batch", "rank", "s_per_step", "projected_500_steps_s", "tflops", "pct_peak", "peak_gib", "last_loss"])
    table("VAE decode", r.get("vae", {}).get("rows", []), ["batch", "s_per_call", "s_per_image", "tflops", "peak_gib"])
    table("Text encoders (prompt + negative)", r.get("text", {}).get("rows", []),
          ["batch", "s_per_call", "s_per_image", "peak_gib"])
    table(f"torch.compile ({fmt(r.get('compile', {}).get('mode'))})", r.get("compile", {}).get("rows", []),
          ["batch", "compile_s", "eager_s_per_step", "compiled_s_per_step", "speedup", "s_per_image", "skipped"])
    if "mixed_check" in r.get("infer", {}):
        lines += ["", "mixed batch vs single adapter: " + json.dumps(r["infer"]["mixed_check"])]
    if r.get("compile", {}).get("error"):
        lines += ["compile error: " + r["compile"]["error"]]
    s = bench.summary()
    if "unet_forward_tflop" in s:
        peak = f"{s['floor_s_per_image']:.3g} s at {bench.peak:g} TFLOP/s" if s["floor_s_per_image"] else "no peak"
        parts = ", ".join(s["image_tflop_counts"])
        lines += ["", f"UNet forward {s['unet_forward_tflop']:.4g} TFLOP counted (reference "
                      f"{REF['unet_forward_tflop']}); one image ({bench.args.steps} steps with CFG; {parts}) "
                      f"{s['image_tflop_cfg']:.4g} TFLOP (reference {REF['image_tflop_28_cfg']:g}); floor {peak}"]
    lines += ["", "summary: " + json.dumps(s, default=str)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny configs at 64 px: checks the script runs")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list, run in order: {','.join(SECTIONS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="UNet variants for the infer section")
    p.add_argument("--batches", type=ints, default=None, help="images per batch (UNet batch is 2x); default 1,8,2,4")
    p.add_argument("--compile-batches", type=ints, default=None, help="default 1,8")
    p.add_argument("--compile-mode", default="default",
                   help="default | max-autotune-no-cudagraphs | reduce-overhead | max-autotune")
    p.add_argument("--compile-backend", default=None, help="default inductor (eager in --smoke)")
    p.add_argument("--compile-min-s", type=float, default=180.0, help="time budget needed to start a compile")
    p.add_argument("--resolution", type=int, default=None, help="pixels; default 1024 (64 in --smoke)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps per image, for the per-image figures")
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the training step")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--train-reps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak; default from a table")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget (default 450 s; none in --smoke); later work is skipped past it")
    p.add_argument("--device", default=None, help="default cuda (cpu in --smoke)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU")
    p.add_argument("--out", default=None, help="the directory for the JSON (default: benchmarks/results)")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.resolution = a.resolution or (64 if a.smoke else 1024)
    a.batches = a.batches or ([1, 8] if a.smoke else [1, 8, 2, 4])
    a.compile_batches = a.compile_batches or ([1] if a.smoke else [1, 8])
    a.compile_backend = a.compile_backend or ("eager" if a.smoke else "inductor")  # smoke: trace, skip codegen
    a.reps = a.reps or (2 if a.smoke else 5 if a.quick else 10)
    a.warmup = a.warmup or (1 if a.smoke else 2 if a.quick else 3)
    a.train_reps = a.train_reps or (2 if a.smoke else 5 if a.quick else 10)
    a.budget_s = a.budget_s or (math.inf if a.smoke else 450.0)
    a.sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in a.sections if s not in SECTIONS] + [v for v in a.variants.split(",") if v and v not in VARIANTS]
    if bad:
        p.error(f"unknown section or variant {bad}; allowed: {', '.join(SECTIONS + VARIANTS)}")
    if a.resolution % 64:
        p.error(f"--resolution: {a.resolution} must be a multiple of 64")
    return a


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if a.smoke:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and steady on a busy machine
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the dtype-cast notice repeats for every model built
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    bench = Bench(a)
    print(f"{NAME}: {bench.machine.get('gpu', bench.device)}, {bench.params['dtype']}, {a.resolution} px, "
          f"sections {a.sections}, peak {bench.peak} TFLOP/s", flush=True)
    failed = []
    for name in a.sections:
        t = time.perf_counter()
        if bench.left() < 30:  # not worth starting: leave the time to the runner's own limit
            bench.results[name] = {"skipped": f"budget: {bench.left():.0f} s left"}
            continue
        if bench.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bench.device)
        try:
            getattr(bench, name)()
            if bench.device.type == "cuda":  # the section's high-water mark, all models held included
                bench.results[name]["section_peak_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
        except Exception as e:  # one section's failure (say, out of memory) must not cost the others
            traceback.print_exc()
            bench.errors[name] = _one_line(e)
            failed.append(name)
            bench.free()
        left = "" if math.isinf(bench.left()) else f" ({bench.left():.0f} s of budget left)"
        print(f"  {name}: {time.perf_counter() - t:.1f} s{left}", flush=True)
        bench.save()
    bench.save("complete" if not failed else "failed")
    print(report(bench))
    print(f"\nwrote {', '.join(str(p) for p in bench.paths)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
