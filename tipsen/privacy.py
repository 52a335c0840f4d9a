"""The one rule for a senior's words in logs: they are personal, so a log line shows them only when switched on.

Off by default in every process. The service switches it on from `service.log_prompts`; anything that would log a
prompt, or text made from one (the assistant's answer), passes it through `shown` first.
"""
from __future__ import annotations

_SHOW = False


def log_prompts(on: bool) -> None:
    global _SHOW
    _SHOW = bool(on)


def shown(text: str | None, limit: int = 80) -> str:
    """`text` for a log line: its repr (cut at `limit`) when prompts may be logged, else only its length."""
    if text is None:
        return "None"
    return repr(text[:limit]) if _SHOW else f"<{len(text)} characters withheld>"
