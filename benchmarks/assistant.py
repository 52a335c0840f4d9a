"""The Senior Prompting Assistant: batched vs one-by-one LLM refinement, the cost of per-prompt seeded sampling,
and template throughput.

    python -m benchmarks.assistant            # tiny:llm on this machine's device
    python -m benchmarks.assistant --smoke    # seconds
    python -m benchmarks.assistant --llm meta-llama/Meta-Llama-3-8B-Instruct   # a real model, on a GPU
"""
from __future__ import annotations

import argparse
import time

from transformers import LogitsProcessorList

from benchmarks.common import paired, table, timeit, write_result
from tipsen.assistant import Assistant
from tipsen.assistant_backends import SeededSampler
from tipsen.config import AssistantParams, ModelsParams, Params
from tipsen.registry import Registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--llm", default="tiny:llm")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, new, reps = (2, 4, 1) if args.smoke else (args.prompts, args.new_tokens, args.reps)

    registry = Registry.load()
    cfg = AssistantParams(backend="transformers", max_new_tokens=new, attempts=1, batch_size=max(n, 1))
    a = Assistant.from_params(Params(profile="bench", keywords=["gimjang"], models=ModelsParams(llm=args.llm),
                                     assistant=cfg), registry=registry, curated=None)
    kws = list(registry)[:n]
    convs = [a.messages(k.ko, k) for k in kws]
    seeds = list(range(n))
    model, tok = a.llm.load()
    rows, results = [], {}

    # 1. One generate() over the whole batch (left padding) vs one call per prompt.
    r = paired(lambda: a.llm.generate(convs, seeds),
               lambda: [a.llm.generate([c], [s]) for c, s in zip(convs, seeds)], reps=reps)
    results["batched_vs_sequential"] = r
    rows.append({"case": f"{n} prompts: batched / sequential", "a_median_s": r["a"]["median"],
                 "b_median_s": r["b"]["median"], "ratio": r["ratio_a_over_b"]})

    # 2. Per-prompt seeded sampling vs transformers' own sampling from the global RNG, same batch.
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    common = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=cfg.temperature,
                  top_p=cfg.top_p, pad_token_id=tok.pad_token_id)
    r = paired(lambda: model.generate(**enc, **common,
                                      logits_processor=LogitsProcessorList([SeededSampler(seeds, cfg)])),
               lambda: model.generate(**enc, **common), reps=reps)
    results["seeded_vs_global_rng"] = r
    rows.append({"case": f"{n} prompts x {new} tokens: seeded / global RNG", "a_median_s": r["a"]["median"],
                 "b_median_s": r["b"]["median"], "ratio": r["ratio_a_over_b"]})

    # 3. The template backend: every keyword, Korean input.
    template = Params(profile="bench", keywords=["gimjang"], assistant=AssistantParams(backend="template"))
    t = Assistant.from_params(template, registry=registry, curated=None)
    names = [k.ko for k in registry]
    s = timeit(lambda: t.refine_batch(names, seeds=list(range(len(names)))), reps=max(reps, 3))
    results["template_per_prompt_s"] = s["median"] / len(names)
    rows.append({"case": f"template, {len(names)} prompts", "a_median_s": s["median"], "b_median_s": float("nan"),
                 "ratio": float("nan")})

    print(table(rows))
    out = write_result("assistant" + ("-smoke" if args.smoke else ""), results,
                       params={"llm": args.llm, "prompts": n, "new_tokens": new, "reps": reps,
                               "prompt_tokens": int(enc["input_ids"].shape[1]), "device": str(model.device),
                               "when_local": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
