"""The keyword registry: 30 entries, the paper's nine, and routing of free Korean and English text."""
import pytest

PAPER_NINE = {("Yakgwa", "Food", "약과"), ("Cheomseongdae", "Landmark", "첨성대"), ("Gimjang", "Tradition", "김장"),
              ("Ganggangsullae", "Dance", "강강술래"), ("Yaksik", "Food", "약식"), ("Hanbit", "Tower", "한빛탑"),
              ("Sejong Daewang", "King", "세종대왕"), ("Sebae", "Tradition", "세배"), ("Kimbap", "Food", "김밥")}


def test_registry_has_thirty_complete_entries(registry):
    assert len(registry) == 30
    assert PAPER_NINE <= {(k.keyword, k.class_token, k.ko) for k in registry}
    for k in registry:
        assert k.description and k.category and k.aliases
        assert k.prompt == f"A photo of {k.keyword} {k.class_token}"


@pytest.mark.parametrize("name, slug", [("gimjang", "gimjang"), ("Gimjang", "gimjang"), ("김장", "gimjang"),
                                        ("KIMJANG", "gimjang"), ("Sejong  Daewang", "sejong"), ("약밥", "yaksik")])
def test_resolve_any_spelling(registry, name, slug):
    assert registry.resolve(name).slug == slug


def test_resolve_unknown_is_none(registry):
    assert registry.resolve("pyramid") is None


@pytest.mark.parametrize("text, slug", [
    ("어릴 적 김장하던 날", "gimjang"),
    ("첨성대 앞에서 찍은 사진", "cheomseongdae"),
    ("A photo of Gimjang Tradition", "gimjang"),
    ("grandma making YAK GWA", "yakgwa"),
    ("세종대왕 동상", "sejong"),  # the longest alias wins over 세종
    ("추석 차례상 앞에서", "charye"),
])
def test_route(registry, text, slug):
    route = registry.route(text)
    assert route.slug == slug and route.source == "alias"


def test_route_prefers_longest_alias(registry):
    assert registry.route("세종대왕").matched == "세종대왕"


def test_route_explicit_wins_and_none(registry):
    assert registry.route("김장", explicit="kimbap").slug == "kimbap"
    none = registry.route("a quiet sunset over the sea")
    assert none.slug is None and none.source == "none"


def test_route_unknown_explicit_lists_choices(registry):
    from tipsen.errors import ConfigError

    with pytest.raises(ConfigError, match="keyword: unknown keyword 'pyramid'; allowed: buchaechum, bulguksa"):
        registry.route("x", explicit="pyramid")
