"""The HTTP service on tiny:sdxl, through HTTP: throughput and latency at concurrency 1/4/8/16, mixed keywords
against one keyword, and the cost of HTTP + adaptive batching against a direct Generator call.

    python -m benchmarks.service            # 8 steps at 64 px (small on purpose: CPU minutes, not hours)
    python -m benchmarks.service --smoke    # seconds
    python -m benchmarks.service --bank models/bank.json   # the demo bank instead of random adapters

The server is `tipsen serve` on 127.0.0.1 with the demo profile, the template assistant and a bank of four
random adapters, started once. Figures on tiny random models measure the serving machinery, not SDXL. The server
and the direct Generator both run with --threads torch threads (default 1: on a shared 2-core machine more
threads only oversubscribe it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common import paired, table, write_result

SLUGS = ["gimjang", "yakgwa", "songpyeon", "kimbap"]


def bench_params(out: Path, *, steps: int, size: int) -> Path:
    from tipsen.testing import write_params

    return write_params(out, {
        "generate": {"steps": steps, "width": size, "height": size, "min_size": size, "max_size": size},
        "assistant": {"backend": "template"},
        "service": {"max_queue": 32, "max_concurrency": 80, "max_client_requests": 0, "timeout_s": 600,
                    "max_latency_ms": 600_000},  # measure batching, not load shedding
    })


def load(url: str, *, concurrency: int, total: int, keywords: list[str]) -> dict:
    """`total` POST /generate from `concurrency` threads; throughput and latency percentiles."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, todo = threading.Lock(), iter(range(total))

    def worker():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = client.post(f"{url}/generate", json={"prompt": "추억", "keyword": keywords[i % len(keywords)],
                                                         "seed": i})
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors.append(f"{r.status_code} {r.text[:120]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {total} requests failed, e.g. {errors[0]}")
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"concurrency": concurrency, "requests": total, "throughput_rps": total / wall,
            "p50_s": statistics.median(latencies), "p95_s": q[18], "wall_s": wall}


def batch_sizes(log: Path) -> list[int]:
    return [int(line.split("batch size ")[1].split(":")[0]) for line in log.read_text(errors="replace").splitlines()
            if "batch size " in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bank", type=Path, default=None, help="bank index (default: four random adapters)")
    ap.add_argument("--port", type=int, default=3917)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of the server and the direct run")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported here or in the server
    steps = 2 if args.smoke else args.steps
    levels = [1, 2] if args.smoke else [1, 4, 8, 16]
    per_level = (lambda c: 2) if args.smoke else (lambda c: max(4, c))  # every thread sends one request or more
    reps = 1 if args.smoke else 2

    from tipsen.testing import Server, random_bank

    tmp = Path(tempfile.mkdtemp(prefix="tipsen-bench-"))
    bank = args.bank or random_bank(tmp / "bank", SLUGS, seed=0)
    params = bench_params(tmp / "params.yaml", steps=steps, size=args.size)
    server = Server(tmp, params=params, bank=bank, port=args.port)
    log, url = server.log, server.url
    results: dict = {}
    try:
        server.wait_ready(timeout=600)
        load(url, concurrency=2, total=4, keywords=SLUGS)  # warm-up
        before = len(batch_sizes(log))
        rows = [load(url, concurrency=c, total=per_level(c), keywords=SLUGS) for c in levels]
        results["concurrency"] = rows
        results["batch_sizes"] = batch_sizes(log)[before:]
        print(table(rows))
        print("batch sizes seen:", results["batch_sizes"])

        c = levels[-1] if args.smoke else 8
        mix = paired(lambda: load(url, concurrency=c, total=c, keywords=SLUGS),
                     lambda: load(url, concurrency=c, total=c, keywords=SLUGS[:1]), reps=reps, warmup=0)
        results["mixed_vs_single"] = mix
        print(table([{"case": f"{c} requests at concurrency {c}: mixed / single keyword",
                      "mixed_s": mix["a"]["median"], "single_s": mix["b"]["median"],
                      "ratio": mix["ratio_a_over_b"]}]))

        from tipsen.assistant import Assistant
        from tipsen.config import load_params
        from tipsen.generate import GenerationRequest, Generator

        import torch

        torch.set_num_threads(args.threads)
        cfg = load_params(params, profile="demo")  # the server's params: same model, bank and template assistant
        gen = Generator(cfg, bank=bank, assistant=Assistant.from_params(cfg, curated=None))
        req = GenerationRequest(prompt="추억", keyword=SLUGS[0], seed=0, assist=True)
        direct = paired(lambda: load(url, concurrency=1, total=1, keywords=SLUGS[:1]),
                        lambda: gen.generate(req), reps=2 * reps, warmup=1)
        results["http_vs_direct"] = direct
        print(table([{"case": "one request: HTTP + batching / direct Generator.generate",
                      "http_s": direct["a"]["median"], "direct_s": direct["b"]["median"],
                      "overhead_s": direct["a"]["median"] - direct["b"]["median"],
                      "ratio": direct["ratio_a_over_b"]}]))
    finally:
        server.stop()
    out = write_result("service-smoke" if args.smoke else "service", results,
                       params={"steps": steps, "size": args.size, "levels": levels, "model": "tiny:sdxl",
                               "threads": args.threads,
                               "assistant": "template", "bank": str(args.bank or "random x4")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
