"""`tipsen export` on the real SDXL UNet architecture: `python -m benchmarks.export_fullsize`.

A rank-20 adapter on SDXL-base's UNet (benchmarks/configs/sdxl_unet.json; uninitialised bf16 weights, since only
shapes, keys and widths matter here) is saved as the trainer saves it, indexed, and exported to the kohya layout.
It reports the tensor count, the sizes, the base model version read from the cross-attention width, and the time.
"""
from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from tipsen.bank import WEIGHTS_NAME, Bank
    from tipsen.export import export_kohya
    from tipsen.registry import Registry
    from tipsen.testing import random_bank

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((ROOT / "benchmarks/configs/sdxl_unet.json").read_text()))
    unet = unet.to_empty(device="cpu").to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bank = random_bank(tmp, ["yakgwa"], rank=20, unet=unet)
        out = tmp / "yakgwa_kohya.safetensors"
        t = time.perf_counter()
        report = export_kohya(Bank(bank), "yakgwa", out, registry=Registry.load())
        seconds = time.perf_counter() - t
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        row = {"tensors": report["tensors"], "export_s": round(seconds, 3), "kohya_mb": out.stat().st_size / 1e6,
               "diffusers_mb": (tmp / "loras" / "yakgwa" / WEIGHTS_NAME).stat().st_size / 1e6,
               "ss_base_model_version": meta["ss_base_model_version"], "ss_network_dim": meta["ss_network_dim"],
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    print(json.dumps(row, indent=2))
    print(f"wrote {write_result('export_fullsize', row, params={'rank': 20, 'dtype': 'bfloat16'})}")


if __name__ == "__main__":
    main()
