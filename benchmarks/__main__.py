"""`python -m benchmarks` (make bench): every CPU benchmark in turn, each writing benchmarks/results/<name>.json."""
import runpy
import sys

CPU_BENCHMARKS = ["curate", "train", "generate", "assistant", "evaluate", "service"]

if __name__ == "__main__":
    names = sys.argv[1:] or CPU_BENCHMARKS
    for name in names:
        print(f"== benchmarks.{name}", flush=True)
        sys.argv = [f"benchmarks.{name}"]
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
