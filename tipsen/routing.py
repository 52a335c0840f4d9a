"""Routing a senior's words to keywords: Korean on morphemes (kiwipiepy), English on whole words.

A name, an everyday word, a context word or an exclusion is a *pattern*. A pattern matches a run of the text's
morphemes when the run's surface, spaces left out, equals the pattern's (so "제기 차기" is "제기차기"), or when
the lemmas of its content morphemes equal the pattern's (so "김치를 담갔어요" is "김치 담그기"). A run always
starts and ends on a morpheme boundary: "세종시" is one morpheme, so it never contains "세종", and particles and
endings never hide a name. Latin patterns match whole words, spaces ignored, with a plural "s" or "es".

Each keyword is scored on its evidence:
- a name not ruled out by an exclusion ("문제 제기", "차례 대로") is 1.0, or `ASK` when that name is also an
  everyday word (the keyword's `ambiguous` names) and no context word confirms it;
- with no name, everyday words score `WORD` each, up to `WORDS_MAX`; a context word adds `CONTEXT`.
A keyword at `ROUTE` or above is routed; between `ASK` and `ROUTE` it is only a question for the senior. A route
whose main keyword is below `SURE`, or that only asks, is unsure: with an LLM backend the assistant settles it as a
constrained choice among its candidates or none (`Route.settle`, `source: llm`); the template keeps the rules'.
"""
from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

ROUTE, ASK = 0.5, 0.3  # confidence to route a keyword / to ask about it
SURE = 0.8  # below this a routed keyword is unsure: an LLM, where there is one, settles it (Route.unsure)
WORD, WORDS_MAX, CONTEXT = 0.5, 0.8, 0.2
# Nouns that make a keyword's name the name of a place or a business ("거북선횟집", "경복궁역"); not for foods,
# whose restaurants still serve them.
PLACES = ("역", "시장", "식당", "횟집", "갈비집", "고깃집", "다방", "회관", "상회", "마트", "슈퍼", "약국", "여관",
          "모텔", "노래방", "아파트", "빌라", "학교", "초등학교", "중학교", "고등학교", "대학교", "은행", "호텔", "경찰서",
          "병원", "대교", "터미널", "정류장", "정거장")
# Nouns that make the name after them someone's name or nickname ("별명이 세종대왕", "함자가 이순신"): for every keyword.
NAMING = ("별명", "이름", "함자", "성함", "애칭", "예명")
MAX_CHARS = 4000  # the analysis reads this much of a text; the service caps prompts at 1000 characters anyway
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff]")  # syllables and jamo
LATIN_WORD = re.compile(r"[a-z0-9]+")
COMPARISONS = ("처럼", "같이", "만큼", "마냥")
TITLES = ("장군", "대왕", "님", "선생", "선생님")  # may stand between a name and its comparison
NOT_CONTENT = ("J", "E", "S", "VCP", "VCN")  # particles, endings, punctuation, the copula: what a name may drop
_lock = threading.Lock()


def clean(text: str) -> str:
    """One form for matching: NFKC (full-width Latin, NFD Hangul composed), no zero-width characters, lower case."""
    return unicodedata.normalize("NFKC", text[:MAX_CHARS]).translate(ZERO_WIDTH).casefold()


@lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi(num_workers=1)


def teach(names) -> list[str]:
    """Teach the analyser the one-word names it reads as a verb or an adjective (달고나 as 달- 고 이- 나), as
    common nouns, so that "달고나를" is 달고나 + 를 and not 달- 고 나르- ㄹ. Returns the names taught."""
    taught = []
    with _lock:
        kiwi = _kiwi()
        for name in dict.fromkeys(clean(n) for n in names):
            if HANGUL.search(name) and " " not in name and \
                    any(t.tag in ("VV", "VA") for t in kiwi.tokenize(name)) and kiwi.add_user_word(name, "NNG", 0):
                taught.append(name)
    return taught


@dataclass(frozen=True)
class Morph:
    surface: str  # the text it covers, spaces removed
    lemma: str  # verbs and adjectives in their base form; a derivational 하 as 하다
    content: bool  # not a particle, ending, punctuation or the copula
    ending: bool  # an ending (E*) or punctuation
    noun: bool  # NN*: nouns may be written apart ("세종 대왕") and still be one name
    common_noun: bool  # NNG: may be a compound whose first part is a name (연탄재, 세뱃돈)
    spaced: bool  # a space comes before it
    stem: bool = False  # a verb or adjective stem (VV, VA, VX): no name ends on one (달고나서 is 달- 고 나서-)
    comparison: bool = False  # 처럼, 같이, 만큼, 마냥 or 같- ("like"): a name before it is a simile (김밥처럼 말다)


