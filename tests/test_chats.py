"""Chats persist in SQLite, per owner, and can be renamed and deleted with everything they hold."""

from __future__ import annotations

from sift_chat.store import Store


def test_chats_are_per_owner_and_survive_reopening(store):
    mine = store.create_chat("mine", owner="browser-a")
    theirs = store.create_chat("theirs", owner="browser-b")
    answer = store.record_exchange(mine, "question?", "answer.", {"seconds": {"generate": 1.0}},
                                   [{"step": 1, "passage_id": 7, "similarity": 0.5,
                                     "posterior_variance": 0.75, "uncertainty_reduction": 0.25, "loss": 2.0}])
    assert [c["title"] for c in store.chats("browser-a")] == ["mine"]
    assert [c["title"] for c in store.chats("browser-b")] == ["theirs"]
    assert store.chats() == []  # the CLI's owner sees neither
    store.rename_chat(mine, "renamed")
    with Store(store.folder) as reopened:
        assert reopened.chat(mine)["title"] == "renamed"
        messages = reopened.messages(mine)
        assert [(m["role"], m["content"]) for m in messages] == [("user", "question?"), ("assistant", "answer.")]
        assert reopened.selection_rows(answer)[0]["uncertainty_reduction"] == 0.25
        assert reopened.messages(theirs) == []


def test_deleting_a_chat_deletes_its_messages_and_selections(store):
    chat = store.create_chat("short-lived")
    answer = store.record_exchange(chat, "q", "a", {}, [{"step": 1, "passage_id": 1, "similarity": 0.1,
                                                         "posterior_variance": 0.9,
                                                         "uncertainty_reduction": 0.1, "loss": None}])
    store.delete_chat(chat)
    assert store.chat(chat) is None and store.messages(chat) == []
    assert store.selection_rows(answer) == []


def test_one_store_serves_many_threads(store):
    """The app's workers share one Store: writes from threads neither fail nor interleave."""
    from concurrent.futures import ThreadPoolExecutor

    chat = store.create_chat("busy")

    def exchange(i):
        return store.record_exchange(chat, f"question {i}", f"answer {i}", {}, [
            {"step": 1, "passage_id": i, "similarity": 0.5, "posterior_variance": 0.5,
             "uncertainty_reduction": 0.5, "loss": 1.0}])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(exchange, range(40)))
    messages = store.messages(chat)
    assert len(messages) == 80 and len(set(answers)) == 40
    for answer in answers:  # each answer directly follows its own question
        position = [m["id"] for m in messages].index(answer)
        i = messages[position]["content"].split()[-1]
        assert messages[position - 1]["content"] == f"question {i}"
        assert [r["passage_id"] for r in store.selection_rows(answer)] == [int(i)]
