"""The checkpoint codec: a run saved mid-way and restored into fresh objects goes on bit for bit."""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tipsen import checkpoint

RUN, LOSSES = "run-a", [0.5, 0.25, 0.125]


def make(seed: int):
    """A module with dropout (global torch RNG), AdamW, an fp16-style GradScaler and a CPU generator; every
    setting depends on `seed`, so state the codec fails to restore shows up as a difference."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (8 + seed), growth_interval=2 + seed)
    return net, opt, scaler, torch.Generator().manual_seed(seed)


def seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def steps(net, opt, scaler, gen, n: int) -> None:
    for _ in range(n):
        loss = net(torch.randn(4, 8, generator=gen)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)


def snapshot(net, opt, scaler, gen) -> dict:
    """Everything the next steps depend on, then one draw from every RNG stream."""
    return {"params": [p.detach().clone() for p in net.parameters()], "optim": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "draws": [torch.rand(3), np.random.rand(3).tolist(), np.random.standard_normal(), random.random(),
                      random.gauss(0, 1), torch.rand(3, generator=gen)]}


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def save(path, objs, *, run_key: str = RUN, step: int = 3) -> None:
    net, opt, scaler, gen = objs
    checkpoint.save(path, params=list(net.named_parameters()), optimizer=opt, scaler=scaler, generator=gen,
                    run_key=run_key, step=step, losses=LOSSES[:step])


def load(path, objs, *, run_key: str = RUN):
    net, opt, scaler, gen = objs
    return checkpoint.load(path, params=list(net.named_parameters()), optimizer=opt, scaler=scaler, generator=gen,
                           run_key=run_key)


@pytest.fixture()
def saved(tmp_path):
    """A run saved after 3 steps, and what its next 2 steps and draws give."""
    path, run = tmp_path / "ckpt" / "checkpoint.safetensors", make(0)
    seed_globals(0)
    steps(*run, 3)
    run[1].param_groups[0]["lr"] = 5e-3  # as a schedule would: param groups are state too
    run[1].state[run[0][0].weight]["note"] = 7  # a non-tensor entry (older torch's int `step`) takes the JSON path
    np.random.standard_normal()  # leaves a cached gaussian: numpy's state beyond its key array
    random.gauss(0, 1)  # the same for Python's
    save(path, run)
    steps(*run, 2)
    return path, snapshot(*run)


def test_restored_run_continues_bit_for_bit(saved):
    path, want = saved
    seed_globals(1)
    fresh = make(1)  # other weights, moments, lr, scaler settings, generator and global RNG states
    assert not same(snapshot(*fresh)["params"], want["params"])
    assert load(path, fresh) == (3, LOSSES)
    steps(*fresh, 2)
    got = snapshot(*fresh)
    for part in want:
        assert same(got[part], want[part]), part


def test_checkpoint_is_safetensors_with_a_json_header(saved):
    path, _ = saved
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle or a zip
    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()[checkpoint.META_KEY])
    assert state["run_key"] == RUN and state["step"] == 3 and state["losses"] == LOSSES
    keys = set(load_file(path))
    assert {"param.0.weight", "param.0.bias", "param.2.weight", "param.2.bias", "optim.0.exp_avg",
            "optim.3.exp_avg_sq", "optim.3.step", "rng.torch", "rng.generator", "rng.numpy"} <= keys


def test_another_runs_checkpoint_is_removed_and_nothing_restored(saved, caplog):
    path, _ = saved
    fresh = make(1)
    before = snapshot(*fresh)["params"]
    caplog.set_level(logging.INFO, logger="tipsen.checkpoint")
    assert load(path, fresh, run_key="run-b") == (0, [])
    assert not path.exists() and "belongs to another run" in caplog.text
    assert same([p.detach() for p in fresh[0].parameters()], before)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no header"])
def test_an_unreadable_checkpoint_is_removed(saved, damage, caplog):
    path, _ = saved
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint")
    else:  # a valid safetensors file, e.g. LoRA weights, without the checkpoint's JSON
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path))
    assert load(path, make(1)) == (0, [])
    assert not path.exists() and "unreadable" in caplog.text


def test_a_failed_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    import safetensors.torch

    path, _ = saved
    real = safetensors.torch.save_file

    def dies_midway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("no space left")  # stands in for a kill mid-write, which a test cannot time

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError):
        save(path, make(2), step=2)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert load(path, make(3)) == (3, LOSSES)  # the previous checkpoint, whole
    monkeypatch.undo()
    stale = path.with_name(f".{path.name}.tmp-killed")  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"partial")
    save(path, make(2), step=2)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # swept by the next save
    assert load(path, make(3))[0] == 2
