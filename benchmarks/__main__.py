"""`python -m benchmarks [--smoke] [NAME ...]` (make bench): every CPU benchmark in turn, or the ones named, each
writing benchmarks/results/<name>.json. Options (words starting with --) are passed to each benchmark."""
import runpy
import sys

CPU_BENCHMARKS = ["curate", "train", "generate", "assistant", "evaluate", "service", "hardening", "routing", "bank"]

if __name__ == "__main__":
    options = [a for a in sys.argv[1:] if a.startswith("--")]
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or CPU_BENCHMARKS
    unknown = sorted(set(names) - set(CPU_BENCHMARKS))
    if unknown:
        sys.exit(f"benchmarks: unknown benchmark {', '.join(unknown)}; allowed: {', '.join(CPU_BENCHMARKS)}")
    for name in names:
        print(f"== benchmarks.{name}", flush=True)
        sys.argv = [f"benchmarks.{name}", *options]
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
