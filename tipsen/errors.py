"""The user-error type and the one formatter of pydantic errors: one line naming the field and what is allowed."""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from pydantic import ValidationError


_UNION_TAG = re.compile(r"[-\[]")  # pydantic's name of a union member in an error's location: constrained-float


class ConfigError(ValueError):
    """A user's mistake in params or arguments: printed as one line, never a traceback."""


class NoTopic(ConfigError):
    """Korean words with no keyword in them and no assistant to translate them: nothing SDXL could read."""


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(err: Mapping[str, Any], *, prefix: str = "", allowed: Iterable[str] | None = None,
             skip: Iterable[str] = (), show_input: bool = True, unknown: str = "key") -> str:
    """One pydantic error (from `exc.errors()` or its JSON form) as 'key: message (got value)'.

    `prefix` names where the error sits ('profiles.demo', '--' for flags); `skip` drops location parts that
    are transport, not fields (BentoML's 'body'), unless nothing else is left; `allowed` lists the valid keys for
    an unknown one (in the order given), called a `unknown` ("key" in params, "field" in a request);
    `show_input` False leaves the offending value out (a service echoes no user text).
    """
    loc_parts = [str(p) for p in err.get("loc", ()) if not _UNION_TAG.search(str(p))]
    parts = [p for p in loc_parts if p not in set(skip)] or loc_parts
    loc = ".".join(parts)
    if prefix == "--":  # a command-line flag: --lora-scale
        key = f"--{loc.replace('_', '-')}" if loc else "arguments"
    else:
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "request")
    if err.get("type") == "extra_forbidden":
        names = list(allowed or ())
        return f"{key}: unknown {unknown}" + (f"; allowed: {', '.join(names)}" if names else "")
    text = f"{key}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}"
    return f"{text} (got {_shown(err['input'])})" if show_input and "input" in err and parts else text


def first_error(exc: ValidationError, **kw: Any) -> str:
    """The first error of a ValidationError, formatted by `describe`. For a field of several types (a number or a
    list of numbers) pydantic reports one error per type; the one about the value, not its type, is told."""
    errors = exc.errors()
    first = errors[0]
    if any(_UNION_TAG.search(str(p)) for p in first.get("loc", ())):
        same = [e for e in errors if [p for p in e["loc"] if not _UNION_TAG.search(str(p))][:1] ==
                [p for p in first["loc"] if not _UNION_TAG.search(str(p))][:1]]
        first = next((e for e in same if not str(e.get("type", "")).endswith("_type")), first)
    return describe(first, **kw)


def require(module: str, extra: str, *, what: str) -> None:
    """A ConfigError naming the extra to install when `module` (of an optional part of tipsen) is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what}: needs {module}, which this installation lacks; install it with "
                          f"pip install 'tipsen[{extra}]'")
