"""The Senior Prompting Assistant: validation, the template, tiny:llm through transformers, and a real HTTP
chat-completions endpoint on 127.0.0.1."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tipsen.assistant import Assistant, Rejected, validate
from tipsen.config import AssistantParams, ModelsParams, OpenAIParams, Params
from tipsen.errors import ConfigError

KEY = "sk-test-7f3a9c1e5b2d"  # a made-up key: it must never reach the logs
GOOD = ("A realistic photo of Gimjang Tradition, grandmothers in aprons salting cabbages in a courtyard, "
        "soft autumn light, warm family atmosphere.")


def assistant(registry, curated=None, **cfg) -> Assistant:
    params = Params(profile="test", keywords=["gimjang"], models=ModelsParams(llm="tiny:llm"),
                    assistant=AssistantParams(**cfg))
    return Assistant.from_params(params, registry=registry, curated=curated)


def assert_valid(prompt: str, kw) -> None:
    assert prompt.startswith("A realistic photo of ")
    assert len(prompt.split()) <= 30
    assert kw.keyword in prompt and kw.class_token in prompt
    assert prompt.isascii() and "\n" not in prompt and '"' not in prompt


# ---------------------------------------------------------------- validation


def test_validate_cleans_chatter_labels_and_quotes(registry):
    kw = registry["gimjang"]
    assert validate(f'Refined Prompt: "{GOOD}"', kw) == GOOD
    assert validate(f"Sure! Here is the refined prompt:\n\n\u201c{GOOD}\u201d\n\nI hope this helps!", kw) == GOOD
    assert validate(f"**Prompt:** {GOOD} (19 words)", kw) == GOOD
    assert validate(GOOD.upper().replace("A REALISTIC", "a REALISTIC"), kw).startswith(
        "A realistic photo of Gimjang Tradition")  # prefix and keyword take their canonical spelling
    assert validate("Korean women making kimchi for Gimjang Tradition", kw) == \
        "A realistic photo of Korean women making kimchi for Gimjang Tradition."  # only the prefix was missing
    assert validate("A photo of Gimjang Tradition with grandmothers", kw) == \
        "A realistic photo of Gimjang Tradition with grandmothers."


@pytest.mark.parametrize("answer, reason", [
    ("A realistic photo of Gimjang Tradition, 김장 with grandmothers.", "non-Latin"),
    ("A realistic photo of Gimjang Tradition, 泡菜 in jars.", "non-Latin"),
    ("A realistic photo of Korean women making kimchi in autumn.", "missing keyword"),
    ("A realistic photo of Gimjang, women making kimchi in autumn.", "missing class token"),
    ("   \n\n  ", "empty"),
    ("Refined Prompt: A realistic photo of", "nothing after"),
])
def test_validate_rejects(registry, answer, reason):
    with pytest.raises(Rejected, match=reason):
        validate(answer, registry["gimjang"])


def test_validate_trims_45_words_at_a_clause(registry):
    kw = registry["gimjang"]
    long = ("A realistic photo of Gimjang Tradition, three generations of a family in padded winter jackets, "
            "salting napa cabbages in rubber basins, in the courtyard of an old tiled house, under soft "
            "late autumn light, with steam rising from pots and neighbours laughing nearby, nostalgic mood")
    assert len(long.split()) == 45
    out = validate(long, kw)
    assert len(out.split()) <= 30 and out.endswith("house.")  # cut after the last clause that fits
    late = "A realistic photo of " + "many " * 30 + "people at Gimjang Tradition."
    with pytest.raises(Rejected, match="missing keyword 'Gimjang' within 30 words"):
        validate(late, kw)


# ---------------------------------------------------------------- template


def test_template_gives_a_valid_prompt_for_every_keyword(registry):
    a = assistant(registry, backend="template")
    assert len(registry) == 30
    for kw in registry:
        for text in (kw.prompt, kw.ko, f"{kw.ko} 어릴 적 추억"):
            r = a.refine(text, seed=11)
            assert (r.backend, r.attempts, r.fallback_reason, r.original) == ("template", 1, None, text)
            if text != kw.prompt and kw.ko in kw.ambiguous:  # 차례, 약식: a turn, a formality; the router asks
                assert r.keyword is None, text
                continue
            assert r.keyword == kw.slug, text  # Korean names route to their keyword
            assert_valid(r.prompt, kw)


def test_template_routes_korean_sentences(registry):
    a = assistant(registry, backend="template")
    r = a.refine("어릴 적 김장하던 날", seed=1)
    assert r.keyword == "gimjang" and "Gimjang Tradition" in r.prompt
    r = a.refine("첨성대 앞에서", seed=1)
    assert r.keyword == "cheomseongdae" and "Cheomseongdae Landmark" in r.prompt
    r = a.refine("고향 바다", seed=1)  # no keyword: still a valid English prompt
    assert r.keyword is None and r.prompt.startswith("A realistic photo of") and r.prompt.isascii()


def test_template_is_deterministic_by_seed(registry):
    a, b = assistant(registry, backend="template"), assistant(registry, backend="template")
    assert a.refine("김장", seed=5).prompt == b.refine("김장", seed=5).prompt
    assert len({a.refine("김장", seed=s).prompt for s in range(10)}) > 1
    r = a.refine("김장")  # no seed: a random one, recorded so that the prompt can be reproduced
    assert b.refine("김장", seed=r.seed).prompt == r.prompt


def test_template_and_examples_use_curated_english_texts(registry, tmp_path):
    (tmp_path / "gimjang").mkdir()
    rows = [{"file_name": "0.png", "text": "김장 — 어릴 적 추억"},
            {"file_name": "1.png", "text": "Gimjang: grandmothers salting cabbages in red basins."}, "not json"]
    (tmp_path / "gimjang" / "metadata.jsonl").write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    a = assistant(registry, curated=tmp_path, backend="template", examples=["gimjang"], num_examples=1)
    assert a.template.details(registry["gimjang"]) == ["grandmothers salting cabbages in red basins"]
    assert "grandmothers salting cabbages" in a.refine("김장", seed=0).prompt
    # No curated texts for hanok: the registry's English description is used.
    assert a.template.details(registry["hanok"]) == ["a traditional wooden house with a curved tiled roof"]
    msgs = a.messages("A photo of Hanok House", registry["hanok"])
    assert msgs[0]["role"] == "system" and "Begin with \"A realistic photo of\"" in msgs[0]["content"]
    assert "at most 30 words" in msgs[0]["content"]
    assert msgs[1] == {"role": "user", "content": 'Input description: "A photo of Gimjang Tradition."\n'
                       'Keyword and class: "Gimjang Tradition" (use these words exactly).'}
    assert "grandmothers salting cabbages" in msgs[2]["content"] and msgs[2]["role"] == "assistant"
    assert "translate" not in msgs[-1]["content"] and "Hanok House" in msgs[-1]["content"]
    assert "translate it into English" in a.messages("한옥", registry["hanok"])[-1]["content"]


def test_examples_prefer_the_same_category(registry):
    a = assistant(registry, backend="template", examples=["sebae", "kimbap"], num_examples=1)
    assert [e.slug for e in a.examples(registry["yakgwa"])] == ["kimbap"]
    assert [e.slug for e in a.examples(registry["gimjang"])] == ["sebae"]
    b = assistant(registry, backend="template", examples=["sebae", "kimbap"], num_examples=2)
    assert [e.slug for e in b.examples(registry["hanok"])] == ["sebae", "kimbap"]  # configured order
    assert [e.slug for e in b.examples(registry["sebae"])] == ["gimjang", "kimbap"]  # itself excluded, topped up
    with pytest.raises(ConfigError, match="assistant.examples: unknown keyword 'pyramid'"):
        assistant(registry, backend="template", examples=["pyramid"])


def test_refine_batch_keeps_order_and_checks_inputs(registry):
    a = assistant(registry, backend="template")
    kws = list(registry)
    out = a.refine_batch([k.prompt for k in kws], seeds=list(range(30)))
    assert [r.keyword for r in out] == [k.slug for k in kws]
    assert [r.seed for r in out] == list(range(30))
    assert a.refine("내 어린 시절", keyword="hanok", seed=0).keyword == "hanok"  # an explicit keyword wins
    with pytest.raises(ValueError, match="2 prompts but 1 keywords"):
        a.refine_batch(["a", "b"], keywords=["gimjang"])
    with pytest.raises(ConfigError, match="keyword: unknown keyword 'pyramid'"):
        a.refine("x", keyword="pyramid")
    with pytest.raises(ConfigError, match="prompt"):
        a.refine("  ")


def test_cli_prints_json(root, tmp_path, capsys):
    from tipsen.cli import main

    rc = main(["refine", "김장", "--seed", "3", "--params", str(root / "params.yaml"), "--profile", "demo",
               "--backend", "template", "--curated", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["keyword"] == "gimjang" and out["original"] == "김장" and out["seed"] == 3
    assert out["backend"] == "template" and out["prompt"].startswith("A realistic photo of Gimjang Tradition")
    assert main(["refine", "김장", "--keyword", "pyramid", "--params", str(root / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown keyword 'pyramid'" in err


# ---------------------------------------------------------------- transformers on tiny:llm


@pytest.fixture(scope="module")
def llm_assistant(registry):
    return assistant(registry, backend="transformers", num_examples=1, max_new_tokens=8, attempts=2)


def test_transformers_rejects_gibberish_and_falls_back(llm_assistant, registry, monkeypatch, caplog):
    model, tok = llm_assistant.llm.load()
    calls = []
    real_generate = model.generate

    def spy(*args, **kwargs):  # records the arguments; the generation itself is real
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    with caplog.at_level(logging.WARNING, logger="tipsen.assistant"):
        r = llm_assistant.refine("어릴 적 김장하던 날", seed=1)
    assert len(calls) == 2  # two attempts, both real sampling calls
    for kw in calls:
        assert kw["do_sample"] is True and kw["temperature"] == 0.8 and kw["top_p"] == 0.9
        assert kw["max_new_tokens"] == 8
    text = tok.decode(calls[0]["input_ids"][0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "<|start_header_id|>user<|end_header_id|>\n\nInput description: \"어릴 적 김장하던 날\"" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # generation prompt
    assert "translate it into English" in text and "A realistic photo of Sebae Tradition" in text
    # The random model's answer failed validation twice; the template answered and the reason is recorded.
    assert (r.backend, r.attempts, r.keyword) == ("template", 2, "gimjang")
    assert r.fallback_reason.startswith("transformers: rejected:")
    assert_valid(r.prompt, registry["gimjang"])
    rejected = [rec for rec in caplog.records if "failed: rejected" in rec.getMessage()]
    assert len(rejected) == 2
    # A senior's words are personal: by default the log keeps their length, never the words or the answer.
    assert "김장하던" not in caplog.text and "characters withheld" in rejected[0].getMessage()


def test_prompts_are_logged_only_when_switched_on(llm_assistant, caplog):
    from tipsen import privacy

    privacy.log_prompts(True)
    try:
        with caplog.at_level(logging.WARNING, logger="tipsen.assistant"):
            llm_assistant.refine("어릴 적 김장하던 날", seed=1)
    finally:
        privacy.log_prompts(False)
    assert "어릴 적 김장하던 날" in caplog.text


def test_transformers_batch_matches_single_calls_per_seed(llm_assistant, registry):
    be = llm_assistant.llm
    c1 = llm_assistant.messages("김장", registry["gimjang"])
    c2 = llm_assistant.messages("A photo of Hanok House by the river at dusk", registry["hanok"])
    batch = be.generate([c1, c2], [5, 6])  # different lengths: left padding
    assert [r.text for r in batch] == [be.generate([c1], [5])[0].text, be.generate([c2], [6])[0].text]
    assert batch[0].text != be.generate([c1], [7])[0].text  # the seed matters


def test_transformers_load_failure_falls_back(registry):
    params = Params(profile="test", keywords=["gimjang"], models=ModelsParams(llm="no-such-org/no-such-model"),
                    assistant=AssistantParams(backend="transformers"))
    r = Assistant.from_params(params, registry=registry, curated=None).refine("김장", seed=0)
    assert r.backend == "template" and r.fallback_reason.startswith("transformers: OSError")


# ---------------------------------------------------------------- openai-compatible endpoint on 127.0.0.1


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        step = self.server.script.pop(0) if self.server.script else (500, "script exhausted", 0)
        status, content, delay = step(body) if callable(step) else step
        time.sleep(delay)
        payload = ({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}]} if status == 200 else {"error": {"message": content}})
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads, server.block_on_close = True, False
    server.script, server.requests = [], []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def openai(registry, endpoint, monkeypatch):
    monkeypatch.setenv("TIPSEN_TEST_LLM_KEY", KEY)
    monkeypatch.delenv("TIPSEN_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("TIPSEN_LLM_MODEL", raising=False)
    opts = OpenAIParams(base_url=endpoint.url, model="llama-test", api_key_env="TIPSEN_TEST_LLM_KEY",
                        timeout_s=0.5, max_retries=1, backoff_s=0.01)
    a = assistant(registry, backend="openai", attempts=2, openai=opts)
    yield a
    a.close()


def test_openai_good_answer(openai, endpoint, registry):
    endpoint.script = [(200, f"Here is the refined prompt:\n\"{GOOD}\"", 0)]
    r = openai.refine("김장", seed=7)
    assert (r.prompt, r.backend, r.attempts, r.fallback_reason, r.seed) == (GOOD, "openai", 1, None, 7)
    (req,) = endpoint.requests
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert (body["model"], body["temperature"], body["top_p"], body["seed"]) == ("llama-test", 0.8, 0.9, 7)
    assert body["max_tokens"] == 80 and body["messages"][0]["role"] == "system"
    assert "김장" in body["messages"][-1]["content"] and "translate" in body["messages"][-1]["content"]


def test_openai_over_long_answers(openai, endpoint):
    long = GOOD.rstrip(".") + ", " + ", ".join(["children running between the jars"] * 5) + "."
    endpoint.script = [(200, long, 0)]
    r = openai.refine("김장", seed=1)
    assert r.backend == "openai" and r.attempts == 1 and len(r.prompt.split()) <= 30  # trimmed at a clause
    # Over-long with the keyword past the limit: rejected, retried with a new seed, then accepted.
    endpoint.requests.clear()
    endpoint.script = [(200, "A realistic photo of " + "old " * 40 + "Gimjang Tradition.", 0), (200, GOOD, 0)]
    r = openai.refine("김장", seed=1)
    assert (r.prompt, r.backend, r.attempts) == (GOOD, "openai", 2)
    assert endpoint.requests[0]["body"]["seed"] != endpoint.requests[1]["body"]["seed"]


def test_openai_retries_a_500(openai, endpoint):
    endpoint.script = [(500, "overloaded", 0), (200, GOOD, 0)]
    r = openai.refine("김장", seed=2)
    assert (r.prompt, r.backend, r.attempts) == (GOOD, "openai", 2) and len(endpoint.requests) == 2


def test_openai_timeout_falls_back(openai, endpoint, registry):
    endpoint.script = [(200, GOOD, 2.0), (200, GOOD, 2.0)]  # slower than timeout_s=0.5
    r = openai.refine("김장", seed=3)
    assert r.backend == "template" and r.attempts == 2 and len(endpoint.requests) == 2
    assert "timeout" in r.fallback_reason
    assert_valid(r.prompt, registry["gimjang"])


def test_openai_401_is_not_retried_and_the_key_is_not_logged(openai, endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    endpoint.script = [lambda body: (401, f"Incorrect API key provided: {KEY}", 0), (200, GOOD, 0)]
    r = openai.refine("김장", seed=4)
    assert len(endpoint.requests) == 1  # no retry on a client error
    assert r.backend == "template" and r.attempts == 1 and "HTTP 401" in r.fallback_reason
    assert "HTTP 401" in caplog.text and "Incorrect API key provided: ***" in caplog.text
    assert KEY not in caplog.text


def test_openai_batch_is_concurrent_and_in_order(openai, endpoint):
    def answer(body):  # answers with the keyword the request asked for
        phrase = re.search(r'Keyword and class: "([^"]+)"', body["messages"][-1]["content"]).group(1)
        return 200, f"A realistic photo of {phrase}, elders in hanbok smiling, soft light.", 0.05

    endpoint.script = [answer] * 4
    out = openai.refine_batch(["김장", "한옥", "첨성대", "떡국"], seeds=[1, 2, 3, 4])
    assert [r.keyword for r in out] == ["gimjang", "hanok", "cheomseongdae", "tteokguk"]
    assert all(r.backend == "openai" for r in out)
    assert "Hanok House" in out[1].prompt and "Tteokguk Food" in out[3].prompt
    assert sorted(req["body"]["seed"] for req in endpoint.requests) == [1, 2, 3, 4]


def test_openai_connection_error_is_retried_then_falls_back(registry, monkeypatch):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("TIPSEN_LLM_BASE_URL", raising=False)
    opts = OpenAIParams(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01)
    r = assistant(registry, backend="openai", openai=opts).refine("김장", seed=0)
    assert r.backend == "template" and r.attempts == 3 and "connection error" in r.fallback_reason


def test_openai_base_url_must_be_http(registry, monkeypatch):
    from tipsen.config import parse_params

    with pytest.raises(ConfigError, match="assistant.openai.base_url"):
        parse_params({"profile": "p", "keywords": ["gimjang"],
                      "profiles": {"p": {"assistant": {"openai": {"base_url": "localhost:8000/v1"}}}}})
    monkeypatch.setenv("TIPSEN_LLM_BASE_URL", "file:///etc/passwd")
    with pytest.raises(ConfigError, match="TIPSEN_LLM_BASE_URL"):
        assistant(registry, backend="openai")


# ---------------------------------------------------------------- the LLM settles an unsure route


def _choice_server(letter: str):
    """A chat-completions step that answers a constrained choice (max_tokens 4) with `letter`, and a prompt
    request with a valid prompt for the keyword it names."""
    def answer(body):
        if body["max_tokens"] == 4:
            return 200, letter, 0
        phrase = re.search(r'Keyword and class: "([^"]+)"', body["messages"][-1]["content"])
        return 200, f"A realistic photo of {phrase.group(1) if phrase else 'a honey cookie'}, soft light.", 0
    return answer


def test_openai_settles_an_unsure_route_as_a_constrained_choice(openai, endpoint, registry):
    rule = registry.route("꿀과자를 먹었어요")  # one everyday word and a context word: routed, but unsure
    assert (rule.slug, rule.source, rule.unsure) == ("yakgwa", "words", True)
    endpoint.script = [_choice_server("A")]
    (route,) = openai.settle(["꿀과자를 먹었어요"], [rule])
    assert (route.slug, route.source, route.confidence, route.evidence) == ("yakgwa", "llm", 0.7, rule.evidence)
    assert route.settled == {"by": "openai", "candidates": ["yakgwa"], "choice": "yakgwa", "probability": None,
                             "rule": "yakgwa", "error": None}
    body = endpoint.requests[0]["body"]
    assert (body["temperature"], body["max_tokens"]) == (0.0, 4)  # greedy: a choice, not a sample
    assert "answer with the letter" in body["messages"][0]["content"]
    assert body["messages"][1]["content"] == ('Memory: "꿀과자를 먹었어요"\nOptions:\nA. Yakgwa (약과): '
                                              f'{registry["yakgwa"].description}\nB. none of these')
    endpoint.requests.clear()
    endpoint.script = [_choice_server("(B) none of these")]
    (none,) = openai.settle(["꿀과자를 먹었어요"], [rule])
    assert (none.slug, none.source, none.also, none.ask, none.settled["choice"]) == (None, "llm", (), (), None)


def test_only_unsure_routes_are_settled(openai, endpoint, registry):
    texts = ["약과를 먹었어요", "어릴 적 바닷가", "꿀과자를 먹었어요", "약식"]
    routes = [registry.route(t) for t in texts]
    routes[0] = registry.route("약과", explicit="yakgwa")
    asked = registry.route("약식")  # an ambiguous name alone: only asked about
    assert (asked.slug, asked.ask, asked.unsure, asked.candidates) == (None, ("yaksik",), True, ("yaksik",))
    endpoint.script = [_choice_server("A"), _choice_server("A")]
    out = openai.settle(texts, routes)
    assert len(endpoint.requests) == 2  # the explicit and the keyword-less routes cost no request
    assert out[0] is routes[0] and out[1] is routes[1]
    assert [(r.slug, r.source) for r in out[2:]] == [("yakgwa", "llm"), ("yaksik", "llm")]
    assert out[3].confidence == 0.5 and not out[3].unsure  # confirmed: routed at ROUTE, and not settled twice


def test_a_failed_choice_keeps_the_rules_route_and_says_why(openai, endpoint, registry, caplog):
    rule = registry.route("꿀과자를 먹었어요")
    endpoint.script = [_choice_server("Z")]
    with caplog.at_level(logging.WARNING, logger="tipsen.assistant"):
        (route,) = openai.settle(["꿀과자를 먹었어요"], [rule])
    assert (route.slug, route.source) == ("yakgwa", "words")
    assert route.settled["error"] == "answer 'Z' names none of the options AB"
    assert "the rules' route stands" in caplog.text and "꿀과자" not in caplog.text  # the words stay private
    endpoint.script = [(500, "down", 0)] * 2
    (down,) = openai.settle(["꿀과자를 먹었어요"], [rule])
    assert down.slug == "yakgwa" and down.settled["error"] == "HTTP 500 after 2 requests"


def test_the_template_backend_keeps_the_rules_route(registry):
    a = assistant(registry, backend="template")
    rule = registry.route("약식")
    assert a.settle(["약식"], [rule]) == [rule]
    r = a.refine("약식", seed=0)  # routed here: the rules' route, recorded
    assert r.keyword is None and r.route["source"] == "none" and r.route["ask"] == ["yaksik"]


def test_refine_routes_and_settles_when_no_keyword_is_given(openai, endpoint):
    endpoint.script = [_choice_server("A"), _choice_server("A")]
    r = openai.refine("약식", seed=3)
    assert r.keyword == "yaksik" and r.route["source"] == "llm" and r.backend == "openai"
    assert "Yaksik Food" in r.prompt
    endpoint.requests.clear()
    endpoint.script = [_choice_server("A")]
    assert openai.refine("약식", keyword="yaksik", seed=3).route is None  # given: not routed, no choice asked
    assert [req["body"]["max_tokens"] for req in endpoint.requests] == [80]


def test_transformers_choice_is_one_forward_pass_and_the_same_in_any_batch(llm_assistant, registry, monkeypatch):
    model, _ = llm_assistant.llm.load()
    calls = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k))  # a choice must not sample
    texts = ["약식", "꿀과자를 먹었어요 제사상에 올리던"]
    routes = [registry.route(t) for t in texts]
    assert all(r.unsure for r in routes) and len(routes[1].candidates) >= 1
    both = llm_assistant.settle(texts, routes)
    alone = [llm_assistant.settle([t], [r])[0] for t, r in zip(texts, routes)]
    assert calls == []
    for b, a, r in zip(both, alone, routes):
        assert b.source == "llm" and b.settled["by"] == "transformers" and b.settled["error"] is None
        assert b.slug in (*r.candidates, None) and b.slug == a.slug  # left padding changes nothing
        assert 0 < b.settled["probability"] <= 1
        assert abs(b.settled["probability"] - a.settled["probability"]) < 1e-3


def test_the_generator_draws_the_settled_route(openai, endpoint, registry, demo_params, tmp_path):
    from tipsen.generate import Generator
    from tipsen.testing import random_bank

    gen = Generator(demo_params, bank=random_bank(tmp_path, ["yakgwa"], registry=registry), assistant=openai,
                    registry=registry)
    req = {"prompt": "꿀과자를 먹었어요", "seed": 1, "steps": 2, "assist": True}
    ruled = gen.resolve(req, refine=False)
    assert ruled.adapter == "yakgwa" and ruled.route.source == "words"
    endpoint.script = [_choice_server("B"), _choice_server("B")]  # the LLM: none of these
    plan = gen.resolve(req)
    assert (plan.adapter, plan.route.source, plan.route.slug, plan.refined["keyword"]) == (None, "llm", None, None)
    assert plan.prompt.startswith("A realistic photo of") and "Yakgwa" not in plan.prompt
    endpoint.script = [_choice_server("A"), _choice_server("A")]
    out = gen.generate({**req, "prompt": "약식"})  # only asked about by the rules; yaksik has no adapter here
    meta = out.metadata
    assert (meta["keyword"], meta["adapter"], meta["route"]["source"]) == ("yaksik", None, "llm")
    assert any(w.startswith("no LoRA for yaksik") for w in meta["warnings"])
    assert not any(w.startswith("perhaps") for w in meta["warnings"])
    endpoint.script = [(500, "down", 0)] * 2 + [_choice_server("A")]
    failed = gen.resolve(req)
    assert failed.adapter == "yakgwa" and failed.route.source == "words"
    assert any("not settled by openai (HTTP 500 after 2 requests)" in w for w in failed.warnings)