def analyse(text: str) -> list[Morph]:
    """The morphemes of Korean text (Latin words come through too, as single morphemes)."""
    with _lock:  # one analyser per process; its calls are short
        tokens = _kiwi().tokenize(text)
    out = []
    for t in tokens:
        lemma = "하다" if t.tag in ("XSV", "XSA") and t.form == "하" else t.lemma
        out.append(Morph(surface=re.sub(r"\s+", "", text[t.start:t.end]), lemma=lemma,
                         content=not t.tag.startswith(NOT_CONTENT) or t.tag in ("SH", "SN"),
                         ending=t.tag.startswith(("E", "S")) and t.tag != "SH", noun=t.tag.startswith("NN"),
                         common_noun=t.tag == "NNG", spaced=t.start > 0 and text[t.start - 1].isspace(),
                         stem=t.tag in ("VV", "VA", "VX"),
                         comparison=(t.tag == "JKB" and t.form in COMPARISONS) or (t.tag == "VA" and t.form == "같")))
    return out


@dataclass(frozen=True)
class Pattern:
    text: str
    latin: bool
    surface: str = ""  # Korean: the squeezed surface
    lemmas: str = ""  # Korean phrases and verbs: the content lemmas, concatenated
    words: str = ""  # Korean, for exclusions: the lemmas of everything but endings, concatenated
    latin_key: str = ""  # Latin: lower-case letters and digits only


def pattern(text: str) -> Pattern:
    text = clean(text)
    if not HANGUL.search(text):
        return Pattern(text, True, latin_key="".join(LATIN_WORD.findall(text)))
    morphs = analyse(text)
    # Lemmas only for a phrase or a verb ("김치 담그기", "빚다"): a single noun is matched on its surface, since
    # the analyser may read an unknown noun as a verb (달고나 as 달다 + 고 + 나).
    inflected = " " in text or text.endswith("다")
    return Pattern(text, False, surface=re.sub(r"\s+", "", text),
                   lemmas="".join(m.lemma for m in morphs if m.content) if inflected else "",
                   words="".join(m.lemma for m in morphs if not m.ending))


Spans = dict[str, list[tuple[int, int]]]


def _index(keys: list[tuple[str, int, bool]], longest: int, ends: list[bool] | None = None) -> Spans:
    """Every run of consecutive keys, concatenated (up to `longest` characters) -> its (first, last) indices.
    A key with a False flag ends any run it would join from the left (used to keep "큰 절" from being "큰절");
    a run ends only where `ends` allows (all keys when None)."""
    spans: Spans = {}
    for a in range(len(keys)):
        if not keys[a][0]:
            continue
        acc = ""
        for b in range(a, len(keys)):
            if b > a and not keys[b][2]:
                break
            acc += keys[b][0]
            if len(acc) > longest:
                break
            if keys[b][0] and (ends is None or ends[b]):  # nor on one with no surface (약과예요's copula)
                spans.setdefault(acc, []).append((keys[a][1], keys[b][1]))
    return spans


def _with_sai_siot(word: str) -> str:
    """`word` with the linking ㅅ (사이시옷) on its last syllable: 세배 -> 세뱃 (as in 세뱃돈), 김치 -> 김칫."""
    code = ord(word[-1]) - 0xAC00
    if not 0 <= code < 11172 or code % 28:
        return word  # not a Hangul syllable, or it already ends in a consonant
    return word[:-1] + chr(ord(word[-1]) + 19)  # final consonant index 19 is ㅅ


class Text:
    """A text analysed once, with every run of its morphemes indexed, for matching many patterns."""

    LONGEST = 24  # characters: no pattern is longer

    def __init__(self, raw: str):
        text = clean(raw)
        self.morphs = analyse(text) if HANGUL.search(text) else []
        m, n = self.morphs, self.LONGEST
        # a run of surfaces may cross a space only between nouns: "세종 대왕" is 세종대왕, "큰 절" is not 큰절
        self.surface = _index([(x.surface, i, not x.spaced or (x.noun and m[i - 1].noun)) for i, x in enumerate(m)],
                              n, ends=[not x.stem for x in m])
        self.lemmas = _index([(x.lemma, i, True) for i, x in enumerate(m) if x.content], n)
        self.words = _index([(x.lemma, i, True) for i, x in enumerate(m) if not x.ending], n)
        self.prefixes: Spans = {}  # a compound common noun's first part -> where
        for i, x in enumerate(m):
            if x.common_noun:
                for k in range(2, len(x.surface)):
                    self.prefixes.setdefault(x.surface[:k], []).append((i, i))
        self.latin = _index([(w, i, True) for i, w in enumerate(LATIN_WORD.findall(text))], 4 * n)

    def find(self, p: Pattern, *, exclusion: bool = False, compound: bool = False) -> list[tuple[int, int]]:
        """Where `p` occurs: morpheme (or, for Latin, word) index ranges. `compound`: also as the first part of a
        compound common noun (a name: 연탄재 holds 연탄)."""
        if p.latin:
            if not p.latin_key:
                return []
            return sorted({r for key in (p.latin_key, p.latin_key + "s", p.latin_key + "es")
                           for r in self.latin.get(key, ())})
        found = set(self.surface.get(p.surface, ()))
        if p.lemmas:
            found.update(self.lemmas.get(p.lemmas, ()))
        if exclusion and p.words:
            found.update(self.words.get(p.words, ()))
        if compound and len(p.surface) >= 2:
            found.update(self.prefixes.get(p.surface, ()))
            found.update(self.prefixes.get(_with_sai_siot(p.surface), ()))
        return sorted(found)

    def compared(self, r: tuple[int, int]) -> bool:
        """Whether the match `r` is followed by a comparison (처럼, 같이, 같은): a simile, not the thing itself.
        A title after the name counts as part of it ("이순신 장군처럼")."""
        end = r[1] + 1
        while end < len(self.morphs) and self.morphs[end].surface in TITLES:
            end += 1
        return end < len(self.morphs) and self.morphs[end].comparison

    def inside(self, p: Pattern, r: tuple[int, int]) -> bool:
        """Whether the match `r` of `p` is the first part of a longer compound noun (연탄 in 연탄재)."""
        return not p.latin and r[0] == r[1] and len(self.morphs[r[0]].surface) > len(p.surface)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


