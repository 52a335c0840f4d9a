"""Keyword routing: accuracy per category on tests/data/routing.jsonl, the confusions, and the cost per sentence.

`python -m benchmarks.routing [--smoke]`. Accuracy is exact (tipsen.routing.correct): the expected main keyword is
drawn and exactly the expected keywords are recognised; for a sentence about none of them, none is drawn.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import summarize, table, write_result

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "routing.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from tipsen import routing
    from tipsen.registry import Registry

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    t = time.perf_counter()
    registry = Registry.load()
    registry.route("김장")  # the analyser and every keyword's patterns
    startup = time.perf_counter() - t
    report = routing.evaluate(registry, rows[:20] if args.smoke else rows)
    per = []
    for row in rows[:20] if args.smoke else rows:
        t = time.perf_counter()
        registry.route(row["text"])
        per.append((time.perf_counter() - t) * 1000)
    cost = summarize(per)
    print(table([{"category": c, "sentences": report["counts"][c], "accuracy": a}
                 for c, a in report["accuracy"].items()]))
    print(f"overall {report['overall']:.3f}; per sentence median {cost['median']:.2f} ms, max {cost['max']:.2f} ms; "
          f"start-up {startup:.1f} s")
    for miss in report["misses"]:
        print("  miss:", json.dumps(miss, ensure_ascii=False))
    out = write_result("routing" + ("-smoke" if args.smoke else ""),
                       {**report, "ms_per_sentence": cost, "startup_s": startup},
                       params={"data": str(DATA.relative_to(ROOT)), "sentences": len(per),
                               "route": routing.ROUTE, "ask": routing.ASK})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
