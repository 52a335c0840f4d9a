"""The keyword registry (`data/keywords.yaml`): lookup by slug, English or Korean name, and routing of free text."""
from __future__ import annotations

import dataclasses
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
    # Routing knowledge (tipsen/routing.py): everyday words a senior uses instead of the name; words that confirm
    # the name where it is also an everyday word; patterns where the name is used in its everyday sense; and
    # the names that are also everyday words, which route only with a context word (else the router asks).
    words: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ambiguous: tuple[str, ...] = ()

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
    slug: str | None  # the keyword drawn; None: the base model alone
    matched: str | None  # the name or words that chose it
    source: str  # "explicit", "alias" (a name), "words" (everyday words) or "none"
    confidence: float = 0.0
    evidence: tuple[str, ...] = ()  # every pattern that matched for `slug`
    also: tuple[str, ...] = ()  # further keywords routed, in order of confidence
    ask: tuple[str, ...] = ()  # keywords only suspected: a page asks before drawing them
    # How an LLM settled an unsure route (tipsen.assistant.Assistant.settle): its backend, the candidates it was
    # offered, its choice and probability, the rules' answer; or the error for which the rules' answer stands.
    settled: dict | None = None

    @property
    def slugs(self) -> tuple[str, ...]:
        return ((self.slug,) if self.slug else ()) + self.also

    @property
    def unsure(self) -> bool:
        """Worth a second opinion: not named explicitly, and its main keyword only suspected or weakly evidenced."""
        from tipsen.routing import SURE

        return self.source in ("alias", "words", "none") and self.settled is None and (
            (self.slug is None and bool(self.ask)) or (self.slug is not None and self.confidence < SURE))

    @property
    def candidates(self) -> tuple[str, ...]:
        """The keywords an unsure route hesitates between: the routed ones, then the suspected ones."""
        return tuple(dict.fromkeys(self.slugs + self.ask))

    def _record(self, by: str, choice: str | None, probability: float | None, error: str | None) -> dict:
        return {"by": by, "candidates": list(self.candidates), "choice": choice, "probability": probability,
                "rule": self.slug, "error": error}

    def settle(self, choice: str | None, *, by: str, probability: float | None = None) -> "Route":
        """This route as settled by `by` (an LLM backend) choosing `choice` among `candidates`, or none of them."""
        from tipsen.routing import ROUTE

        record = self._record(by, choice, probability, None)
        if choice is None:
            return Route(None, None, "llm", probability or 0.0, settled=record)
        if choice not in self.candidates:
            raise ValueError(f"settle: {choice!r} is not among the candidates {self.candidates}")
        same = choice == self.slug
        return Route(choice, self.matched if same else None, "llm",
                     probability if probability is not None else (self.confidence if same else ROUTE),
                     self.evidence if same else (), tuple(s for s in self.also if s != choice), (), record)

    def unsettled(self, *, by: str, error: str) -> "Route":
        """This route kept as the rules gave it, with why `by` could not settle it."""
        return dataclasses.replace(self, settled=self._record(by, None, None, error))

    def as_dict(self) -> dict:
        return {"slug": self.slug, "matched": self.matched, "source": self.source, "confidence": self.confidence,
                "evidence": list(self.evidence), "also": list(self.also), "ask": list(self.ask),
                "settled": self.settled}


NO_ROUTE = Route(None, None, "none")


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

    @cached_property
    def _patterns(self) -> dict[str, tuple[list, list, list, list, frozenset[str]]]:
        """Each keyword's names, words, context and exclusions as routing patterns (analysed once)."""
        from tipsen import routing

        routing.teach(n for k in self for n in (k.ko, *k.aliases))  # before any text is analysed with them

        def pats(texts) -> list:
            return [routing.pattern(t) for t in dict.fromkeys(texts) if routing.clean(t).strip()]

        def exclusions(k: Keyword) -> list:  # a name before a business or a station is a place name (거북선횟집);
            # after 별명 or 함자 it is someone's name (별명이 세종대왕)
            hangul = [n for n in (k.ko, *k.aliases) if routing.HANGUL.search(n)]
            places = [] if k.category == "food" else [f"{n} {suffix}" for n in hangul for suffix in routing.PLACES]
            return pats((*k.exclude, *places, *(f"{noun} {n}" for n in hangul for noun in routing.NAMING)))

        return {k.slug: (pats((k.keyword, k.ko, *k.aliases)), pats(k.words), pats(k.context), exclusions(k),
                         frozenset(routing.clean(a) for a in k.ambiguous)) for k in self}

    def route(self, text: str, *, explicit: str | list[str] | None = None, allowed: list[str] | None = None,
              limit: int = 3) -> Route:
        """Map free text to keywords: explicit slugs win (the first drawn, [] for none); else the best-scored
        keyword (tipsen/routing.py), with up to `limit - 1` more in `also` and the suspected ones in `ask`."""
        from tipsen import routing

        if explicit is not None:
            chosen = [explicit] if isinstance(explicit, str) else list(explicit)
            for slug in chosen:
                self.get(slug, allowed=allowed)
            if not chosen:
                return Route(None, None, "explicit", 1.0)
            return Route(chosen[0], chosen[0], "explicit", 1.0, tuple(chosen), tuple(chosen[1:limit]))
        parsed = routing.Text(text)
        found = [c for slug, (names, words, context, exclude, ambiguous) in self._patterns.items()
                 if allowed is None or slug in allowed
                 if (c := routing.score(parsed, slug, names, words, context, exclude, ambiguous)) is not None]
        found.sort(key=lambda c: (-c.confidence, c.first, c.slug))
        # the main keyword needs ROUTE; one beside it needs SURE, else it is only asked about (a single everyday
        # word of another keyword in a description: 제사상 in a sentence about 약과)
        routed = [c for i, c in enumerate(found) if c.confidence >= (routing.SURE if i else routing.ROUTE)][:limit]
        ask = tuple(c.slug for c in found if c not in routed)
        if not routed:
            return Route(None, None, "none", ask=ask)
        top = routed[0]
        return Route(top.slug, top.evidence[0], top.source, top.confidence, top.evidence,
                     tuple(c.slug for c in routed[1:]), ask)
