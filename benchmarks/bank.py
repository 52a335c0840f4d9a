"""The LoRA bank store on the real SDXL UNet architecture (random bf16 weights, CPU is fine).

    .venv/bin/python -m benchmarks.bank [--smoke] [--adapters 30] [--latent 16] [--reps 3] [--no-server]

- cold start: the store (tipsen.store) against the peft loading path (verify, then diffusers' `load_lora_weights`,
  as the bank was loaded before the store) for 1, 8 and N adapters (peft at 1 and 8 only: it grows linearly);
- resident memory per adapter against its bf16 size, and the read-and-verify cost per adapter file;
- the swap on the store: one adapter of N changed, from `prepare` until the new version serves;
- the swap on a real server (tiny:sdxl): `POST /bank/reload` under 16 concurrent clients, its time and the failed
  requests;
- the cost of LoRA in a batch: one UNet forward with every row's own adapter against the base model, at batch 1
  and 8 (2 and 16 guided rows), on the real UNet at a small latent and on tiny:sdxl, with the share that is the
  LoRA arithmetic itself (counted from the layers' shapes) and the rest, the gathered path's overhead.

Adapter files are fp32, as the trainer writes them (rank 20 on SDXL: 116 MB each). --smoke runs every part on tiny:sdxl
with few adapters, for the tests.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import alternated, paired, summarize, table, write_result

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TIPSEN_HOME", str(ROOT / ".cache" / "tipsen"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def unet_pipe(unet):
    """The smallest object the store and diffusers' LoRA loader take as a pipeline: a UNet and SDXL's LoRA mixin."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    class UNetOnly(StableDiffusionXLLoraLoaderMixin):
        text_encoder = text_encoder_2 = hf_device_map = None
        components: dict = {}

        def __init__(self, unet):
            self.unet = unet

        @property
        def device(self):
            return self.unet.device

        @property
        def dtype(self):
            return self.unet.dtype

    return UNetOnly(unet)


def build_unet(smoke: bool):
    import torch
    from diffusers import UNet2DConditionModel

    from tipsen.models import resolve_ref

    if smoke:
        return UNet2DConditionModel.from_pretrained(resolve_ref("tiny:sdxl"), subfolder="unet", use_safetensors=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((ROOT / "benchmarks/configs/sdxl_unet.json").read_text()))
    unet = unet.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():  # small random weights: uninitialised memory may hold NaNs and denormals
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return unet.eval()


