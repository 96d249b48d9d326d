"""The lexical index and the fused pre-selection: the FTS5 table follows every change of the
passages (ingest, replace, remove, re-embedding, an upgrade of an older store), the lexical search
keeps to the caller's collections, and fusion brings a passage that names the prompt's rare word
into the candidates when the vectors alone leave it out."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from sift_chat.access import SHARED
from sift_chat.lexical_search import bm25_scores
from sift_chat.retrieval import (preselect, prompt_terms, rare_terms, read_count, reciprocal_rank_fusion,
                                 weighted_fusion)
from sift_chat.store import SCHEMA_VERSION, NewDocument, NewPassage, Store

DIMENSION = 16


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def document(path: str, texts: list[str], vectors: np.ndarray, owner: str = SHARED) -> NewDocument:
    passages = [NewPassage(i, 0, len(text), 1, text) for i, text in enumerate(texts)]
    return NewDocument(path, f"hash-{owner}-{path}-{texts}", 1, 0.0, passages, vectors, owner)


def found(store: Store, word: str, owners=None) -> set[str]:
    """The texts of the passages the lexical search finds for `word`."""
    ids, _ = store.lexical(prompt_terms(word), 1000, owners)
    return {p.text for p in store.passages(ids).values()}


def holding(store: Store, word: str) -> set[str]:
    """The texts of the stored passages that hold `word` (the truth the index must agree with)."""
    return {text for (text,) in store.db.execute("SELECT text FROM passages")
            if word.lower() in prompt_terms(text)}


def test_the_lexical_index_follows_ingest_replace_remove_and_reembedding(tmp_path):
    rng = np.random.default_rng(0)
    with Store(tmp_path / "store") as store:
        store.write_documents([document("/a.txt", ["Varnholt lies on the river Esk.", "The ferry leaves at 7:40."],
                                        unit(rng.normal(size=(2, DIMENSION)))),
                               document("/b.txt", ["Varnmere was founded by Ada Krommson."],
                                        unit(rng.normal(size=(1, DIMENSION))))], "test-embedder")
        assert found(store, "Varnholt") == holding(store, "varnholt") == {"Varnholt lies on the river Esk."}
        assert found(store, "krommson") == {"Varnmere was founded by Ada Krommson."}

        store.write_documents([document("/a.txt", ["Varnholt lies on the river Teme."],  # replaced
                                        unit(rng.normal(size=(1, DIMENSION))))], "test-embedder")
        assert found(store, "Esk") == set() and found(store, "7:40") == set()
        assert found(store, "Teme") == {"Varnholt lies on the river Teme."}

        ids, vectors = store.embeddings()
        store.replace_embeddings(ids, unit(rng.normal(size=vectors.shape)), "test-embedder")
        assert found(store, "Varnholt") == {"Varnholt lies on the river Teme."}

        assert store.term_counts(["krommson"], 10) == {"krommson": 1}
        assert store.remove(["/b.txt"]) == ["/b.txt"]
        assert found(store, "Krommson") == set() == holding(store, "krommson")
        assert store.term_counts(["krommson", "varnholt", "river"], 10) == {"varnholt": 1, "river": 1}

    with Store(tmp_path / "store") as reopened:  # what was committed is what the index holds
        assert found(reopened, "Varnholt") == {"Varnholt lies on the river Teme."}


def test_a_write_that_fails_leaves_the_lexical_index_as_it_was(tmp_path):
    rng = np.random.default_rng(1)
    with Store(tmp_path / "store") as store:
        store.write_documents([document("/a.txt", ["Skaethost exports pine tar."],
                                        unit(rng.normal(size=(1, DIMENSION))))], "test-embedder")
        broken = document("/b.txt", ["Malrosbre exports salt cod."], unit(rng.normal(size=(1, DIMENSION + 1))))
        with pytest.raises(Exception):  # another dimension: refused inside the transaction
            store.write_documents([document("/a.txt", ["Skaethost exports glass floats."],
                                            unit(rng.normal(size=(1, DIMENSION)))), broken], "other-embedder")
        assert found(store, "Skaethost") == {"Skaethost exports pine tar."}
        assert found(store, "Malrosbre") == set() and found(store, "floats") == set()


def test_another_users_passage_with_the_exact_words_is_never_a_candidate(tmp_path):
    rng = np.random.default_rng(2)
    query = unit(rng.normal(size=(1, DIMENSION)))[0]
    with Store(tmp_path / "store") as store:
        store.write_documents([
            document("/alice/secret.txt", ["Malrosbre's morning ferry sails at 6:15."], query[None, :], "user:alice"),
            document("/bob/notes.txt", [f"Bob's note {i} about harbours." for i in range(30)],
                     unit(rng.normal(size=(30, DIMENSION))), "user:bob"),
            document("/shared.txt", ["The shared guide to ferries."], unit(rng.normal(size=(1, DIMENSION)))),
        ], "test-embedder")
        secret = store.lexical(["malrosbre"], 10)[0].tolist()
        assert len(secret) == 1  # the index has it ...
        bob = [SHARED, "user:bob"]
        assert store.lexical(["malrosbre", "ferry"], 10, bob)[0].size == 0  # ... but not for bob
        for k in (5, 40):  # through the index, and exact (k ≥ bob's passages)
            candidates = preselect(store, query, "When does Malrosbre's morning ferry sail?", k, bob)
            assert secret[0] not in candidates.ids.tolist() and len(candidates.ids) == min(k, 31)
        alice = preselect(store, query, "When does Malrosbre's morning ferry sail?", 5, [SHARED, "user:alice"])
        assert alice.ids[0] == secret[0]


def test_fusion_brings_the_passage_that_names_the_rare_word_into_the_candidates(tmp_path):
    """Fifty passages about confusable towns sit nearer the prompt's vector than the one that
    names the town asked about: the vector search's K leave it out, the fused K hold it first."""
    rng = np.random.default_rng(3)
    query = unit(rng.normal(size=(1, DIMENSION)))[0]
    near = unit(query + 0.1 * rng.normal(size=(50, DIMENSION)))
    far = unit(query + 0.6 * rng.normal(size=(1, DIMENSION)))  # related, but less alike than the others
    assert float(far[0] @ query) < float((near @ query).min())
    with Store(tmp_path / "store") as store:
        store.write_documents([
            document("/towns.txt", [f"Varnmere{i} was founded by someone else." for i in range(50)], near),
            document("/varnholt.txt", ["Varnholt was founded by Ada Krommson."], far),
        ], "test-embedder")
        [target] = store.lexical(["varnholt"], 5)[0].tolist()
        prompt = "Who founded Varnholt?"
        vector_only = preselect(store, query, prompt, 10, fusion="vector")
        assert target not in vector_only.ids.tolist()
        for fusion in ("weighted", "rrf"):
            fused = preselect(store, query, prompt, 10, fusion=fusion)
            assert target in fused.ids.tolist() and fused.lexical_only >= 1 and "varnholt" in fused.terms
            row = fused.ids.tolist().index(target)
            assert np.allclose(fused.vectors[row], far[0])  # its stored vector, for SIFT
            assert np.isclose(fused.similarities[row], float(far[0] @ query), atol=1e-5)
        assert preselect(store, query, prompt, 10, fusion="weighted").ids[0] == target
        for fusion in ("weighted", "rrf", "vector"):  # the score each was ranked by, best first
            candidates = preselect(store, query, prompt, 10, fusion=fusion)
            assert len(candidates.match) == len(candidates.ids)
            assert list(candidates.match) == sorted(candidates.match, reverse=True)
        weighted = preselect(store, query, prompt, 10, fusion="weighted")
        bm25 = dict(zip(*(a.tolist() for a in store.lexical(weighted.terms, 10))))
        expected = dict(weighted_fusion(weighted.ids.tolist(), weighted.similarities, bm25))
        assert weighted.match == pytest.approx([expected[i] for i in weighted.ids.tolist()], rel=1e-5)