@dataclass(frozen=True)
class Candidate:
    slug: str
    confidence: float
    source: str  # "alias" (a name) or "words" (everyday words)
    evidence: tuple[str, ...]  # the patterns that matched, names first
    first: tuple[bool, int]  # where its first evidence is (Latin after Korean): breaks ties in text order


def _ruled_out(hit: tuple[int, int], exclusions: list[tuple[int, int]]) -> bool:
    """An exclusion is the name with a neighbour: it rules out a hit it overlaps and reaches beyond."""
    return any(_overlaps(hit, x) and x[1] - x[0] > hit[1] - hit[0] for x in exclusions)


def score(text: Text, slug: str, names: list[Pattern], words: list[Pattern], context: list[Pattern],
          exclude: list[Pattern], ambiguous: frozenset[str]) -> Candidate | None:
    """One keyword's evidence in `text`, or None. A name in `ambiguous` needs a context word to be sure."""
    ruled_out = [r for p in exclude for r in text.find(p, exclusion=True)]
    hits: list[tuple[Pattern, tuple[int, int]]] = [
        (p, r) for p in names for r in text.find(p, compound=True)
        if p.latin or not _ruled_out(r, ruled_out)]
    taken = [r for p, r in hits if not p.latin]

    def own(r: tuple[int, int]) -> bool:  # evidence of its own: apart from the names, or a name with more
        return all(not _overlaps(r, t) or r[1] - r[0] > t[1] - t[0] for t in taken)

    confirm = [p for p in context if any(own(r) for r in text.find(p, compound=True))]  # 단오날 holds 단오
    seen = [(p, rs[0]) for p in words if (rs := [r for r in text.find(p) if own(r)])]  # each word once, first place
    if hits:  # an everyday word confirms an ambiguous name as a context word does ("제기 차다"), and so does a
        # compound that holds it (씨름판): the everyday senses are the bare word. A name in a simile ("이불을
        # 김밥처럼 말고") is only a question, unless a context or everyday word confirms it.
        sure = bool(confirm) or bool(seen) or any(
            (p.text not in ambiguous or text.inside(p, r)) and not text.compared(r) for p, r in hits)
        evidence = [p.text for p, _ in hits] + [p.text for p, _ in seen] + [p.text for p in confirm]
        confidence, source = (1.0 if sure else ASK), "alias"
        first = min((p.latin, r[0]) for p, r in hits)
    else:
        if not seen:
            return None
        confidence = min(WORD * len(seen), WORDS_MAX) + (CONTEXT if confirm else 0.0)
        evidence, source = [p.text for p, _ in seen] + [p.text for p in confirm], "words"
        first = min((p.latin, r[0]) for p, r in seen)
    if confidence < ASK:
        return None
    return Candidate(slug, round(min(confidence, 1.0), 2), source, tuple(dict.fromkeys(evidence)), first)


def correct(route, expect: list[str]) -> bool:
    """A route is right when it draws the expected main keyword and recognises exactly the expected ones."""
    return (route.slug == (expect[0] if expect else None)) and set(route.slugs) == set(expect)


def evaluate(registry, rows: list[dict]) -> dict:
    """Accuracy per category of a routing data set (`{"text", "expect", "category"}` rows), with its misses."""
    per: dict[str, list[int]] = {}
    misses = []
    for row in rows:
        route = registry.route(row["text"])
        ok = correct(route, row["expect"])
        per.setdefault(row["category"], [0, 0])
        per[row["category"]][0] += ok
        per[row["category"]][1] += 1
        if not ok:
            misses.append({"text": row["text"], "category": row["category"], "expect": row["expect"],
                           "got": list(route.slugs), "ask": list(route.ask), "evidence": list(route.evidence)})
    return {"accuracy": {c: round(k / n, 4) for c, (k, n) in sorted(per.items())},
            "counts": {c: n for c, (_, n) in sorted(per.items())},
            "overall": round(sum(k for k, _ in per.values()) / max(1, len(rows)), 4), "misses": misses}
