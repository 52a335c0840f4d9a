"""The Senior Prompting Assistant: a short, often Korean prompt -> a validated English prompt for SDXL.

An LLM (local transformers model or an OpenAI-compatible endpoint) follows the paper's Table I instruction
with in-context examples from the curated dataset. Every answer is validated; a rejected answer is retried
with a new seed, then the deterministic template takes over and the reason is recorded.
"""
from __future__ import annotations

import json
import logging
import re
import time
import unicodedata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tipsen.assistant_backends import (LETTERS, PHOTO_OF, PREFIX, OpenAIBackend, Reply, TemplateBackend,
                                       TransformersBackend, foreign_char, trim_words)
from tipsen.config import SEED_MAX, AssistantParams, Params, draw_seed, load_params
from tipsen.errors import ConfigError
from tipsen.privacy import shown
from tipsen.registry import Keyword, Registry, Route
from tipsen.routing import HANGUL

log = logging.getLogger(__name__)

INSTRUCTION = """You are a prompt engineer that creates high-quality prompts for image generation. Write a detailed \
prompt for an image generation model that describes this scene in a realistic photographic style.
Rules:
- Begin with "A realistic photo of".
- Include the exact input description.
- Include details about people, clothing, actions, environment, lighting and atmosphere.
- Use natural language that models can easily understand.
- Use at most {max_words} words.
Answer with the prompt only, on one line, without quotes or labels."""
CHOOSE = """You sort a senior's memory into the topics of a picture tool. Read the memory and the options, and \
answer with the letter of the topic the memory is about. If the memory is about none of these topics (a word in it \
may only look like a topic's name), answer with the letter of "none of these". Answer with the letter only."""
LABEL = re.compile(r"^(?:[*#>\s]*)(?:here(?:'s| is)\s+(?:the|a|your)\s+)?(?:refined|improved|final|new|image)?\s*"
                   r"(?:prompt|description|output|answer)\s*\**\s*[:\-\u2013]\s*\**\s*", re.I)
CHATTER = re.compile(r"^(?:sure|here|okay|ok|certainly|of course|i hope|note|let me|this prompt)\b", re.I)
QUOTES = str.maketrans("", "", "\"\u201c\u201d\u201e\u00ab\u00bb`*")


class Refinement(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str  # the refined English prompt
    original: str
    keyword: str | None  # the routed slug
    route: dict | None = None  # how the keyword was routed here (None: given by the caller)
    backend: Literal["template", "transformers", "openai"]  # the backend that produced `prompt`
    attempts: int  # requests to the configured backend, retries included (1 for the template)
    fallback_reason: str | None = None
    latency_s: float
    seed: int


class Rejected(ValueError):
    """An answer that failed validation; the message is the reason."""


def _one_line(text: str) -> str:
    """The prompt line of an answer, without chatter, labels, quotes or markdown."""
    lines = [" ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in line).split())
             for line in text.splitlines()]
    lines = [line for line in lines if line]
    hit = next((line for line in lines if "realistic photo of" in line.lower()), None)
    if hit is not None:
        line = hit[hit.lower().index("realistic photo of"):]
        line = re.sub(r"^realistic", "A realistic", line, flags=re.I)  # the article was cut off above
    else:
        line = next((x for x in lines if not CHATTER.match(x) and not x.endswith(":")), "")
        while (m := LABEL.match(line)) and m.end():
            line = line[m.end():]
    line = re.sub(r"\s*\(\d+ words?\)\s*$", "", line.translate(QUOTES))  # "(28 words)"
    return " ".join(line.strip(" '").split())


def validate(text: str | None, keyword: Keyword | None, *, max_words: int = 30) -> str:
    """The answer as a valid prompt, or `Rejected` with the reason."""
    line = _one_line(text or "")
    if not line:
        raise Rejected("empty answer")
    if (ch := foreign_char(line)) is not None:
        raise Rejected(f"non-Latin character {ch!r} ({unicodedata.name(ch, f'U+{ord(ch):04X}')})")
    if line.lower().startswith(PREFIX.lower()):
        line = PREFIX + line[len(PREFIX):]
    else:  # add the prefix, replacing a plain "A photo of"
        rest = PHOTO_OF.sub("", line)
        line = f"{PREFIX} {re.sub(r'^(A|An|The) ', lambda m: m.group(1).lower() + ' ', rest)}"
    line = trim_words(line, max_words)
    if len(line.split()) <= len(PREFIX.split()):
        raise Rejected("nothing after the prefix")
    for what, word in (("keyword", keyword.keyword), ("class token", keyword.class_token)) if keyword else ():
        pattern = rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])"
        if not re.search(pattern, line, re.I):
            raise Rejected(f"missing {what} {word!r} within {max_words} words")
        line = re.sub(pattern, word, line, flags=re.I)  # the registry's spelling, verbatim
    return line if line[-1] in ".!?" else line + "."


