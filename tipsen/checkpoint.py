"""Training checkpoints: all a resumed run needs to go on bit for bit, in one safetensors file and no pickle.

The tensors are the trainable parameters, the optimizer's per-parameter state and the RNG states (torch's CPU
and CUDA streams, the trainer's CPU torch.Generator, numpy's key array). Everything else (the optimizer's
param groups and scalar state, the GradScaler, numpy's and Python's remaining RNG state, the step, the losses
and the run key) is one JSON object in the header under `tipsen.checkpoint`.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from tipsen.io import atomic_path, sweep_stale

log = logging.getLogger(__name__)

META_KEY = "tipsen.checkpoint"


def save(path: Path, *, params, optimizer, scaler, generator, run_key: str, step: int, losses: list[float]) -> None:
    """Write a run's state: `params` as (name, tensor) pairs, a torch optimizer, a GradScaler, a torch.Generator."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params}
    opt = optimizer.state_dict()
    scalars = {}
    for i, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    state = {"run_key": run_key, "step": step, "losses": losses, "param_groups": opt["param_groups"],
             "optim_scalars": scalars, "scaler": scaler.state_dict(),
             "numpy": [np_state[0], *np_state[2:]], "python": [py[0], list(py[1]), py[2]]}
    sweep_stale(path)  # the temporary file of a writer that was killed
    with atomic_path(path) as tmp:  # a kill mid-write leaves the previous checkpoint intact
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(state)})


def load(path: Path, *, params, optimizer, scaler, generator, run_key: str) -> tuple[int, list[float]]:
    """Restore a checkpoint of run `run_key` into the objects `save` took and the global RNGs: (step, losses).

    (0, []) when there is none; an unreadable one, or one of another run (params, data or base changed), is
    removed with the reason logged."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return 0, []
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()[META_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, KeyError, TypeError, ValueError, OSError) as exc:
        log.warning("checkpoint %s is unreadable (%s); starting over", path, exc)
        remove(path)
        return 0, []
    if state["run_key"] != run_key:
        log.info("checkpoint %s belongs to another run (params, data or base changed); starting over", path)
        remove(path)
        return 0, []
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"param.{n}"])
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            opt_state.setdefault(int(i), {})[k] = v
    for key, v in state["optim_scalars"].items():
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    if state["scaler"]:  # a disabled scaler has no state
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"rng.cuda.{i}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    name, *rest = state["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    return state["step"], state["losses"]


def remove(path: Path) -> None:
    """Delete a checkpoint and whatever a killed writer left beside it."""
    Path(path).unlink(missing_ok=True)
    sweep_stale(path)