def test_an_older_store_gets_its_lexical_index_built_on_upgrade(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "store"
    with Store(folder) as store:
        store.write_documents([document("/old.txt", ["Orvmere was founded in 1832.", "Orvthorpe trades oak."],
                                        unit(rng.normal(size=(2, DIMENSION))))], "test-embedder")
    with sqlite3.connect(folder / "store.db") as connection:  # back to schema 3: no lexical index
        connection.executescript("""
            DROP TRIGGER passages_fts_insert; DROP TRIGGER passages_fts_delete; DROP TRIGGER passages_fts_update;
            DROP TABLE passages_terms; DROP TABLE passages_fts;
            UPDATE meta SET value = '3' WHERE key = 'schema_version';
        """)
    with Store(folder) as store:
        assert store.meta("schema_version") == str(SCHEMA_VERSION) == "5"
        assert found(store, "Orvmere") == {"Orvmere was founded in 1832."}
        assert found(store, "1832") == {"Orvmere was founded in 1832."}
        store.remove(["/old.txt"])
        assert found(store, "Orvthorpe") == set()


def test_a_passage_is_not_ranked_first_for_being_short(tmp_path):
    """Two passages name the town asked about: a short note once, a longer one (the one that says
    what was asked) twice. FTS5's bm25 normalizes by length and ranks the note first; the store's
    BM25 (b = 0) counts what each holds, not how short it is."""
    rng = np.random.default_rng(5)
    note = "Notes on Varnholt."
    longer = ("Varnholt was first settled in the year 1673 by families from the coast, who built "
              "their houses along the river and traded salt cod with the towns upstream; "
              "today Varnholt is known for its rope and sailcloth, sold at the harbour market.")
    with Store(tmp_path / "store") as store:
        store.write_documents([document("/varnholt.txt", [note, longer], unit(rng.normal(size=(2, DIMENSION))))],
                              "test-embedder")
        ids, scores = store.lexical(["varnholt"], 5)
        texts = store.passages(ids.tolist())
        assert [texts[i].text for i in ids.tolist()] == [longer, note] and scores[0] > scores[1]
        by_fts5 = [row[0] for row in store.db.execute(
            "SELECT rowid FROM passages_fts WHERE passages_fts MATCH 'varnholt' ORDER BY bm25(passages_fts)")]
        assert by_fts5 == ids.tolist()[::-1]  # what the length normalization did


def test_the_lexical_scores_are_bm25_of_what_each_passage_holds(tmp_path):
    """The scores the store computes from FTS5's term instances equal BM25 (b = 0) computed here
    from the passages' own words, for several terms, frequencies and passages holding none."""
    words = ["amber", "brisk", "corran", "dwyle", "esk", "farrow"]
    rng = np.random.default_rng(6)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 20)))) for _ in range(30)]
    with Store(tmp_path / "store") as store:
        store.write_documents([document("/words.txt", texts, unit(rng.normal(size=(30, DIMENSION))))], "test-embedder")
        every = [p.split() for p in texts]
        for terms in (["esk"], ["amber", "dwyle"], ["brisk", "corran", "farrow"]):
            ids, scores = store.lexical(terms, 100)
            stored = {p.id: p.text.split() for p in store.passages(ids.tolist()).values()}
            holding = {t: sum(t in p for p in every) for t in terms}
            expected = {}
            for passage_id, tokens in stored.items():
                expected[passage_id] = sum(
                    np.log1p((30 - holding[t] + 0.5) / (holding[t] + 0.5)) * tokens.count(t) * 2.2 / (tokens.count(t) + 1.2)
                    for t in terms)
            assert len(ids) == sum(any(t in p for t in terms) for p in every)  # every passage holding one
            assert np.allclose(scores, [expected[i] for i in ids.tolist()], rtol=1e-5)
            assert list(scores) == sorted(scores, reverse=True)


