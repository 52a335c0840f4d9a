"""The keyword registry (`data/keywords.yaml`): lookup by slug, English or Korean name, and routing of free text."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tipsen.errors import ConfigError, first_error
from tipsen.paths import REGISTRY as REGISTRY_FILE
SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class Keyword(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(pattern=SLUG_PATTERN)
    keyword: str = Field(min_length=1)
    class_token: str = Field(min_length=1)
    ko: str = Field(min_length=1)
    category: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    description: str = Field(min_length=1)

    @property
    def prompt(self) -> str:
        """The DreamBooth template prompt, "A photo of [keyword] [class]"."""
        return f"A photo of {self.keyword} {self.class_token}"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.slug, self.keyword, self.ko, *self.aliases)


def normalize(text: str) -> str:
    """Case-, width- and spacing-insensitive form used for matching."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"[\s\-_'’.·]+", "", text)


@dataclass(frozen=True)
class Route:
    slug: str | None
    matched: str | None
    source: str  # "explicit", "alias" or "none"

    def as_dict(self) -> dict:
        return {"slug": self.slug, "matched": self.matched, "source": self.source}


class Registry:
    def __init__(self, keywords: list[Keyword]):
        self.keywords = {k.slug: k for k in keywords}
        if len(self.keywords) != len(keywords):
            raise ConfigError("keyword registry: duplicate slug")

    @classmethod
    def load(cls, path: str | Path = REGISTRY_FILE) -> "Registry":
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            return cls([Keyword(**item) for item in raw])
        except FileNotFoundError:
            raise ConfigError(f"keyword registry {path}: not found") from None
        except ValidationError as exc:
            raise ConfigError(f"keyword registry {path}: {first_error(exc)}") from None

    def __iter__(self):
        return iter(self.keywords.values())

    def __len__(self) -> int:
        return len(self.keywords)

    def __getitem__(self, slug: str) -> Keyword:
        return self.keywords[slug]

    @cached_property
    def _names(self) -> list[tuple[str, str]]:
        """(normalized name, slug), longest first so that routing prefers the longest alias."""
        pairs = {(normalize(n), k.slug) for k in self for n in k.names if normalize(n)}
        return sorted(pairs, key=lambda p: (-len(p[0]), p[0]))

    def resolve(self, name: str) -> Keyword | None:
        """Exact lookup of a slug, English name, Korean name or alias."""
        key = normalize(name)
        return next((self.keywords[slug] for n, slug in self._names if n == key), None)

    def get(self, slug: str, *, field: str = "keyword", allowed: list[str] | None = None) -> Keyword:
        """A keyword by slug, or a ConfigError naming the field and the valid slugs."""
        allowed = allowed if allowed is not None else sorted(self.keywords)
        if slug not in self.keywords or slug not in allowed:
            raise ConfigError(f"{field}: unknown keyword {slug!r}; allowed: {', '.join(allowed)}")
        return self.keywords[slug]

    def route(self, text: str, *, explicit: str | None = None, allowed: list[str] | None = None) -> Route:
        """Map free text to a keyword: an explicit slug wins, else the longest alias found in the text."""
        if explicit:
            self.get(explicit, allowed=allowed)
            return Route(explicit, explicit, "explicit")
        haystack = normalize(text)
        for name, slug in self._names:
            if name in haystack and (allowed is None or slug in allowed):
                return Route(slug, name, "alias")
        return Route(None, None, "none")
