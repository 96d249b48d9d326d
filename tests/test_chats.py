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