def test_fusion_math():
    # 1/(60+1) + 1/(60+2) for 7; 1/(60+2) for 8, 1/(60+1) for 9
    fused = dict(reciprocal_rank_fusion([[7, 8], [9, 7]]))
    assert fused[7] == pytest.approx(1 / 61 + 1 / 62) and fused[8] == pytest.approx(1 / 62)
    assert [i for i, _ in reciprocal_rank_fusion([[7, 8], [9, 7]])] == [7, 9, 8]
    scores = dict(weighted_fusion([1, 2], np.array([0.9, 0.5]), {2: 4.0, 1: 1.0}, weight=0.5))
    assert scores[1] == pytest.approx(0.5 * 0.9 + 0.5 * 0.25) and scores[2] == pytest.approx(0.5 * 0.5 + 0.5)
    assert prompt_terms("Who founded Malrosbré? 7:40, Malrosbre!") == ["who", "founded", "malrosbre", "7", "40"]
    counts = {"the": 900, "varnholt": 2, "ferry": 40, "who": 300}
    assert rare_terms(counts, budget=1000) == ["varnholt", "ferry", "who"]  # 342 passages; with "the": 1242
    assert rare_terms(counts, max_terms=1) == ["varnholt"]
    # BM25 (b = 0), 10 passages indexed: a term in 1 of 2 columns twice, another in both once
    frequencies = np.array([[2.0, 0.0], [1.0, 1.0]])
    idf = np.log([1 + (10 - 1 + 0.5) / (1 + 0.5), 1 + (10 - 2 + 0.5) / (2 + 0.5)])
    expected = [idf[0] * 2 * 2.2 / (2 + 1.2) + idf[1] * 2.2 / 2.2, idf[1] * 2.2 / 2.2]
    assert bm25_scores(frequencies, 10) == pytest.approx(expected)
    assert bm25_scores(np.array([[1.0]]), 1)[0] > 0  # a word every passage holds still counts a little



def test_further_passages_are_read_only_when_they_match_about_as_well_as_the_best():
    two_facts = np.array([0.80, 0.78, 0.70, 0.30])  # two documents answer, a third nearly
    one_clear_best = np.array([0.90, 0.50, 0.45, 0.40])
    assert read_count(two_facts, 3, 0.8) == 3 and read_count(two_facts, 3, 0.9) == 2
    assert read_count(two_facts, 3, 0.99) == 1 and read_count(two_facts, 4, 0.8) == 3
    assert read_count(one_clear_best, 3, 0.8) == 1
    assert read_count(one_clear_best, 3, 0.0) == 3  # 0: always the most allowed
    assert read_count(one_clear_best, 1, 0.5) == 1 and read_count(two_facts[:2], 5, 0.0) == 2
    assert read_count(np.array([0.5, 0.5]), 2, 1.0) == 2  # a tie reads both
    assert read_count(np.array([-0.1, -0.1]), 2, 0.8) == 1  # no ratio of a first match ≤ 0
    assert read_count(np.array([]), 3, 0.8) == 0
