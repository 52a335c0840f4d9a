"""The `tipsen` command line. Each command lives in its stage module; this file only dispatches.

A stage module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only for the
command being run, so `tipsen --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tipsen.errors import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("tipsen.demodata", "write the deterministic synthetic KS-KEIT-V1 export"),
    "curate": ("tipsen.curate", "build KS-KEIT-V1.2 from a raw export"),
    "train": ("tipsen.train", "train one keyword's DreamBooth-LoRA"),
    "bank": ("tipsen.bank", "build or show the LoRA bank index (models/bank.json)"),
    "generate": ("tipsen.generate", "generate an image from a senior's prompt"),
    "refine": ("tipsen.assistant", "refine a prompt with the Senior Prompting Assistant"),
    "evaluate": ("tipsen.evaluate", "CLIP image-alignment evaluation (the paper's Table II)"),
    "serve": ("tipsen.server", "run the BentoML HTTP service"),
    "models": ("tipsen.models", "build tiny models or show where a model reference resolves"),
    "config": ("tipsen.config", "print the resolved params of a profile"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: tipsen COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\nRun 'tipsen COMMAND --help' for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from tipsen import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tipsen: error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("tipsen").setLevel(logging.INFO)  # our progress; libraries only warn
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"tipsen {name}", description=COMMANDS[name][1])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="profile to use instead of params.yaml's 'profile:'")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"tipsen {name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tipsen bank show | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the machine refused (a full disk, no permission, a folder for a file): one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tipsen {name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tipsen {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
