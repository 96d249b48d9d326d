"""What one `/v1` request may cost and what a hostile body gets, against `app.py` as users start it
(`served_api` in conftest: a subprocess, raw HTTP): every malformed body and out-of-range setting
a 4xx with an OpenAI error object naming the field, never a 500 or a traceback in the server's log;
a conversation over the bounds refused before the model; a stream dropped after its first chunk
frees its caller at once; picks name documents as they were ingested, not by server paths.
"""

from __future__ import annotations

import json

import httpx

from sift_chat.api import MAX_BODY_BYTES, MAX_CHARACTERS, MAX_MESSAGES

QUESTION = "Who keeps the lighthouse?"
USER = [{"role": "user", "content": QUESTION}]


def body(**fields) -> dict:
    return {"model": "sift-chat", "messages": USER, "max_tokens": 2, "sift": {"mode": "off"}, **fields}


def post(served, content, timeout: float = 120) -> httpx.Response:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    return httpx.post(served.api + "/chat/completions", content=data, timeout=timeout,
                      headers={**served.headers, "Content-Type": "application/json"})


def assert_openai_error(response: httpx.Response, status: int | None = None, param: str | None = None, case=None):
    assert 400 <= response.status_code < 500 and (status is None or response.status_code == status), \
        (case, response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, case
    assert isinstance(error["message"], str) and 0 < len(error["message"]) < 1000 and "\n" not in error["message"]
    assert "Traceback" not in error["message"] and isinstance(error["type"], str), case
    if param is not None:
        assert error["param"] == param, (case, error)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


# (case, raw body or JSON object, the param the error names: None when the body is not JSON)
MALFORMED = [
    ("500 000 [", b"[" * 500_000, None),
    ("deep objects", ('{"a":' * 200_000 + "1" + "}" * 200_000).encode(), None),
    ("deep but readable sift", f'{{"model": "sift-chat", "messages": [{{"role": "user", "content": "hi"}}], '
                               f'"sift": {nested(900)}}}'.encode(), "sift"),
    ("deep content", f'{{"model": "sift-chat", "messages": [{{"role": "user", "content": {nested(900)}}}]}}'
                     .encode(), "messages[0].content"),
    ("not JSON", b"{not json", None), ("empty", b"", None), ("not UTF-8", b'{"model": "\xff\xfe"}', None),
    ("NaN", b'{"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("Infinity", b'{"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}], "seed": Infinity}', None),
    ("-Infinity", b'{"model": "sift-chat", "messages": [], "sift": {"lam": -Infinity}}', None),
    ("a 5000-digit integer", b'{"model": "sift-chat", "seed": 1' + b"0" * 5000 + b"}", None),
    ("a list", [body()], None), ("a string", "sift-chat", None), ("null", None, None),
    ("model missing", {"messages": USER}, "model"), ("model a number", body(model=5), "model"),
    ("model an object", body(model={"id": "sift-chat"}), "model"),
    ("no messages", body(messages=[]), "messages"), ("messages a string", body(messages="hi"), "messages"),
    ("a message a number", body(messages=[1]), "messages[0].role"),
    ("role a list", body(messages=[{"role": ["user"], "content": "hi"}]), "messages[0].role"),
    ("role tool", body(messages=[{"role": "tool", "content": "hi"}]), "messages[0].role"),
    ("content a number", body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("content an image", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
     "messages[0].content"),
    ("content a lone surrogate", b'{"model": "sift-chat", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
     "messages[0].content"),
    ("a key a lone surrogate", b'{"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}], '
                               b'"sift": {"\\udc00": 1}}', "sift.\\udc00"),
    ("last not the user's", body(messages=[{"role": "assistant", "content": "hi"}]), "messages"),
    ("stream a string", body(stream="yes"), "stream"), ("stop numbers", body(stop=[1]), "stop"),
    ("five stops", body(stop=["a"] * 5), "stop"), ("n 2", body(n=2), "n"), ("n a string", body(n="1"), "n"),
    ("max_tokens a word", body(max_tokens="many"), "max_tokens"), ("max_tokens 0", body(max_tokens=0), "max_tokens"),
    ("max_tokens 1e308", body(max_tokens=1e308), "max_tokens"), ("max_tokens 2**64", body(max_tokens=2**64), "max_tokens"),
    ("max_completion_tokens -1", body(max_completion_tokens=-1), "max_completion_tokens"),
    ("temperature a word", body(temperature="hot"), "temperature"),
    ("temperature 1e999", b'{"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}], '
                          b'"temperature": 1e999}', "temperature"),
    ("seed 10**30", body(seed=10**30), "seed"), ("seed -1", body(seed=-1), "seed"), ("seed 2**63", body(seed=2**63), "seed"),
    ("seed 1.5", body(seed=1.5), "seed"), ("seed a string", body(seed="7"), "seed"),
    ("sift a list", body(sift=[1]), "sift"), ("sift unknown", body(sift={"ünïcode": 1}), "sift.ünïcode"),
    ("min_reduction -1", body(sift={"min_reduction": -1}), "sift.min_reduction"),
    ("min_reduction 1.5", body(sift={"min_reduction": 1.5}), "sift.min_reduction"),
    ("min_reduction a word", body(sift={"min_reduction": "low"}), "sift.min_reduction"),
    ("lora_layers -3", body(sift={"lora_layers": -3}), "sift.lora_layers"),
    ("lora_layers 5", body(sift={"lora_layers": 5}), "sift.lora_layers"),
    ("lora_layers 2.5", body(sift={"lora_layers": 2.5}), "sift.lora_layers"),
    ("learning_rate 1e308", body(sift={"learning_rate": 1e308}), "sift.learning_rate"),
    ("learning_rate 0", body(sift={"learning_rate": 0}), "sift.learning_rate"),
    ("learning_rate 1e999", b'{"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}], '
                            b'"sift": {"learning_rate": 1e999}}', "sift.learning_rate"),
    ("passages 10**30", body(sift={"passages": 10**30}), "sift.passages"),
    # each passage read is a row of every decoding forward: what one request may cost
    ("read_passages 9", body(sift={"read_passages": 9}), "sift.read_passages"),
    ("read_passages 10**30", body(sift={"read_passages": 10**30}), "sift.read_passages"),
    ("read_passages 0", body(sift={"read_passages": 0}), "sift.read_passages"),
    ("read_passages a list", body(sift={"read_passages": [3]}), "sift.read_passages"),
    ("read_min_match -0.1", body(sift={"read_min_match": -0.1}), "sift.read_min_match"),
    ("read_min_match 1.5", body(sift={"read_min_match": 1.5}), "sift.read_min_match"),
    ("read_min_match a word", body(sift={"read_min_match": "all"}), "sift.read_min_match"),
    ("lam 0", body(sift={"lam": 0}), "sift.lam"), ("method a list", body(sift={"method": ["sift"]}), "sift.method"),
    ("mode an object", body(sift={"mode": {"a": 1}}), "sift.mode"),
    ("a huge method", body(sift={"method": "x" * 500_000}), "sift.method"),
    ("over the messages bound", body(messages=[{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)), "messages"),
    ("over the characters bound", body(messages=[{"role": "user", "content": "a" * (MAX_CHARACTERS // 2)}] * 3),
     "messages"),
    ("over the body bound", body(messages=[{"role": "user", "content": "a" * MAX_BODY_BYTES}]), None),
]


def test_malformed_bodies_get_an_openai_error_naming_the_field_and_no_traceback(served_api):
    for case, content, param in MALFORMED:
        response = post(served_api, content if isinstance(content, bytes) else json.dumps(content).encode())
        assert_openai_error(response, None, param, case)
        if param == "messages" and "bound" in case:
            assert response.json()["error"]["code"] == "conversation_too_long", case
    # the bounds' own values are accepted (mode off: the settings are checked, then a short answer)
    for case, fields in [("seed 2**63 - 1", {"seed": 2**63 - 1}), ("seed 0", {"seed": 0}),
                         ("the other bounds", {"sift": {"mode": "off", "min_reduction": 1, "learning_rate": 1,
                                                        "lora_layers": 4}}),
                         ("min_reduction 0, lora_layers 0", {"sift": {"mode": "off", "min_reduction": 0,
                                                                      "lora_layers": 0}}),
                         ("the reading bounds", {"sift": {"mode": "off", "read_passages": 8, "read_min_match": 1}}),
                         ("read_min_match 0", {"sift": {"mode": "off", "read_passages": 1, "read_min_match": 0}}),
                         ("unicode", {"messages": [{"role": "user", "content": "Wer hütet den Leuchtturm? 灯台 🙂"}]})]:
        response = post(served_api, body(**fields))
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"], (case, response.text)
    log = served_api.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_a_conversation_at_the_bound_is_answered_and_one_over_it_is_refused_before_the_model(served_api):
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: who keeps the lighthouse?"}
             for i in range(MAX_MESSAGES - 1)]  # about 36 KB: dropping two turns per rendering held the model ~27 s
    response = post(served_api, body(messages=[*turns, *USER]))
    assert response.status_code == 200, response.text
    assert any("older turns were left out" in n for n in response.json()["sift"]["notices"])
    response = post(served_api, body(messages=[*turns, *USER, *USER]), timeout=10)
    assert_openai_error(response, 400, "messages")
    assert "more than the 1000" in response.json()["error"]["message"]


def test_a_stream_dropped_after_its_first_chunk_frees_its_caller_at_once(served_api):
    with httpx.stream("POST", served_api.api + "/chat/completions", headers=served_api.headers, timeout=60,
                      json=body(stream=True, max_tokens=64, sift={"mode": "both", "passages": 8})) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
    # the same caller (one key: all its clients are one caller) right after: answered, not 429 one_at_a_time
    response = post(served_api, body(), timeout=60)
    assert response.status_code == 200, response.text
    for _ in range(2):  # and again: nothing of the dropped one holds the line
        assert post(served_api, body(), timeout=60).status_code == 200


def test_picks_name_documents_as_ingested_not_by_server_paths(served_api):
    response = post(served_api, body(sift={"mode": "context", "passages": 3}))
    assert response.status_code == 200, response.text
    picks = response.json()["sift"]["selection"]["picks"]
    assert len(picks) == 3 and all(p["path"].startswith("brindlemoor/") for p in picks)
    text = response.text
    assert str(served_api.home) not in text and "/corpora/" not in text and '"/' not in text
