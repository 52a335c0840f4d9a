"""Keyword routing on morphemes: the routing data set, homonyms, several keywords, and bad input."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from tipsen import routing

DATA = Path(__file__).resolve().parent / "data"
# The development set, and two sets each written blind to the rules by someone who saw only the keywords' names and
# descriptions (scored once before any rule changed for them: BENCHMARKS.md has those first figures).
SETS = {"routing": 150, "routing_heldout": 150, "routing_unseen": 120, "routing_blind3": 130,
        "routing_blind4": 120}  # name: its least number of sentences
# The last two were scored after the rules had been fitted to the others: their floors are on the whole set, a
# guard against regressions rather than the targets below (first and current figures are in BENCHMARKS.md).
OVERALL_FLOORS = {"routing_blind3": 0.97, "routing_blind4": 0.93}
# Floors per category: a drop below one is a regression. The targets the router is built for: names with particles
# and endings 98%, everyday-sense homonyms and no-keyword sentences 95% routed to nothing, descriptions without the
# name 60%. Measured figures are in BENCHMARKS.md (python -m benchmarks.routing).
FLOORS = {"name_inflected": 0.98, "compound": 0.95, "description": 0.9, "homonym_everyday": 0.95,
          "place_person_name": 0.9, "no_keyword": 0.95, "english": 0.95, "two_keywords": 0.9, "noisy": 0.95}


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


@pytest.mark.parametrize("name", SETS)
def test_the_data_sets_are_well_formed(name, registry):
    rows = load(name)
    assert len(rows) >= SETS[name] and len({r["text"] for r in rows}) == len(rows)
    assert {r["category"] for r in rows} <= set(FLOORS) and {"name_inflected", "homonym_everyday"} <= \
        {r["category"] for r in rows}
    for r in rows:
        assert set(r) == {"text", "expect", "category"} and r["text"].strip()
        assert set(r["expect"]) <= set(registry.keywords), r


@pytest.mark.parametrize("name", SETS)
def test_routing_accuracy_holds(name, registry):
    report = routing.evaluate(registry, load(name))
    if name in OVERALL_FLOORS:
        assert report["overall"] >= OVERALL_FLOORS[name], report["misses"]
        return
    below = {c: (a, FLOORS[c]) for c, a in report["accuracy"].items() if a < FLOORS[c]}
    assert not below, (below, [m for m in report["misses"] if m["category"] in below])


@pytest.mark.parametrize("text", ["문제를 제기했어요", "차례대로 줄을 섰어요", "약식으로 처리했어요", "세종시에 살아요",
                                  "서류와 씨름했어요", "chanok", "lunch with Chanok and the chanoks",
                                  "명찰을 달고나서야 들어갔지"])  # 달- 고 나서-: a name never ends on a verb stem
def test_an_everyday_word_is_not_a_keyword(registry, text):
    assert registry.route(text).slug is None


@pytest.mark.parametrize("text, slug", [
    ("할머니가 약과를 만들어 주셨지요", "yakgwa"),  # a particle and an honorific ending
    ("제기 차기를 하며 놀았어요", "jegichagi"),  # the two words of a compound, spaced
    ("김치를 담갔던 날", "gimjang"),  # an alias of two words, a particle between, the verb in another tense
    ("추석 차례를 지냈어요", "charye"),  # the homonym with a word that confirms it
    ("Two hanboks on the line", "hanbok"),  # an English plural
])
def test_names_route_through_particles_endings_and_plurals(registry, text, slug):
    route = registry.route(text)
    assert route.slug == slug and route.source == "alias" and route.confidence == 1.0, route


def test_a_second_keyword_needs_more_than_one_everyday_word(registry):
    # 제사상 is one of charye's everyday words, but here it is where the 약과 went: charye is only asked about
    route = registry.route("조청 발라 기름에 지진 꽃 모양 과자, 제사상에 올리던 거")
    assert (route.slug, route.also, route.ask) == ("yakgwa", (), ("charye",))
    assert route.source == "words" and not route.unsure


def test_two_keywords_keep_both_in_text_order(registry):
    route = registry.route("송편을 먹고 강강술래를 했지요")
    assert route.slugs == ("songpyeon", "ganggangsullae") and route.also == ("ganggangsullae",)
    assert registry.route("송편을 먹고 강강술래를 했지요", limit=1).also == ()


def test_a_bare_homonym_is_asked_about_not_drawn(registry):
    route = registry.route("차례")  # a rite, or a turn: without a word that says which, the senior is asked
    assert route.slug is None and route.ask == ("charye",)


@pytest.mark.parametrize("text", ["", "   ", "가" * 10_000, "🍪🍪🍪", "약\u200d과", "ｙａｋｇｗａ", "\x00\x01", "약과" * 3000,
                                  "김장\u0301", "ᄀᄀᄀ", "a" * 10_000])
def test_bad_input_routes_or_is_none_never_an_error(registry, text):
    route = registry.route(text)
    assert route.slug is None or route.slug in registry.keywords


def test_nfc_and_nfd_route_alike(registry):
    for text in ("할머니가 약과를 만들어 주셨지요", "설날에 한복 입고 세배했어요", "문제를 제기했어요"):
        nfd = unicodedata.normalize("NFD", text)
        assert nfd != text and registry.route(nfd).as_dict() == registry.route(text).as_dict()


def test_a_name_the_analyser_reads_as_a_verb_is_taught_as_a_noun(registry):
    # Without teaching, the analyser reads 달고나를 as 달- 고 나르- ㄹ ("carry"), and the name is lost.
    assert registry.route("달고나를 연탄불에 녹여 먹었잖아").slugs == ("dalgona", "yeontan")
    assert [m.surface for m in routing.analyse("달고나를")][:2] == ["달고나", "를"]  # taught by the registry


def test_an_ambiguous_name_is_sure_inside_a_compound_or_with_a_context_word(registry):
    bare = registry.route("손주 목욕시키느라 한바탕 씨름을 했지")  # "struggled": only asked about
    assert (bare.slug, bare.ask, bare.unsure) == (None, ("ssireum",), True)
    assert registry.route("단오날 씨름판이 크게 벌어졌지").slug == "ssireum"  # 씨름판 holds 씨름, 단오날 holds 단오
    assert registry.route("아버지는 동네에서 씨름을 제일 잘하셨어요").slug == "ssireum"


def test_place_suffixes_are_nouns():
    # A suffix the analyser reads as a verb would rule out the name before any verb: 가든 (a garden restaurant)
    # is 가- 든, and "불국사 가든" would then rule out "불국사에 갔어요".
    for suffix in routing.PLACES:
        assert not any(m.stem or m.ending for m in routing.analyse(suffix)), suffix


def test_business_names_are_not_keywords(registry):
    assert registry.route("아들이 강강술래 갈비집에서 칠순 잔치를 열어 줬어요").slug is None
    assert registry.route("신혼여행으로 불국사에 갔었어요").slug == "bulguksa"


def test_a_name_in_a_simile_is_only_a_question(registry):
    simile = registry.route("방이 추워서 이불을 김밥처럼 둘둘 말고 잤어요")  # rolled up like kimbap
    assert (simile.slug, simile.ask, simile.unsure) == (None, ("kimbap",), True)
    assert registry.route("연탄같이 까만 얼굴").slug is None
    assert registry.route("소풍 가서 김밥 먹었지").slug == "kimbap"


def test_a_name_used_as_someones_name_or_in_a_simile_with_a_title_is_not_drawn(registry):
    assert registry.route("둘째는 책만 끼고 살아서 별명이 세종대왕이었어").slug is None  # a nickname
    assert registry.route("외할머니 함자가 이순신이셨어").slug is None  # someone's name
    assert registry.route("네 할아버지가 이순신 장군처럼 용감하게 뱀을 때려잡았지").slug is None  # a simile
    assert registry.route("광화문에서 이순신 장군 동상을 봤어요").slug == "yisunsin"
