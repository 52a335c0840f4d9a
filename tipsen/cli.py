"""The `tipsen` command line. Each command lives in its stage module; this file only dispatches.

A stage module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported only for the
command being run, so `tipsen --help` stays fast.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path

from tipsen.errors import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("tipsen.demodata", "write the deterministic synthetic KS-KEIT-V1 export"),
    "curate": ("tipsen.curate", "build KS-KEIT-V1.2 from a raw export"),
    "train": ("tipsen.train", "train one keyword's DreamBooth-LoRA"),
    "bank": ("tipsen.bank", "build or show the LoRA bank index (models/bank.json)"),
    "generate": ("tipsen.generate", "generate an image from a senior's prompt"),
    "refine": ("tipsen.assistant", "refine a prompt with the Senior Prompting Assistant"),
    "evaluate": ("tipsen.evaluate", "CLIP image-alignment evaluation (the paper's Table II)"),
    "export": ("tipsen.export", "write an adapter for AUTOMATIC1111, ComfyUI and kohya's sd-scripts"),
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
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # buffered output meets a closed pipe here, inside the guard, not at exit
    except BrokenPipeError:  # `tipsen bank show | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit either
        return 0
    return code


def _main(argv: list[str]) -> int:
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
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"tipsen {name}", description=COMMANDS[name][1])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="profile to use instead of params.yaml's 'profile:'")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log the resolved config, debug detail and the libraries' expected warnings")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # our progress at INFO; with -v our DEBUG too, which also lets the libraries' expected warnings through
    logging.getLogger("tipsen").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"tipsen {name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print(f"tipsen {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        refused = _refusal(exc)
        if refused is None:  # our own bug: a traceback
            raise
        print(f"tipsen {name}: error: {refused}", file=sys.stderr)
        return 1


def _refusal(exc: Exception) -> str | None:
    """One line for the machine refusing (a full disk, no permission, a file where a folder must be), else None.

    That is an OSError, or the same error reported by safetensors' Rust writer, which raises SafetensorError."""
    if not isinstance(exc, OSError):
        found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if found is None:
            return None
        exc = OSError(int(found[1]), os.strerror(int(found[1])))
    name = exc.filename
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and isinstance(name, (str, os.PathLike)):  # met a file on the way
        blocker = next((p for p in (Path(name), *Path(name).parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker}: is a file, where a folder is needed"
    return f"{name}: {exc.strerror or exc}" if name else str(exc.strerror or exc)


if __name__ == "__main__":
    sys.exit(main())
