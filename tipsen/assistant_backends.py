"""The assistant's backends: a deterministic template, a local transformers LLM, an OpenAI-compatible endpoint.

The LLM backends return raw answers; validation and the fallback to the template live in tipsen.assistant.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tipsen.config import AssistantParams
from tipsen.errors import ConfigError
from tipsen.registry import Keyword, normalize

log = logging.getLogger(__name__)

PREFIX = "A realistic photo of"
PHOTO_OF = re.compile(r"^\s*(?:an?\s+)?(?:realistic\s+)?(?:photo(?:graph)?|picture|image)\s+of\s+", re.I)
CLAUSE_END = ",;:.!?"
DANGLING = {"and", "with", "of", "the", "a", "an", "in", "on", "at", "for", "to", "while", "as", "by", "from"}

# ---------------------------------------------------------------- script and length helpers


def foreign_char(text: str) -> str | None:
    """The first character that is not Latin script, ASCII, Latin-1/general punctuation or a combining accent."""
    for ch in text:
        o = ord(ch)
        if o < 128 or 0xA0 <= o <= 0xBF or 0x2000 <= o <= 0x206F or 0x300 <= o <= 0x36F:
            continue
        if "LATIN" in unicodedata.name(ch, ""):
            continue
        return ch
    return None


def latin_only(text: str) -> str:
    """Drop every non-Latin character (SDXL's CLIP encoders cannot read Hangul) and collapse spaces."""
    return " ".join("".join(c if foreign_char(c) is None else " " for c in text).split())


def trim_words(text: str, max_words: int) -> str:
    """At most `max_words` words, cut at the last clause boundary in the second half if there is one."""
    words = text.split()
    if len(words) <= max_words:
        return text
    cut = next((i for i in range(max_words, max_words // 2, -1) if words[i - 1][-1] in CLAUSE_END), max_words)
    words = words[:cut]
    words[-1] = words[-1].rstrip(CLAUSE_END)
    while len(words) > 1 and words[-1].lower() in DANGLING:  # "... and" reads as a broken sentence
        words.pop()
    return " ".join(words).rstrip(CLAUSE_END) + "."


# ---------------------------------------------------------------- template

LIGHTING = ("soft morning light", "warm afternoon sunlight", "golden hour glow", "gentle overcast daylight",
            "warm lamplight", "late autumn sunlight", "bright clear daylight", "soft window light")
ATMOSPHERE = ("nostalgic atmosphere", "warm family atmosphere", "peaceful mood", "festive mood",
              "quiet timeless feeling", "lively community spirit", "cozy heartfelt atmosphere", "calm respectful mood")
SCENES = {
    "food": ("on a low wooden table in a family home", "served on a brass tray", "beside elders in hanbok",
             "at a bustling traditional market"),
    "tradition": ("with grandparents in hanbok", "in the courtyard of a traditional house",
                  "with three generations of a family", "in a rural village"),
    "place": ("with elderly visitors strolling nearby", "under a clear blue sky", "surrounded by autumn foliage",
              "with families in casual clothes"),
    "performance": ("performers in colourful hanbok", "before a smiling crowd", "at a village festival",
                    "on an outdoor stage"),
    "game": ("children and grandparents laughing together", "in a snowy village yard",
             "players in padded winter clothes", "on a festival ground"),
    "person": ("with visitors gathered in front", "in a wide city square", "with flowers laid at the base",
               "under a clear sky"),
    "history": ("with elders remembering the past", "in a 1970s setting", "with people in period clothing",
                "seen as in an old photograph"),
}
GENERIC_SCENES = ("with Korean seniors nearby", "in a Korean neighbourhood of past decades", "with a family together")
GENERIC_SUBJECT = "everyday life in Korea in past decades"


def clean_detail(text: str, kw: Keyword) -> str:
    """A dataset description as a prompt detail; empty for Korean text or a bare template prompt."""
    text = " ".join(str(text).split())
    if not text or foreign_char(text):
        return ""
    text = re.sub(rf"^{re.escape(kw.keyword)}\s*[:\-\u2013\u2014]\s*", "", text, flags=re.I)
    text = PHOTO_OF.sub("", text).strip(" .\"'")
    if normalize(text) in {normalize(f"{kw.keyword} {kw.class_token}"), *map(normalize, kw.names)}:
        return ""
    return re.sub(r"^(A|An|The) ", lambda m: m.group(1).lower() + " ", text)


class TemplateBackend:
    """Deterministic and offline: keyword + class, dataset details, scene, lighting and mood chosen by seed."""

    name = "template"

    def __init__(self, *, curated: Path | None, max_words: int):
        self.curated = Path(curated) if curated else None
        self.max_words = max_words
        self._details: dict[str, list[str]] = {}

    def details(self, kw: Keyword) -> list[str]:
        """English texts of the curated dataset, else the registry's English description."""
        if kw.slug not in self._details:
            found: list[str] = []
            meta = self.curated / kw.slug / "metadata.jsonl" if self.curated else None
            if meta is not None and meta.is_file():
                for line in meta.read_text(encoding="utf-8").splitlines():
                    try:
                        text = json.loads(line).get("text")
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    detail = clean_detail(text, kw) if isinstance(text, str) else ""
                    if detail and detail not in found:
                        found.append(detail)
            self._details[kw.slug] = found or [clean_detail(kw.description, kw) or kw.description]
        return self._details[kw.slug]

    def compose(self, text: str, kw: Keyword | None, seed: int) -> str:
        rng = random.Random(f"{kw.slug if kw else ''}|{seed}")  # str seeds hash stably across processes
        detail = rng.choice(self.details(kw)) if kw else None
        scene = rng.choice(SCENES.get(kw.category, GENERIC_SCENES) if kw else GENERIC_SCENES)
        light, mood = rng.choice(LIGHTING), rng.choice(ATMOSPHERE)
        extra = self._extra(text, kw)
        if kw is None:  # no keyword: the user's words (or a generic subject) become the subject
            subject, extra = trim_words(extra or GENERIC_SUBJECT, self.max_words // 2).rstrip("."), None
        else:
            subject = f"{kw.keyword} {kw.class_token}"
        head = f"{PREFIX} {subject}"
        budget, picked = self.max_words - len(head.split()), {}
        for key, part in (("extra", extra), ("light", light), ("mood", mood), ("detail", detail), ("scene", scene)):
            if part and budget >= min(3, len(part.split())):  # the user's words first, then lighting and mood
                part = trim_words(part, budget).rstrip(".")
                picked[key] = part
                budget -= len(part.split())
        parts = [picked[k] for k in ("extra", "detail", "scene", "light", "mood") if k in picked]
        return ", ".join([head, *parts]) + "."

    @staticmethod
    def _extra(text: str, kw: Keyword | None) -> str | None:
        """The user's own Latin words, when they say more than the keyword."""
        text = PHOTO_OF.sub("", latin_only(text)).strip(" .,;:!?\"'")
        if not text:
            return None
        if kw and normalize(text) in {normalize(f"{kw.keyword} {kw.class_token}"), *map(normalize, kw.names)}:
            return None
        return text.replace('"', "")


# ---------------------------------------------------------------- LLM backends


@dataclass(frozen=True)
class Reply:
    text: str | None
    requests: int  # requests made for this answer, retries included
    error: str | None = None  # set when no answer came back; no further attempt is made


LETTERS = "ABCDEFGH"  # option labels of a constrained choice: one token each in Llama 3's vocabulary


@dataclass(frozen=True)
class Choice:
    """The model's pick among labelled options: `index` into them, or None with the `error` that prevented it."""

    index: int | None
    probability: float | None = None  # the model's probability of its pick, where the backend can measure it
    error: str | None = None


def parse_choice(text: str | None, n: int) -> Choice:
    """An answer naming one of the first `n` option letters ("B", "B.", "(B) none of these"), else an error."""
    m = re.match(r"^\W*([A-Z])(?![A-Za-z])", text or "")
    if m and m.group(1) in LETTERS[:n]:
        return Choice(LETTERS.index(m.group(1)))
    return Choice(None, error=f"answer {(text or '').strip()[:40]!r} names none of the options {LETTERS[:n]}")


class TransformersBackend:
    """A local causal LM: chat template, sampling with per-prompt seeds, batched with left padding."""

    name = "transformers"

    def __init__(self, cfg: AssistantParams, *, ref: str, device: str = "auto", dtype: str = "auto"):
        self.cfg, self.ref, self.device, self.dtype = cfg, ref, device, dtype
        self.model = self.tokenizer = None
        self._lock = threading.Lock()
        self._load_error: Exception | None = None

    def load(self):
        """Load the model once, on first use, and reuse it. A failed load is not retried on every request."""
        with self._lock:
            if self._load_error is not None:
                raise self._load_error.with_traceback(None)  # a fresh traceback, not a growing one
            if self.model is None:
                from tipsen.models import load_llm

                try:
                    model, tok = load_llm(self.ref, device=self.device, dtype=self.dtype)
                except OSError as exc:
                    log.warning("could not load the LLM %r; the template answers instead", self.ref, exc_info=True)
                    self._load_error = exc
                    raise
                tok.padding_side = "left"  # batched decoding continues every row from the same right edge
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                self.model, self.tokenizer = model, tok
        return self.model, self.tokenizer

    def generate(self, conversations: list[list[dict]], seeds: list[int]) -> list[Reply]:
        try:
            self.load()
            bs = self.cfg.batch_size
            texts = [t for i in range(0, len(conversations), bs)
                     for t in self._batch(conversations[i:i + bs], seeds[i:i + bs])]
        except (OSError, RuntimeError) as exc:  # load failure, out of memory: serve the template instead
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
            if exc is not self._load_error:  # a load failure was logged in full once, in load()
                log.warning("transformers generate failed: %s", reason, exc_info=True)
            return [Reply(None, 1, reason) for _ in conversations]
        return [Reply(t, 1) for t in texts]

    def choose(self, conversations: list[list[dict]], sizes: list[int]) -> list[Choice]:
        """A constrained choice for each conversation: the option letter (of its first `sizes[i]`) that the model
        finds likeliest as the first token of its answer. One forward pass, no sampling, so always a valid pick."""
        import torch

        try:
            self.load()
            model, tok = self.model, self.tokenizer
            ids = [tok.encode(letter, add_special_tokens=False) for letter in LETTERS[:max(sizes)]]
            if any(len(i) != 1 for i in ids):
                raise RuntimeError(f"the tokenizer splits the option letters {LETTERS[:max(sizes)]}")
            picks = []
            for k in range(0, len(conversations), self.cfg.batch_size):
                enc = self._encode(conversations[k:k + self.cfg.batch_size])
                with torch.inference_mode():  # left padding: every row ends at the answer. Only the last
                    # position's logits: Llama 3's 128k vocabulary over every position of a batch is gigabytes
                    last = model(**enc, logits_to_keep=1).logits[:, -1, :].float()
                for row, n in zip(last, sizes[k:k + self.cfg.batch_size]):
                    probs = torch.softmax(row[[i[0] for i in ids[:n]]], dim=-1)
                    picks.append(Choice(int(probs.argmax()), round(float(probs.max()), 4)))
            return picks
        except (OSError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
            if exc is not self._load_error:
                log.warning("transformers choice failed: %s", reason, exc_info=True)
            return [Choice(None, error=reason) for _ in conversations]

    def _encode(self, conversations: list[list[dict]]):
        tok = self.tokenizer
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        # The chat template already holds the BOS token.
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)

    def _batch(self, conversations: list[list[dict]], seeds: list[int]) -> list[str]:
        import torch
        from transformers import LogitsProcessorList

        model, tok = self.model, self.tokenizer
        enc = self._encode(conversations)
        kwargs = dict(max_new_tokens=self.cfg.max_new_tokens, pad_token_id=tok.pad_token_id)
        if self.cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                          logits_processor=LogitsProcessorList([SeededSampler(seeds, self.cfg)]))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class SeededSampler:
    """Draw each row's next token from its own seeded generator, so an answer depends on its prompt and seed
    only, not on the batch it shares. It applies the same temperature and top-p warpers that `generate` adds
    after custom processors; those then see a one-hot row and leave it as it is."""

    def __init__(self, seeds: list[int], cfg: AssistantParams):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.seeds = seeds
        self.warpers = [TemperatureLogitsWarper(cfg.temperature), TopPLogitsWarper(cfg.top_p)]
        self.generators = None

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama).

    TIPSEN_LLM_BASE_URL and TIPSEN_LLM_MODEL override params; the API key is read only from the environment
    variable that `assistant.openai.api_key_env` names, and never logged.
    """

    name = "openai"

    def __init__(self, cfg: AssistantParams):
        import httpx

        self.cfg, o = cfg, cfg.openai
        base = os.environ.get("TIPSEN_LLM_BASE_URL") or o.base_url
        if not re.match(r"^https?://", base):
            raise ConfigError(f"TIPSEN_LLM_BASE_URL: {base!r} is not a URL; allowed: http://... or https://...")
        self.url = base.rstrip("/") + "/chat/completions"
        self.model = os.environ.get("TIPSEN_LLM_MODEL") or o.model
        self._key = os.environ.get(o.api_key_env) or None
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self.client = httpx.Client(timeout=o.timeout_s, headers=headers)

    def close(self) -> None:
        self.client.close()

    def generate(self, conversations: list[list[dict]], seeds: list[int]) -> list[Reply]:
        if len(conversations) == 1:
            return [self._complete(conversations[0], seeds[0])]
        # Concurrent requests: the server batches them (vLLM's continuous batching).
        with ThreadPoolExecutor(min(len(conversations), self.cfg.batch_size)) as pool:
            return list(pool.map(self._complete, conversations, seeds))

    def choose(self, conversations: list[list[dict]], sizes: list[int]) -> list[Choice]:
        """A constrained choice per conversation: asked greedily for one option letter, and parsed; an answer that
        names no option is an error (the caller keeps its own answer)."""
        def one(messages: list[dict], n: int) -> Choice:
            reply = self._complete(messages, 0, temperature=0.0, max_tokens=4)
            return Choice(None, error=reply.error) if reply.error else parse_choice(reply.text, n)

        with ThreadPoolExecutor(max(1, min(len(conversations), self.cfg.batch_size))) as pool:
            return list(pool.map(one, conversations, sizes))

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _complete(self, messages: list[dict], seed: int, **overrides) -> Reply:
        import httpx

        o, cfg = self.cfg.openai, self.cfg
        body = {"model": self.model, "messages": messages, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_tokens": cfg.max_new_tokens, "seed": seed, **overrides}
        tries = o.max_retries + 1
        for i in range(tries):
            try:
                r = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                reason = f"timeout after {o.timeout_s:g} s"
            except httpx.TransportError as exc:
                reason = f"connection error ({type(exc).__name__})"
            else:
                if r.status_code == 200:
                    try:
                        return Reply(r.json()["choices"][0]["message"]["content"] or "", i + 1)
                    except (ValueError, KeyError, IndexError, TypeError):
                        return Reply(None, i + 1, "malformed chat-completions response")
                reason = f"HTTP {r.status_code}"
                if r.status_code < 500 and r.status_code not in (408, 429):  # a client error will not heal
                    log.warning("openai endpoint %s: %s, not retried: %s", self.url, reason,
                                self._redact(r.text[:200]))
                    return Reply(None, i + 1, f"{reason}, not retried")
            log.warning("openai endpoint %s: %s (request %d/%d)", self.url, reason, i + 1, tries)
            if i + 1 < tries:
                time.sleep(o.backoff_s * 2 ** i)
        return Reply(None, tries, f"{reason} after {tries} requests")
