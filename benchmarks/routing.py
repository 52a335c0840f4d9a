"""Keyword routing: accuracy per category on the routing data sets, the confusions, and the cost per sentence.

`python -m benchmarks.routing [--smoke]`. Accuracy is exact (tipsen.routing.correct): the expected main keyword is
drawn and exactly the expected keywords are recognised; for a sentence about none of them, none is drawn. The sets
are tests/data/routing.jsonl (the development set), then routing_heldout, routing_unseen, routing_blind3 and
routing_blind4 (each written blind to the rules and scored once before any rule was changed for it; BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import summarize, table, write_result

ROOT = Path(__file__).resolve().parent.parent
SETS = {name: ROOT / "tests" / "data" / f"{name}.jsonl" for name in ("routing", "routing_heldout", "routing_unseen",
                                                                     "routing_blind3", "routing_blind4")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from tipsen import routing
    from tipsen.registry import Registry

    sets = {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for name, path in SETS.items()}
    if args.smoke:
        sets = {name: rows[:20] for name, rows in sets.items()}
    t = time.perf_counter()
    registry = Registry.load()
    registry.route("김장")  # the analyser and every keyword's patterns
    startup = time.perf_counter() - t
    reports = {name: routing.evaluate(registry, rows) for name, rows in sets.items()}
    for name, rows in sets.items():  # the sentences an LLM backend is asked about (Route.unsure)
        reports[name]["unsure"] = sum(registry.route(row["text"]).unsure for row in rows)
    per = []
    for row in (row for rows in sets.values() for row in rows):
        t = time.perf_counter()
        registry.route(row["text"])
        per.append((time.perf_counter() - t) * 1000)
    cost = summarize(per)
    choice = choice_cost(registry, [row["text"] for rows in sets.values() for row in rows])
    for name, report in reports.items():
        print(f"{name}: overall {report['overall']:.3f}; unsure {report['unsure']} of {len(sets[name])}")
        print(table([{"category": c, "sentences": report["counts"][c], "accuracy": a}
                     for c, a in report["accuracy"].items()]))
        for miss in report["misses"]:
            print("  miss:", json.dumps(miss, ensure_ascii=False))
    print(f"per sentence median {cost['median']:.2f} ms, max {cost['max']:.2f} ms; start-up {startup:.1f} s")
    if choice["unsure"]:
        print(f"LLM choice for the {choice['unsure']} unsure routes: {choice['prompt_chars']['median']:.0f} characters of chat "
              f"(median), one forward pass; {choice['s_per_route']['median'] * 1000:.1f} ms a route on {choice['llm']}")
    out = write_result("routing" + ("-smoke" if args.smoke else ""),
                       {**reports["routing"], "sets": reports, "ms_per_sentence": cost, "startup_s": startup,
                        "llm_choice": choice},
                       params={"data": {n: str(p.relative_to(ROOT)) for n, p in SETS.items()}, "sentences": len(per),
                               "route": routing.ROUTE, "ask": routing.ASK, "sure": routing.SURE})
    print(f"wrote {out}")


def choice_cost(registry, texts: list[str]) -> dict:
    """What settling the unsure routes costs: the chat's length in characters (tiny:llm's small vocabulary would
    overstate Llama 3's token count), and the time of the transformers backend's one forward pass, on tiny:llm."""
    from tipsen.assistant import Assistant
    from tipsen.config import AssistantParams, ModelsParams, Params

    params = Params(profile="bench", keywords=["gimjang"], models=ModelsParams(llm="tiny:llm"),
                    assistant=AssistantParams(backend="transformers"))
    assistant = Assistant.from_params(params, registry=registry, curated=None)
    routes = [(t, r) for t in texts if (r := registry.route(t)).unsure]
    assistant.llm.load()
    lengths = [sum(len(m["content"]) for m in assistant.choice_messages(t, r.candidates)) for t, r in routes]
    times = []
    for t, r in routes:
        start = time.perf_counter()
        assistant.settle([t], [r])
        times.append(time.perf_counter() - start)
    if not routes:
        return {"llm": "tiny:llm", "unsure": 0, "prompt_chars": None, "s_per_route": None}
    return {"llm": "tiny:llm", "unsure": len(routes), "prompt_chars": summarize(lengths),
            "s_per_route": summarize(times)}


if __name__ == "__main__":
    main()