def write_bank(root: Path, unet, slugs: list[str], rank: int) -> None:
    """`slugs`' adapters as the trainer writes them (fp32, its header), the first shaped by peft on `unet` and the
    others random tensors of the same keys; indexed by the real bank builder."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tipsen.bank import WEIGHTS_NAME, build_bank
    from tipsen.registry import Registry
    from tipsen.testing import random_bank

    random_bank(root, slugs[:1], rank=rank, unet=unet)
    first = root / "loras" / slugs[0] / WEIGHTS_NAME
    with safe_open(str(first), framework="pt") as f:
        header = f.metadata() or {}
    keys = {k: v.shape for k, v in load_file(str(first)).items()}
    g = torch.Generator().manual_seed(0)
    for i, slug in enumerate(slugs):
        tensors = {k: torch.randn(shape, generator=g) * (0.01 if "up" in k or "lora_B" in k else 0.05)
                   for k, shape in keys.items()}
        (root / "loras" / slug).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / "loras" / slug / WEIGHTS_NAME), metadata=header)
    build_bank(root / "loras", root / "bank.json", keywords=slugs, registry=Registry.load(), base_model="tiny:sdxl")


def index_of(root: Path, slugs: list[str], name: str) -> Path:
    """An index of the first adapters of the bank at `root`."""
    full = json.loads((root / "bank.json").read_text())
    out = root / name
    out.write_text(json.dumps({**full, "adapters": [a for a in full["adapters"] if a["slug"] in slugs]}))
    return out


def cold_start(pipe, root: Path, slugs: list[str], counts: list[int], peft_counts: list[int]) -> list[dict]:
    from tipsen.bank import Bank
    from tipsen.lora_batch import expected_warnings_quiet
    from tipsen.store import BankStore

    rows = []
    for n in counts:
        bank = Bank(index_of(root, slugs[:n], f"bank-{n}.json"))
        gc.collect()
        before = rss_gb()
        store = BankStore(pipe, known=set(slugs))
        t = time.perf_counter()
        version = store.load(bank)
        took = time.perf_counter() - t
        assert len(version.adapters) == n, version.reasons
        per = version.nbytes() / n
        rows.append({"path": "store", "adapters": n, "seconds": took, "per_adapter_s": took / n,
                     "resident_mb_per_adapter": per / 1e6, "rss_gb_delta": rss_gb() - before})
        store.close()
        del store, version
    for n in peft_counts:
        bank = Bank(index_of(root, slugs[:n], f"bank-{n}.json"))
        gc.collect()
        before = rss_gb()
        t = time.perf_counter()
        with expected_warnings_quiet():
            for entry in bank:  # the bank's loading before the store: verify the file, then diffusers/peft
                assert bank.verify(entry.slug) is None
                pipe.load_lora_weights(str(entry.path.parent), weight_name=entry.path.name, adapter_name=entry.slug,
                                       use_safetensors=True, low_cpu_mem_usage=True)
        took = time.perf_counter() - t
        rows.append({"path": "peft", "adapters": n, "seconds": took, "per_adapter_s": took / n,
                     "resident_mb_per_adapter": float("nan"), "rss_gb_delta": rss_gb() - before})
        pipe.delete_adapters([e.slug for e in bank])
    return rows


def read_cost(pipe, root: Path, slugs: list[str]) -> dict:
    from tipsen.bank import Bank
    from tipsen.store import BankStore

    bank, store = Bank(root / "bank.json"), BankStore(pipe, known=set(slugs))
    took = []
    for entry in bank:
        t = time.perf_counter()
        store._read(entry)
        took.append(time.perf_counter() - t)
    size = next(iter(bank)).path.stat().st_size
    return {"file_mb": size / 1e6, "read_verify_s": summarize(took)}


def store_swap(pipe, root: Path, slugs: list[str]) -> dict:
    """N adapters serving; one file replaced and the index rebuilt; prepare + swap until the new version serves."""
    import torch
    from safetensors.torch import load_file, save_file

    from tipsen.bank import WEIGHTS_NAME, Bank, build_bank
    from tipsen.registry import Registry
    from tipsen.store import BankStore

    store = BankStore(pipe, known=set(slugs))
    store.load(Bank(root / "bank.json"))
    file = root / "loras" / slugs[0] / WEIGHTS_NAME
    save_file({k: torch.randn_like(v) * 0.01 for k, v in load_file(str(file)).items()}, str(file))
    build_bank(root / "loras", root / "bank.json", keywords=slugs, registry=Registry.load(), base_model="tiny:sdxl")
    t = time.perf_counter()
    new = store.prepare(Bank(root / "bank.json"))
    prepared = time.perf_counter() - t
    store.swap(new)
    took = time.perf_counter() - t
    store.close()
    return {"adapters": len(slugs), "changed": 1, "prepare_s": prepared, "until_serving_s": took}


def server_swap(tmp: Path, clients: int = 16) -> dict:
    """`POST /bank/reload` on a real tiny:sdxl server while `clients` threads draw mixed keywords."""
    import httpx

    from tipsen.bank import WEIGHTS_NAME, build_bank
    from tipsen.registry import Registry
    from tipsen.testing import SERVICE_PARAMS, Server, random_bank, write_params

    slugs = ["gimjang", "yakgwa", "songpyeon", "kimbap"]
    root = tmp / "served"
    random_bank(root, slugs, scale=4.0)
    params = {**SERVICE_PARAMS, "generate": {**SERVICE_PARAMS["generate"], "steps": 2}}
    server = Server(tmp, params=write_params(tmp / "params.yaml", params), bank=root / "bank.json")
    statuses, stop, lock = Counter(), threading.Event(), threading.Lock()
    try:
        server.wait_ready()

        def client(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=300) as http:
                n = 0
                while not stop.is_set():
                    r = http.post("/generate", json={"prompt": f"{Registry.load()[slugs[(i + n) % 4]].ko}",
                                                     "seed": n, "steps": 2})
                    with lock:
                        statuses[r.status_code] += 1
                    n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        while sum(statuses.values()) < clients:
            time.sleep(0.1)
        random_bank(tmp / "fresh", slugs[:1], seed=777, scale=4.0)
        (root / "loras" / slugs[0] / WEIGHTS_NAME).write_bytes(
            (tmp / "fresh" / "loras" / slugs[0] / WEIGHTS_NAME).read_bytes())
        build_bank(root / "loras", root / "bank.json", keywords=slugs, registry=Registry.load(),
                   base_model="tiny:sdxl")
        t = time.perf_counter()
        answer = httpx.post(f"{server.url}/bank/reload", timeout=300)
        wall = time.perf_counter() - t
        time.sleep(2)
        stop.set()
        for th in threads:
            th.join()
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    failed = sum(n for code, n in statuses.items() if code != 200)
    return {"clients": clients, "reload_wall_s": wall, "reload_reported_s": answer.json()["seconds"],
            "requests": sum(statuses.values()), "failed": failed, "changed": answer.json()["changed"]}


def lora_cost(pipe, root: Path, slugs: list[str], latent: int, reps: int, steps: int) -> list[dict]:
    """UNet forwards (`steps` of them in one batch), every row with its own adapter, against the base model; at 2
    and 16 rows. The LoRA
    arithmetic is counted from each covered layer's input tokens and shapes; the base model's by torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tipsen.bank import Bank
    from tipsen.store import BankStore

    from tipsen.bank import WEIGHTS_NAME

    unet, cfg = pipe.unet, pipe.unet.config
    # a copy of the UNet with one adapter loaded the stock way (diffusers/peft) and active on every row
    peft_unet = copy.deepcopy(unet)
    peft_unet.load_lora_adapter(str(root / "loras" / slugs[0] / WEIGHTS_NAME), prefix="unet", adapter_name="stock")
    peft_unet.set_adapters(["stock"], [0.7])
    store = BankStore(pipe, known=set(slugs))
    version = store.load(Bank(root / "bank.json"))
    rank = max(s.a.shape[1] for s in version.stacks.values())
    dtype = unet.dtype
    rows_out = []
    for batch in (1, 8):
        rows = 2 * batch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, cfg.in_channels, latent, latent, generator=g).to(dtype)
        ctx = torch.randn(rows, 77, cfg.cross_attention_dim, generator=g).to(dtype)
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(rows, pooled, generator=g).to(dtype),
                 "time_ids": torch.rand(rows, 6, generator=g).to(dtype)}
        names = [(slugs[i % len(slugs)],) for i in range(batch)]
        scales = [(0.7,)] * batch
        tokens = Counter()

        def count(module, args, out, name=None):
            tokens[name] += args[0].numel() // args[0].shape[-1]

        handles = [store.linears[m].register_forward_hook(lambda mod, a, o, m=m: count(mod, a, o, m))
                   for m in version.stacks]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, 500, ctx, added_cond_kwargs=extra)
        for h in handles:
            h.remove()
        base_flops = counter.get_total_flops()
        lora_flops = sum(2 * n * rank * (store.linears[m].in_features + store.linears[m].out_features)
                         for m, n in tokens.items())

        def base():
            with torch.no_grad():
                for _ in range(steps):
                    unet(x, 500, ctx, added_cond_kwargs=extra)

        def with_lora():  # one batch, several denoising steps: the rows' matrices are gathered once, as in a render
            with torch.no_grad(), store.batch(names, scales):
                for _ in range(steps):
                    unet(x, 500, ctx, added_cond_kwargs=extra)

        def stock():  # diffusers/peft with one adapter active on every row: unfused LoRA as users know it
            with torch.no_grad():
                for _ in range(steps):
                    peft_unet(x, 500, ctx, added_cond_kwargs=extra)

        times = alternated({"store": with_lora, "base": base, "peft": stock}, reps=reps, warmup=1)
        s_, b_, p_ = (times[k]["median"] for k in ("store", "base", "peft"))
        arithmetic = lora_flops / base_flops
        rows_out.append({"batch": batch, "rows": rows, "latent": latent, "steps": steps, "lora_s": s_, "base_s": b_,
                         "ratio": s_ / b_, "peft_one_adapter_ratio": p_ / b_, "arithmetic": arithmetic,
                         "overhead": s_ / b_ - 1 - arithmetic, "store_over_peft": s_ / p_})
    store.close()
    del peft_unet
    return rows_out