class Assistant:
    """Refines prompts with the configured backend; the template answers whenever the LLM cannot."""

    def __init__(self, cfg: AssistantParams, *, registry: Registry, template: TemplateBackend, llm=None):
        self.cfg, self.registry, self.template, self.llm = cfg, registry, template, llm
        for slug in cfg.examples:
            registry.get(slug, field="assistant.examples")

    @classmethod
    def from_params(cls, params: Params, *, registry: Registry | None = None,
                    curated: Path | None = Path("data/curated")) -> "Assistant":
        cfg, m = params.assistant, params.models
        llm = {"template": lambda: None, "openai": lambda: OpenAIBackend(cfg),
               "transformers": lambda: TransformersBackend(cfg, ref=m.llm, device=m.device, dtype=m.dtype)}
        return cls(cfg, registry=registry or Registry.load(),
                   template=TemplateBackend(curated=curated, max_words=cfg.max_words), llm=llm[cfg.backend]())

    def warm(self) -> None:
        """Load the backend's model now (a service is not ready before), or raise a one-line ConfigError: a first
        request must not pay the load, nor every request quietly fall back to the template."""
        if not hasattr(self.llm, "load"):
            return
        try:
            self.llm.load()
        except OSError as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"models.llm: {self.llm.ref!r} cannot be loaded ({why}); assistant.backend "
                              f"{self.cfg.backend} needs it") from None

    def close(self) -> None:
        if hasattr(self.llm, "close"):
            self.llm.close()

    def examples(self, kw: Keyword | None) -> list[Keyword]:
        """The configured examples, same category as the input first; topped up from that category if short."""
        pool = [self.registry[s] for s in self.cfg.examples if kw is None or s != kw.slug]
        if kw is not None:
            more = [k for k in self.registry if k.category == kw.category and k != kw and k not in pool]
            pool += more[: max(0, self.cfg.num_examples - len(pool))]
            pool.sort(key=lambda e: e.category != kw.category)  # stable: keeps the configured order otherwise
        return pool[: self.cfg.num_examples]

    @staticmethod
    def _ask(text: str, kw: Keyword | None) -> str:
        lines = [f'Input description: "{text}"']
        if kw is not None:
            lines.append(f'Keyword and class: "{kw.keyword} {kw.class_token}" (use these words exactly).')
        if foreign_char(text):
            lang = "Korean" if HANGUL.search(text) else "not in English"
            lines.append(f"The input is {lang}: translate it into English and write the prompt in English only.")
        return "\n".join(lines)

    def messages(self, text: str, kw: Keyword | None) -> list[dict]:
        """The chat: Table I instruction, in-context examples built from the curated texts, then the input."""
        msgs = [{"role": "system", "content": INSTRUCTION.format(max_words=self.cfg.max_words)}]
        for ex in self.examples(kw):
            msgs += [{"role": "user", "content": self._ask(f"{ex.prompt}.", ex)},
                     {"role": "assistant", "content": self.template.compose(ex.prompt, ex, 0)}]
        return msgs + [{"role": "user", "content": self._ask(text, kw)}]

    def choice_messages(self, text: str, slugs: tuple[str, ...]) -> list[dict]:
        """The chat for a constrained choice: the memory, then each candidate topic and "none" as a lettered option."""
        options = [f"{LETTERS[i]}. {k.keyword} ({k.ko}): {k.description}"
                   for i, k in enumerate(self.registry[s] for s in slugs)]
        options.append(f"{LETTERS[len(slugs)]}. none of these")
        return [{"role": "system", "content": CHOOSE},
                {"role": "user", "content": f'Memory: "{text}"\nOptions:\n' + "\n".join(options)}]

    def settle(self, texts: list[str], routes: list[Route]) -> list[Route]:
        """Each unsure route (`Route.unsure`) settled by the LLM as a constrained choice among its candidates or
        none, recorded as `source: llm`; the rest as they are. Without an LLM (the template backend) every route
        stays the rules'. A choice that fails keeps the rules' route, with the reason in `route.settled`."""
        todo = [i for i, r in enumerate(routes) if r.unsure and len(r.candidates) < len(LETTERS)]
        out = list(routes)
        if self.llm is None or not todo:
            return out
        cands = [routes[i].candidates for i in todo]
        picks = self.llm.choose([self.choice_messages(texts[i].strip(), c) for i, c in zip(todo, cands)],
                                [len(c) + 1 for c in cands])
        for i, c, pick in zip(todo, cands, picks):
            if pick.index is None:
                out[i] = routes[i].unsettled(by=self.llm.name, error=pick.error or "no choice")
                log.warning("assistant %s could not settle the route of %s: %s; the rules' route stands",
                            self.llm.name, shown(texts[i], 40), out[i].settled["error"])
            else:
                out[i] = routes[i].settle(c[pick.index] if pick.index < len(c) else None, by=self.llm.name,
                                          probability=pick.probability)
        return out

    def route(self, texts: list[str]) -> list[Route]:
        """The rules' route of each text, the unsure ones settled by the LLM."""
        return self.settle(texts, [self.registry.route(t) for t in texts])

    def refine(self, prompt: str, *, keyword: str | None = None, seed: int | None = None) -> Refinement:
        """One prompt; `keyword` is a slug (routed from the prompt when None), `seed` random when None."""
        return self.refine_batch([prompt], keywords=[keyword], seeds=[seed])[0]

    def refine_batch(self, prompts: list[str], *, keywords: list[str | Route | None] | None = None,
                     seeds: list[int | None] | None = None) -> list[Refinement]:
        """One Refinement per prompt, in order; the LLM sees the pending prompts as one batch per attempt.
        A keyword is a slug, a Route already taken (its slug, None for none), or None: routed here (`route`)."""
        n, t0 = len(prompts), time.perf_counter()
        keywords, seeds = keywords or [None] * n, seeds or [None] * n
        if len(keywords) != n or len(seeds) != n:
            raise ValueError(f"refine_batch: {n} prompts but {len(keywords)} keywords and {len(seeds)} seeds")
        for text, seed in zip(prompts, seeds):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError("prompt: must be a non-empty string")
            if seed is not None and not 0 <= seed <= SEED_MAX:
                raise ConfigError(f"seed: {seed} is out of range; allowed: 0 to {SEED_MAX}")
        todo = [i for i, k in enumerate(keywords) if k is None]
        routes: dict[int, Route] = dict(zip(todo, self.route([prompts[i] for i in todo])))
        kws, used = [], []
        for i, (slug, seed) in enumerate(zip(keywords, seeds)):
            slug = routes[i].slug if i in routes else slug.slug if isinstance(slug, Route) else slug
            kws.append(self.registry.get(slug, field="keyword") if slug else None)
            used.append(draw_seed() if seed is None else seed)  # recorded: reproducible
        out: list[Refinement | None] = [None] * n
        attempts, reasons, pending = [0] * n, [None] * n, list(range(n))

        def done(i: int, prompt: str, backend: str, reason: str | None = None) -> None:
            out[i] = Refinement(prompt=prompt, original=prompts[i], keyword=kws[i].slug if kws[i] else None,
                                route=routes[i].as_dict() if i in routes else None, backend=backend,
                                attempts=attempts[i] or 1, fallback_reason=reason,
                                latency_s=round(time.perf_counter() - t0, 4), seed=used[i])

        for k in range(self.cfg.attempts if self.llm else 0):
            if not pending:
                break
            convs = [self.messages(prompts[i].strip(), kws[i]) for i in pending]
            replies: list[Reply] = self.llm.generate(convs, [(used[i] + k * 1_000_003) % (SEED_MAX + 1)
                                                             for i in pending])
            retry = []
            for i, reply in zip(pending, replies):
                attempts[i] += reply.requests
                if reply.error:  # transport retries are spent, or the error is permanent: no new attempt
                    reasons[i] = reply.error
                else:
                    try:
                        done(i, validate(reply.text, kws[i], max_words=self.cfg.max_words), self.llm.name)
                        continue
                    except Rejected as exc:
                        reasons[i] = f"rejected: {exc}"
                        retry.append(i)
                log.warning("assistant %s attempt %d/%d for %s failed: %s; answer: %s", self.llm.name, k + 1,
                            self.cfg.attempts, shown(prompts[i], 40), reasons[i], shown(reply.text or ""))
            pending = retry
        for i in (i for i in range(n) if out[i] is None):
            prompt = validate(self.template.compose(prompts[i], kws[i], used[i]), kws[i], max_words=self.cfg.max_words)
            done(i, prompt, "template", f"{self.llm.name}: {reasons[i]}" if self.llm else None)
        return out


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help='a senior\'s prompt, e.g. "김장" or "A photo of Gimjang Tradition"')
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one, printed)")
    parser.add_argument("--backend", choices=["template", "transformers", "openai"], default=None,
                        help="override assistant.backend")
    parser.add_argument("--keyword", default=None, help="keyword slug (default: routed from the prompt)")
    parser.add_argument("--curated", default="data/curated", help="curated dataset for in-context examples")


def run(args) -> int:
    """Refine one prompt and print the Refinement as JSON."""
    params = load_params(args.params, profile=args.profile)
    if args.backend:
        params = params.override("assistant", {"backend": args.backend}, flags=True)
    params.log()
    assistant = Assistant.from_params(params, curated=Path(args.curated))
    try:
        result = assistant.refine(args.prompt, keyword=args.keyword, seed=args.seed)
    finally:
        assistant.close()
    print(json.dumps(result.model_dump(), ensure_ascii=False, indent=2))
    return 0
