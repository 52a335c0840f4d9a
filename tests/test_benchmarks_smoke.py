"""Every CPU benchmark runs at its smallest size (`--smoke`), so the scripts cannot rot.

Each one runs in a subprocess, as `python -m benchmarks.<name>` does, and writes its JSON into a temporary folder
(TIPSEN_BENCH_RESULTS), never into benchmarks/results. The checks are about shape: every measured figure is a
positive finite number and the run records its machine and params. No timing is asserted; timings belong in
BENCHMARKS.md. (The GPU script has its own smoke test, test_gpu_script.py.)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _stats(s: dict) -> None:
    assert s["n"] >= 1 and all(_pos(s[k]) for k in ("median", "min", "max"))
    assert s["min"] <= s["median"] <= s["max"]


def _paired(p: dict) -> None:
    _stats(p["a"])
    _stats(p["b"])
    assert p["ratio_a_over_b"] == pytest.approx(p["a"]["median"] / p["b"]["median"])


def check_curate(r: dict) -> None:
    sets = {row["set"] for row in r["throughput"]}
    assert "demo" in sets and len(sets) >= 2  # the demo export and the generated sizes
    assert all(_pos(row["images_per_s"]) and row["images"] > 0 for row in r["throughput"])
    assert {row["relevance"] for row in r["throughput"]} == {True, False}
    _stats(r["workers"]["one_worker"])
    _stats(r["workers"]["two_workers"])
    assert all(_pos(h["index_s"]) and _pos(h["all_pairs_s"]) for h in r["hash_index"])
    assert 0.9 <= r["linear_fit_wall"]["r2"] <= 1.0 + 1e-9


def check_train(r: dict) -> None:
    _paired(r["paired"])
    assert r["uncached_over_cached"] == pytest.approx(r["paired"]["b"]["median"] / r["paired"]["a"]["median"])
    whats = [row["what"] for row in r["rows"]]
    assert any("cached" in w for w in whats) and any("checkpoint resume" in w for w in whats)
    assert all(_pos(row["median_s"]) for row in r["rows"])
    assert r["checkpoint_bytes"] > 0 and _pos(r["predicted_from_components"])


def check_train_sdxl(r: dict) -> None:
    assert r["unet_params"] == 2_567_463_684  # the real SDXL-base UNet architecture
    row = r["row"]
    assert row["rank"] == 20 and row["batch"] == 2 and _pos(row["s_per_step"])
    assert row["500_steps_s"] == pytest.approx(500 * row["s_per_step"])


def check_generate_sdxl(r: dict) -> None:
    row = r["row"]  # --smoke: the architecture built on the meta device, the tiny model through the same path
    assert row["plans"] == 3 and row["rank"] == 20 and row["steps"] >= 1
    assert all(_pos(row[k]) for k in ("build_s", "bank_and_load_s", "resolve_ms", "render_s"))
    assert row["render_s_per_step"] == pytest.approx(row["render_s"] / row["steps"])


def check_generate(r: dict) -> None:
    cold = r["cold_start"]
    _stats(cold["base_s"])
    _stats(cold["base_plus_adapters_s"])
    assert cold["adapters"] >= 2
    for name in ("batch8_vs_sequential8", "batch8_vs_sequential8_base_model", "mixed8_vs_same8_batch",
                 "fused_vs_unfused_single_keyword"):
        _paired(r[name])
        assert r[name]["ratio"] == pytest.approx(1 / r[name]["ratio_a_over_b"])
    scaling = r["unet_batch_scaling"]
    _stats(scaling["rows2_s"])
    _stats(scaling["rows16_s"])
    assert scaling["per_request_speedup"] == pytest.approx(8 * scaling["rows2_s"]["median"] /
                                                           scaling["rows16_s"]["median"])
    sw = r["switching_vs_same_keyword"]
    _stats(sw["a"])
    _stats(sw["b"])
    _stats(sw["pair_ratio"])
    assert sw["a"]["n"] == sw["b"]["n"] == sw["pair_ratio"]["n"]  # one switch and one repeat per pair
    assert sw["ratio"] == pytest.approx(sw["pair_ratio"]["median"] - 1)


def check_assistant(r: dict) -> None:
    _paired(r["batched_vs_sequential"])
    _paired(r["seeded_vs_global_rng"])
    assert _pos(r["template_per_prompt_s"])


def check_evaluate(r: dict) -> None:
    demo = r["demo"]
    assert demo["keywords"] >= 1 and demo["methods"] >= 2 and demo["images"] > 0
    _stats(demo["cold"])
    _stats(demo["cached_rerun"])
    scaling = r["scaling"]
    _stats(scaling["wall_n"])
    _stats(scaling["wall_2n"])
    assert set(scaling["cpu_s"]) == {"1", "2", "4"} and all(_pos(v) for v in scaling["cpu_s"].values())


def check_service(r: dict) -> None:
    levels = [row["concurrency"] for row in r["concurrency"]]
    assert levels == sorted(levels) and len(levels) >= 2
    for row in r["concurrency"]:
        assert row["requests"] >= row["concurrency"] and _pos(row["throughput_rps"])
        assert 0 < row["p50_s"] <= row["p95_s"]
    assert r["batch_sizes"] and all(b >= 1 for b in r["batch_sizes"])  # read from the server's own log
    _paired(r["mixed_vs_single"])
    _paired(r["http_vs_direct"])


def check_hardening(r: dict) -> None:
    http, slow, cli = r["http"], r["slow_body"], r["cli"]
    assert http["tried"] > 50 and http["server_errors"] == 0 and http["server_tracebacks"] == 0, http
    assert slow["good_served"] > 0 and slow["good_refused"] == 0 and "408" in slow["attacker_answers"], slow
    assert cli["tried"] >= 20 and cli["tracebacks"] == 0 and cli["wrong_exit"] == 0 and cli["file_kept"], cli


def check_routing(r: dict) -> None:
    assert r["accuracy"] and all(0 <= a <= 1 for a in r["accuracy"].values())
    assert sum(r["counts"].values()) >= 1 and 0 <= r["overall"] <= 1 and _pos(r["startup_s"])
    assert set(r["sets"]) == {"routing", "routing_heldout", "routing_unseen", "routing_blind3",
                              "routing_blind4"}
    assert all(0 <= s["overall"] <= 1 and s["counts"] for s in r["sets"].values())
    _stats(r["ms_per_sentence"])


def check_bank(r: dict) -> None:
    paths = {(row["path"], row["adapters"]) for row in r["cold_start"]}
    assert {("store", 1), ("store", 4), ("peft", 1), ("peft", 4)} <= paths
    assert all(_pos(row["seconds"]) for row in r["cold_start"])
    assert all(_pos(row["resident_mb_per_adapter"]) for row in r["cold_start"] if row["path"] == "store")
    _stats(r["read_verify"]["read_verify_s"])
    for row in r["lora_cost_unet"]:
        assert row["batch"] in (1, 8) and _pos(row["ratio"]) and 0 < row["arithmetic"] < 1
        assert _pos(row["peft_one_adapter_ratio"]) and _pos(row["store_over_peft"])
    assert _pos(r["store_swap"]["until_serving_s"]) and r["store_swap"]["changed"] == 1
    assert [row["batch"] for row in r["lora_cost_tiny_generator"]] == [1, 8]
    swap = r["server_swap"]
    assert swap["clients"] == 16 and swap["failed"] == 0 and swap["changed"] == ["gimjang"]
    assert _pos(swap["reload_wall_s"]) and swap["requests"] >= 16


CASES = {
    # result name: (command-line arguments, checks)
    "curate": (["benchmarks.curate"], check_curate),
    "train": (["benchmarks.train"], check_train),
    "train_sdxl": (["benchmarks.train", "--sdxl"], check_train_sdxl),
    "generate": (["benchmarks.generate"], check_generate),
    "generate_sdxl": (["benchmarks.generate", "--sdxl"], check_generate_sdxl),
    "assistant": (["benchmarks.assistant"], check_assistant),
    "evaluate": (["benchmarks.evaluate"], check_evaluate),
    "service": (["benchmarks.service"], check_service),
    "hardening": (["benchmarks.hardening"], check_hardening),
    "routing": (["benchmarks.routing"], check_routing),
    "bank": (["benchmarks.bank"], check_bank),
}


def test_make_bench_entry_point_runs_the_named_benchmarks_with_options(root, tmp_path):
    env = {**os.environ, "TIPSEN_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "assistant"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "== benchmarks.assistant" in proc.stdout and "== benchmarks.curate" not in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["assistant-smoke.json"]  # --smoke reached the benchmark
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "warp"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "benchmarks: unknown benchmark warp; allowed: curate, train, generate, assistant, evaluate, service, "
        "hardening, routing, bank"]


@pytest.mark.parametrize("name", list(CASES))
def test_benchmark_smoke(name, root, tmp_path):
    args, check = CASES[name]
    results_dir = root / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results_dir.glob("*.json")}
    env = {**os.environ, "TIPSEN_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", *args, "--smoke"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / f"{name}-smoke.json"
    assert f"wrote {out}" in proc.stdout  # the table is printed, then where the JSON went
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["benchmark"] == f"{name}-smoke"
    assert data["machine"]["cpus"] >= 1 and "torch" in data["machine"]["versions"]
    assert data["params"], "the run must record the params it used"
    check(data["results"])
    after = {p.name: p.stat().st_mtime_ns for p in results_dir.glob("*.json")}
    assert after == before, "a smoke run must not touch benchmarks/results"