def tiny_generator_cost(reps: int) -> list[dict]:
    """The issue's own measurement, through the Generator on tiny:sdxl at 32 px, 8 steps, one thread: a batch with
    adapters against the base model, at batch 1 and 8."""
    import torch

    from tipsen.config import load_params
    from tipsen.generate import Generator
    from tipsen.registry import Registry
    from tipsen.testing import random_bank

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry = Registry.load()
    params = load_params(ROOT / "params.yaml", profile="demo").override("generate", {"max_batch_size": 8})
    slugs = list(registry.keywords)[:8]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        gen = Generator(params, bank=random_bank(Path(tmp), slugs, rank=params.train.rank, scale=0.1,
                                                 registry=registry), registry=registry)
        for batch in (1, 8):
            reqs = [{"prompt": "a family day", "keyword": slugs[i], "seed": i, "steps": 8, "width": 32, "height": 32}
                    for i in range(batch)]
            plain = [{**r, "use_lora": False} for r in reqs]
            r = paired(lambda: gen.generate_batch(reqs), lambda: gen.generate_batch(plain), reps=reps, warmup=1)
            out.append({"batch": batch, "lora_s": r["a"]["median"], "base_s": r["b"]["median"],
                        "ratio": r["ratio_a_over_b"]})
    torch.set_num_threads(threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny:sdxl, few adapters, one repetition")
    parser.add_argument("--adapters", type=int, default=30)
    parser.add_argument("--latent", type=int, default=16, help="latent side for the LoRA cost (16: 128 px)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="UNet forwards per timed batch (the LoRA cost)")
    parser.add_argument("--no-server", action="store_true", help="leave out the swap on a real server")
    args = parser.parse_args()
    if args.smoke:
        args.adapters, args.reps, args.latent, args.steps = 4, 1, 8, 2
    from diffusers.utils import logging as diffusers_logging

    from tipsen.registry import Registry

    diffusers_logging.disable_progress_bar()
    slugs = list(Registry.load().keywords)[:args.adapters]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        unet = build_unet(args.smoke)
        results["unet"] = {"build_s": time.perf_counter() - t, "rss_gb": rss_gb(),
                           "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "dtype": str(unet.dtype)}
        pipe = unet_pipe(unet)
        write_bank(tmp / "bank", unet, slugs, rank=20)
        counts = sorted({1, min(8, len(slugs)), len(slugs)})
        results["cold_start"] = cold_start(pipe, tmp / "bank", slugs, counts, [1, min(8, len(slugs))])
        print(table(results["cold_start"]), flush=True)
        results["read_verify"] = read_cost(pipe, tmp / "bank", slugs)
        results["lora_cost_fullsize" if not args.smoke else "lora_cost_unet"] = cost = \
            lora_cost(pipe, tmp / "bank", slugs, args.latent, args.reps, args.steps)
        print(table(cost), flush=True)
        results["store_swap"] = store_swap(pipe, tmp / "bank", slugs)
        del pipe, unet
        gc.collect()
        results["lora_cost_tiny_generator"] = tiny = tiny_generator_cost(args.reps)
        print(table(tiny), flush=True)
        if not args.no_server:
            (tmp / "server").mkdir()
            results["server_swap"] = server_swap(tmp / "server")
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({k: v for k, v in results.items() if k not in ("cold_start",)}, indent=2, default=str))
    name = "bank-smoke" if args.smoke else "bank"
    print(f"wrote {write_result(name, results, params={'adapters': len(slugs), 'rank': 20, 'latent': args.latent, 'reps': args.reps, 'smoke': args.smoke, 'load_avg': os.getloadavg()})}")


if __name__ == "__main__":
    main()
