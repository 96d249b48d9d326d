"""`app.py --auth FILE` running, driven by gradio_client as two users and by a caller who has not
signed in: the app is closed to the latter; the former never list, open, pick from, remove or
overwrite each other's chats and documents, and cannot make the app read a server path.

The chat model is the tiny Llama of tests/tiny.py saved as a folder; the embedder is the real default.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from sift_chat import cli
from sift_chat.access import UsersFile

from sift_chat.panel import SETTING_NAMES, default_settings

from .served import served_app
from .tiny import save_tiny_chat_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "corpora" / "brindlemoor"
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}
QUESTION = "Who is the harbour master of Skellport?"
# the sidebar's values in its order: the defaults, 3 passages, 16 new tokens
SETTINGS = tuple({**default_settings(), "mode": "context", "passages": 3, "max_new_tokens": 16}[name]
                 for name in SETTING_NAMES)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("signin")
    users = UsersFile(root / "users.json")
    for name, password in PASSWORDS.items():
        users.add(name, password)
    assert cli.main(["--data-dir", str(root / "data"), "ingest", "--quiet", str(SAMPLE)]) == 0  # the shared library
    with served_app(root / "data", "--auth", str(root / "users.json"),
                    "--chat-model", save_tiny_chat_model(root / "model")) as served:
        yield served.url, root


def client(url: str, name: str):
    from gradio_client import Client

    return Client(url, auth=(name, PASSWORDS[name]), verbose=False)


def documents(root: Path) -> list[tuple[int, str, str]]:
    """(id, owner, path) of every document, read from the running app's store."""
    with sqlite3.connect(f"file:{root / 'data' / 'store' / 'store.db'}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT id, owner, path FROM documents ORDER BY id").fetchall()


def test_without_signing_in_nothing_is_served(app):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    url, root = app
    before = documents(root)
    for path in ("config", "gradio_api/info"):
        assert httpx.get(url + path).status_code == 401
    for name, data in (("on_load", []), ("on_ingest", [None, str(ROOT / "corpora"), False]),
                       ("on_compare", [QUESTION, *SETTINGS])):
        assert httpx.post(f"{url}gradio_api/call/{name}", json={"data": data}).status_code == 401
    with pytest.raises(AuthenticationError):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("alice", "bob-password"), verbose=False)
    assert documents(root) == before


def test_two_users_keep_their_chats_and_documents_apart(app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    url, root = app
    alice, bob = client(url, "alice"), client(url, "bob")
    for name, fact, user in (("alice", "Ada Quill", alice), ("bob", "Bram Oak", bob)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(f"The harbour master of Skellport is {fact}.")
        report = user.predict([handle_file(str(tmp_path / name / "notes.txt"))], "", False, api_name="/on_ingest")[0]
        assert "1 added, 0 updated" in report  # the same name: two documents
    notes = {owner: (document_id, path) for document_id, owner, path in documents(root) if path.endswith("notes.txt")}
    assert set(notes) == {"user:alice", "user:bob"} and notes["user:alice"][1] != notes["user:bob"][1]

    answered = alice.predict(QUESTION, *SETTINGS, api_name="/on_send")
    chats, cards = answered[3], answered[6]
    assert "Ada Quill" in cards and "Bram Oak" not in cards
    alice_chat = chats["value"]
    assert [c[1] for c in chats["choices"]] == [alice_chat]

    loaded = bob.predict(api_name="/on_load")
    assert loaded[0] == "Signed in as **bob**." and loaded[1]["choices"] == []  # none of Alice's chats
    rows = loaded[7]["data"]
    assert [r[:2] for r in rows if r[0] == "notes.txt"] == [["notes.txt", "yours"]] and len(rows) == 11
    assert [c[1] for c in loaded[8]["choices"]] == [notes["user:bob"][0]]  # he may remove only his own
    for name, arguments in (("/on_open", (alice_chat,)), ("/on_remove", (notes["user:alice"][0],))):
        try:
            result = bob.predict(*arguments, api_name=name)
        except AppError as refused:  # before the handler ran (not one of his choices): in one line, telling nothing
            result = str(refused)
            assert "\n" not in result
        assert "Ada Quill" not in str(result) and QUESTION not in str(result)  # her chat's text, her document's
    # (that her document and chat are untouched is checked below, from the store and as her)
    for folder, shared in ((str(notes["user:alice"][1]), False), (str(root / "data"), True), ("/etc", False)):
        report = bob.predict(None, folder, shared, api_name="/on_ingest")[0]
        assert "Only admins" in report or "turned off" in report
    for name, fact, other in (("alice", "Ada Quill", "Bram Oak"), ("bob", "Bram Oak", "Ada Quill")):
        found = {"alice": alice, "bob": bob}[name].predict(f"Skellport harbour master {other}", api_name="/on_search")
        assert fact in found and other not in found  # the Corpus tab's search: one's own and the shared only
    compared = bob.predict(QUESTION, *SETTINGS, api_name="/on_compare")
    assert "Bram Oak" in str(compared) and "Ada Quill" not in str(compared)
    answered = bob.predict(QUESTION, *SETTINGS, api_name="/on_send")
    assert "Bram Oak" in answered[6] and "Ada Quill" not in answered[6]
    assert answered[3]["value"] != alice_chat

    assert [d for d in documents(root) if d[1] == "user:alice"] == [(notes["user:alice"][0], "user:alice",
                                                                     notes["user:alice"][1])]
    assert "Ada Quill" in Path(notes["user:alice"][1]).read_text()
    reloaded = alice.predict(api_name="/on_load")
    assert [c[1] for c in reloaded[1]["choices"]] == [alice_chat]
    assert len(alice.predict(alice_chat, api_name="/on_open")[0]) == 2  # her question and its answer
