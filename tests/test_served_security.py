"""Who may make the app read what, against the app exactly as `python app.py` serves it (FastAPI
with Gradio mounted), over raw HTTP as a hostile client would call it.

Gradio checks that a file named in a call was uploaded only in an app started by `launch()`;
mounted, it copies any file the server can read into its cache and hands it to the handler. So
these tests name server files in Gradio's FileData as signed-in users (one an admin), as the
local owner's neighbours on the machine (no token), and from another site's page.
"""

from __future__ import annotations

import os
import time
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest

from sift_chat import cli
from sift_chat.access import UsersFile
from sift_chat.document_view import NOT_READABLE_DOCUMENT, NOT_READABLE_PASSAGE

from .served import call, file_data, served_app, trigger
from .tiny import save_tiny_chat_model

SAMPLE = Path(__file__).resolve().parent.parent / "corpora" / "brindlemoor"
PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password",
             "dave": "dave-password"}
TOKEN = "local-token-for-the-tests"


def documents(data: Path) -> list[tuple[str, str]]:
    """(owner, path) of every document in the running app's store."""
    with sqlite3.connect(f"file:{data / 'store' / 'store.db'}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT owner, path FROM documents ORDER BY id").fetchall()


def files_holding(folder: Path, secret: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def signed_in(url: str, name: str) -> httpx.Client:
    client = httpx.Client(timeout=60)
    response = client.post(url + "login", data={"username": name, "password": PASSWORDS[name]})
    assert response.status_code == 200, response.text
    return client


def upload(client: httpx.Client, url: str, name: str, text: bytes) -> str:
    response = client.post(url + "gradio_api/upload", files=[("files", (name, text))])
    assert response.status_code == 200, response.text
    return response.json()[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_chat_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Path]:
    """Files on the server no caller may have read: each holds a secret of its own."""
    root = tmp_path_factory.mktemp("server-files")
    (root / ".hidden").mkdir()
    paths = {"hidden": root / ".hidden" / "notes.txt", "owner_only": root / "owner-only.txt",
             "outside": root / "outside.txt"}
    for name, path in paths.items():
        path.write_text(f"The {name} secret is {name.upper()}-4711.")
    paths["owner_only"].chmod(0o600)
    paths["link"] = root / "link.txt"
    paths["link"].symlink_to(paths["outside"])
    return paths


@pytest.fixture(scope="module")
def signin_app(tmp_path_factory, model):
    """`app.py --auth users.json --host 0.0.0.0` (a LAN or a server, the documented public setup):
    alice, bob and dave, and carol an admin; each may add 2 documents of their own."""
    root = tmp_path_factory.mktemp("served-auth")
    users = UsersFile(root / "users.json")
    for name, password in PASSWORDS.items():
        users.add(name, password, admin=name == "carol")
    assert cli.main(["--data-dir", str(root / "data"), "ingest", "--quiet", str(SAMPLE)]) == 0
    with served_app(root / "data", "--host", "0.0.0.0", "--auth", str(root / "users.json"),
                    "--api-key", "api-key", "--quota-documents", "2", "--chat-model", model) as served:
        yield served, root


def test_a_signed_in_user_or_admin_cannot_make_the_app_read_a_file_they_did_not_upload(signin_app, targets):
    served, root = signin_app
    url, data = served.url, root / "data"
    alice = signed_in(url, "alice")
    alices_upload = upload(alice, url, "diary.txt", b"Alice's diary: the ALICE-4711 secret.")
    status, error, output = call(alice, url, "on_ingest", [[file_data(alices_upload)], "", False])
    assert status == 200 and error is None and "1 added" in output[0]  # her own upload is read
    alices_copy = next(path for owner, path in documents(data) if owner == "user:alice")
    assert Path(alices_copy).parent.parent == data / "uploads"
    before = documents(data)
    named = [str(p) for p in targets.values()] + [
        "/etc/passwd", str(root / "users.json"), alices_copy, alices_upload, str(data / "store" / "store.db"),
        str(Path(alices_upload).parent), "http://127.0.0.1:9/x.txt", "file:///etc/passwd"]
    secrets = [b"4711", b"root:x:0:0", b'"hash"', b"SQLite format 3"]
    for name in ("bob", "carol"):  # carol is an admin: her server folders go through the folder field only
        caller = signed_in(url, name)
        for path in named:
            for given in ([file_data(path)], [{"path": path}], file_data(path)):
                status, error, _ = call(caller, url, "on_ingest", [given, "", name == "carol"])
                assert status == 200 and error and "\n" not in error, (name, path, error)
                assert "uploaded through the app" in error, (name, path, error)
        assert documents(data) == before
    for secret in secrets:  # nothing was copied into Gradio's folder either (only alice's own upload holds 4711)
        assert [p.name for p in files_holding(data / "web-uploads", secret)] in ([], ["diary.txt"]), secret
    assert not any(files_holding(data / "uploads", s) for s in secrets[1:])

    # a file bob's own upload request brought is read, and alice's upload is no upload of his
    bob = signed_in(url, "bob")
    bobs_upload = upload(bob, url, "notes.txt", b"Bob's notes on the harbour.")
    status, error, output = call(bob, url, "on_ingest", [[file_data(bobs_upload), file_data(alices_upload)], "", False])
    assert status == 200 and error and "uploaded through the app" in error
    status, error, output = call(bob, url, "on_ingest", [[file_data(bobs_upload)], "", False])
    assert error is None and "1 added" in output[0]
    assert documents(data)[-1][0] == "user:bob"

    # and no file comes back through Gradio's file route, to anyone
    for caller in (alice, bob):
        for path in (alices_upload, bobs_upload, "/etc/passwd"):
            response = caller.get(f"{url}gradio_api/file={path}")
            assert response.status_code == 404 and b"4711" not in response.content


def passages(data: Path, owner: str, name: str) -> list[tuple[int, int]]:
    """(passage id, document id) of the owner's document of this name in the running app's store."""
    with sqlite3.connect(f"file:{data / 'store' / 'store.db'}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT p.id, d.id FROM passages p JOIN documents d ON d.id = p.document_id "
                                  "WHERE d.owner = ? AND d.name = ? ORDER BY p.position", [owner, name]).fetchall()


def test_a_citation_opens_ones_own_or_a_shared_document_and_never_another_users(signin_app):
    """The document pane's endpoint, called as the page calls it (its "open" event's data through the
    queue) and as a hostile client would: dave reads his own passage and the shared library's; alice,
    bob, and carol though an admin, get one line for his passage or document, the line an unknown id
    gets. (Dave's document is his alone: the other users' quotas are other tests'.)"""
    served, root = signin_app
    url, data = served.url, root / "data"
    dave = signed_in(url, "dave")
    ledger = upload(dave, url, "ledger.txt", b"Dave's ledger: the lantern key hangs in box LEDGER-5150.")
    status, error, output = call(dave, url, "on_ingest", [[file_data(ledger)], "", False])
    assert error is None and "1 added" in output[0]
    [(passage_id, document_id)] = passages(data, "user:dave", "ledger.txt")
    [(shared_id, _)] = passages(data, "", "brindlemoor/lighthouse.md")

    status, error, output = trigger(dave, url, "open_document", {"passage": passage_id, "number": 1})
    assert status == 200 and error is None
    assert "<mark id='sc-doc-passage' class='sc-doc-passage'>Dave&#x27;s ledger: the lantern key hangs in box " \
           "LEDGER-5150.</mark>" in output[0] and "ledger.txt" in output[0] and "yours" in output[0]
    status, error, output = trigger(dave, url, "open_document", {"document": document_id})
    assert error is None and "LEDGER-5150" in output[0]
    # a row of the Corpus tab's documents table, as the page sends it when clicked
    [table] = [output for output in call(dave, url, "on_load", [])[2]
               if isinstance(output, dict) and output.get("headers", [None])[0] == "document"]
    [row] = [row for row in table["data"] if row[0] == "ledger.txt"]
    listed = {"index": [0, 0], "value": "ledger.txt", "row_value": row, "selected": True}
    status, error, output = trigger(dave, url, "open_listed_document", listed)
    assert error is None and "LEDGER-5150" in output[0] and "<mark" not in output[0]

    unknown = passage_id + 10_000
    for name in ("alice", "bob", "carol"):
        caller = signed_in(url, name)
        status, error, output = trigger(caller, url, "open_document", {"passage": shared_id, "number": 2})
        assert error is None and "Matthias Orrey" in output[0] and "shared library" in output[0]  # the shared library
        for event, refusal in (({"passage": passage_id}, NOT_READABLE_PASSAGE),
                               ({"passage": str(passage_id), "number": 1}, NOT_READABLE_PASSAGE),
                               ({"passage": unknown}, NOT_READABLE_PASSAGE),
                               ({"document": document_id}, NOT_READABLE_DOCUMENT),
                               ({"document": document_id + 10_000}, NOT_READABLE_DOCUMENT)):
            status, error, output = trigger(caller, url, "open_document", event)
            assert status == 200 and output is None and error == refusal, (name, event, error)
        status, error, output = trigger(caller, url, "open_listed_document", listed)  # dave's row, not theirs
        assert output is None and error == "That document is no longer in the corpus: refresh the list.", name
    bob = signed_in(url, "bob")
    for event in (None, [passage_id], "x", {"passage": {"id": passage_id}}, {"passage": 10**30}, {"document": -1}):
        status, error, output = trigger(bob, url, "open_document", event)
        assert status == 200 and output is None and error and "\n" not in error and len(error) < 200, (event, error)
        assert "5150" not in error and "Traceback" not in error
    for event in (None, "x", {"row_value": "ledger.txt"}, {"row_value": [row]}, {"row_value": [{"a": 1}] * 5},
                  {"index": "x"}):
        status, error, output = trigger(bob, url, "open_listed_document", event)
        assert status == 200 and output is None and error and "\n" not in error and len(error) < 200, (event, error)
        assert "5150" not in error and "Traceback" not in error
    status, error, output = call(bob, url, "open_document", [])  # the plain call route carries no event data
    assert output is None and error == "Say which passage or document to open."
    assert "Traceback" not in served.printed() and "LEDGER-5150" not in served.printed()

    stranger = httpx.Client(timeout=60)  # not signed in: nothing at all
    response = stranger.post(f"{url}gradio_api/queue/join", json={
        "data": [], "event_data": {"passage": passage_id}, "fn_index": 0, "session_hash": "s"})
    assert response.status_code == 401 and "5150" not in response.text


def test_another_site_can_neither_act_as_a_signed_in_user_nor_read_the_answers(signin_app):
    served, root = signin_app
    url = served.url
    bob = signed_in(url, "bob")
    own_origin = url.rstrip("/")
    status, error, output = call(bob, url, "on_load", [])
    assert status == 200 and error is None and output[0].startswith("Signed in as **bob**")
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Referer": "https://evil.example/page"},
                    {"Origin": own_origin.replace("127.0.0.1", "localhost")}):
        response = bob.post(f"{url}gradio_api/call/on_load", json={"data": []}, headers=headers)
        assert response.status_code == 403 and "same origin" in response.text, headers
        assert "access-control-allow-origin" not in response.headers
        preflight = bob.options(f"{url}gradio_api/call/on_load", headers={
            **headers, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    response = bob.post(f"{url}gradio_api/call/on_load", json={"data": []}, headers={"Origin": own_origin})
    assert response.status_code == 200 and response.headers.get("access-control-allow-origin") in (None, own_origin)

    # two Origin headers, the foreign one first: refused, whichever a reader would take
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    for order in (("https://evil.example", own_origin), (own_origin, "https://evil.example")):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall((f"POST /gradio_api/call/on_load HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Origin: {order[0]}\r\nOrigin: {order[1]}\r\nContent-Type: application/json\r\n"
                          "Content-Length: 11\r\nConnection: close\r\n\r\n{\"data\":[]}").encode())
            assert sock.recv(4096).decode("latin-1").startswith("HTTP/1.1 403"), order


@pytest.fixture(scope="module")
def local_app(tmp_path_factory, model):
    """`app.py` with no options but its token fixed (`SIFT_CHAT_TOKEN`): the local owner's app."""
    root = tmp_path_factory.mktemp("served-local")
    assert cli.main(["--data-dir", str(root / "data"), "ingest", "--quiet", str(SAMPLE)]) == 0
    with served_app(root / "data", "--chat-model", model, env={"SIFT_CHAT_TOKEN": TOKEN},
                    ready_headers={"Authorization": f"Bearer {TOKEN}"}) as served:
        yield served, root


def test_on_loopback_only_the_holder_of_the_token_is_served(local_app, targets):
    served, root = local_app
    url, data = served.url, root / "data"
    assert f"?token={TOKEN}" in served.printed()  # the address it printed opens the app
    before = documents(data)
    stranger = httpx.Client(timeout=60)  # another account on this machine: it reaches 127.0.0.1 too
    for method, path in (("GET", ""), ("GET", "config"), ("GET", "gradio_api/info"), ("GET", "v1/models"),
                         ("POST", "gradio_api/upload"), ("POST", "gradio_api/call/on_ingest"),
                         ("POST", "v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": f"sift-chat-token-0={TOKEN}"}):
            response = stranger.request(method, url + path, headers=headers,
                                        json={"data": [None, str(targets["owner_only"]), False]})
            assert response.status_code == 401 and "token" in response.text, (method, path, headers)
            assert "\n" not in response.text.strip()
    assert documents(data) == before

    owner = httpx.Client(timeout=60)
    opened = owner.get(url + f"?token={TOKEN}&__theme=dark")
    assert opened.status_code == 303 and opened.headers["location"] == "/?__theme=dark"  # out of the address bar
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert owner.get(url + "config").status_code == 200  # the cookie, from now on
    assert httpx.get(url + "v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    # the owner's own page cannot be made to read a server file either
    for path in ("/etc/passwd", str(targets["owner_only"]), str(targets["link"]), str(data / "store" / "store.db")):
        status, error, _ = call(owner, url, "on_ingest", [[file_data(path)], "", False])
        assert status == 200 and "uploaded through the app" in error, path
    assert documents(data) == before
    assert not files_holding(data / "web-uploads", b"4711")
    assert oct(os.stat(data / "web-uploads").st_mode & 0o777) == "0o700"  # Gradio's uploads: this account's only


def test_with_sign_in_a_caller_who_has_not_signed_in_gets_nothing_at_all(signin_app):
    served, root = signin_app
    url, data = served.url, root / "data"
    before = sorted(p.name for p in (data / "web-uploads").rglob("*"))
    anonymous = httpx.Client(timeout=60)
    assert anonymous.post(url + "gradio_api/upload", files=[("files", ("x.txt", b"x"))]).status_code == 401
    assert anonymous.get(url + "gradio_api/file=/etc/passwd").status_code in (401, 404)
    for path, body in (("gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"}),
                       ("gradio_api/call/on_ingest", {"data": [[file_data("/etc/passwd")], "", False]}),
                       ("v1/chat/completions", {"model": "sift-chat", "messages": [{"role": "user", "content": "hi"}]})):
        assert anonymous.post(url + path, json=body).status_code == 401, path
    assert anonymous.get(url + "v1/models").status_code == 401  # serving publicly: no key, no API
    assert sorted(p.name for p in (data / "web-uploads").rglob("*")) == before  # nothing written


def test_the_api_reads_only_the_shared_library(signin_app):
    served, root = signin_app
    url = served.url
    alice = signed_in(url, "alice")
    diary = upload(alice, url, "lighthouse-diary.txt", b"The lighthouse keeper's secret code is LAMP-4711.")
    assert call(alice, url, "on_ingest", [[file_data(diary)], "", False])[1] is None
    assert any(owner == "user:alice" and path.endswith("lighthouse-diary.txt") for owner, path in documents(root / "data"))
    response = httpx.post(url + "v1/chat/completions", timeout=120, headers={"Authorization": "Bearer api-key"},
                          json={"model": "sift-chat", "max_tokens": 2, "sift": {"mode": "context", "passages": 8},
                                "messages": [{"role": "user", "content": "What is the lighthouse keeper's secret code?"}]})
    assert response.status_code == 200
    picks = response.json()["sift"]["selection"]["picks"]
    assert len(picks) == 8 and not any("4711" in pick["text"] or "diary" in pick["path"] for pick in picks)


def test_an_upload_over_the_limit_writes_nothing(signin_app):
    served, root = signin_app
    url, folder = served.url, root / "data" / "web-uploads"
    bob = signed_in(url, "bob")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    response = bob.post(url + "gradio_api/upload", files=[("files", (f"{i}.txt", b"x" * 2**20)) for i in range(66)])
    assert response.status_code == 413
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_while_the_models_load_the_perimeter_holds(tmp_path, model):
    """The port opens before the models are in: the loading page checks Host, origin and token too."""
    with served_app(tmp_path / "data", "--chat-model", model, env={"SIFT_CHAT_TOKEN": TOKEN}, wait=False) as served:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 120
        while "token" not in seen and time.monotonic() < deadline:
            try:
                seen["token"] = httpx.get(served.url + "config", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
                seen["no token"] = httpx.get(served.url + "config").status_code
                seen["foreign host"] = httpx.get(served.url + "config", headers={
                    "Authorization": f"Bearer {TOKEN}", "Host": "evil.example"}).status_code
                seen["foreign origin"] = httpx.get(served.url + "config", headers={
                    "Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}).status_code
            except httpx.HTTPError:  # not listening yet
                seen.clear()
                time.sleep(0.05)
        assert seen == {"token": 503, "no token": 401, "foreign host": 403, "foreign origin": 403}, seen


def test_app_py_refuses_to_serve_beyond_this_machine_without_sign_in(tmp_path):
    import subprocess
    import sys

    from .served import ROOT

    for options in (["--host", "0.0.0.0"], ["--share"]):
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", "9", "--data-dir", str(tmp_path),
                                 *options], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "SIFT_CHAT_AUTH")})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith("error: serving beyond this machine needs sign-in")
        assert "loading the models" not in result.stderr and time.monotonic() - started < 60  # before any model


def test_the_quota_holds_over_http(signin_app):
    served, root = signin_app
    url, data = served.url, root / "data"
    carol = signed_in(url, "carol")
    notes = [upload(carol, url, f"note-{i}.txt", f"Carol's note {i} on the tides.".encode()) for i in range(3)]
    status, error, output = call(carol, url, "on_ingest", [[file_data(n) for n in notes[:2]], "", False])
    assert error is None and "2 added" in output[0]
    status, error, output = call(carol, url, "on_ingest", [[file_data(notes[2])], "", False])
    assert "Over your quota of 2 documents" in (error or output[0]) and "nothing was added" in (error or output[0])
    assert sum(owner == "user:carol" for owner, _ in documents(data)) == 2
