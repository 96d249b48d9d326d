"""Who is calling, and what they may do: callers, the users file of `--auth`, and how a request
becomes a caller.

    local     alone on 127.0.0.1 without options: one implicit owner (the local owner, an admin),
              the CLI's owner too; no key in the browser
    users     `--auth FILE`: names and salted scrypt hashes, managed by `python -m sift_chat users`;
              the name comes from Gradio's sign-in (its session cookie, checked by the server)
    space     on a Hugging Face Space: Sign in with Hugging Face; a visitor who has not signed in
              gets the demo (chat over the shared library, nothing stored, nothing changed)

Chats belong to an owner. Documents belong to an owner or to the shared library, which every
caller reads and only admins change. Identity is always taken from the server's side of the
request, never from a value the browser sends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

SHARED = ""  # the owner of the shared library's documents
LOCAL_OWNER = ""  # the local owner's chats (the CLI's too); its documents are the shared library
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
QUOTA_DOCUMENTS = 200  # the documents of each user's own (the shared library has no quota)
QUOTA_BYTES = 100 * 2**20  # …and their bytes, as uploaded
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # about 50 ms and 16 MiB per check: slow for a guesser


@dataclass(frozen=True)
class Caller:
    """Whoever makes a request. `owner` None: a visitor who has not signed in (the demo)."""

    owner: str | None
    name: str = ""
    admin: bool = False
    session: str = ""  # the page session of a visitor: what their Stop stops

    @property
    def signed_in(self) -> bool:
        return self.owner is not None

    @property
    def key(self) -> str:
        """Whose messages Stop stops: the owner's, or a visitor's page session's."""
        return self.owner if self.owner is not None else f"visitor:{self.session}"

    @property
    def readable(self) -> tuple[str, ...]:
        """The owners whose documents this caller reads: the shared library and their own."""
        return tuple(dict.fromkeys([SHARED] + ([self.owner] if self.owner is not None else [])))

    @property
    def collection(self) -> str | None:
        """Where this caller's uploads go: their own documents (the local owner's are the shared
        library); None for a visitor, who adds nothing."""
        return self.owner

    def may_change(self, document_owner: str) -> bool:
        """Remove or replace a document of `document_owner`: one's own, or the shared library as an admin."""
        return self.signed_in and (document_owner == self.owner or (self.admin and document_owner == SHARED))


LOCAL = Caller(LOCAL_OWNER, "local owner", admin=True)


def visitor(session: str = "") -> Caller:
    return Caller(None, "visitor", session=session)


# -- the users file ------------------------------------------------------------------------------


class UsersFile:
    """Names, admin flags and salted scrypt hashes in one JSON file (owner-only permissions).

    {"users": {"alice": {"admin": false, "salt": hex, "hash": hex, "n": 16384, "r": 8, "p": 1}}}
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._cache: tuple[float, dict] | None = None

    def users(self) -> dict[str, dict]:
        """Every user's record, re-read when the file changed (users may be added while serving)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cache is None or self._cache[0] != mtime:
            try:
                users = json.loads(self.path.read_text()).get("users", {})
            except (OSError, ValueError, AttributeError) as error:
                raise ValueError(f"cannot read the users file {self.path}: {error}") from None
            self._cache = (mtime, users if isinstance(users, dict) else {})
        return self._cache[1]

    def add(self, name: str, password: str, admin: bool = False) -> bool:
        """Add the user, or give an existing one a new password and admin flag; True when new."""
        if not USER_NAME.fullmatch(name or ""):
            raise ValueError("a user name is 1 to 64 letters, digits or _ . @ - (starting with a letter or digit)")
        if len(password or "") < 8:
            raise ValueError("the password needs at least 8 characters")
        users = dict(self.users())
        salt = secrets.token_bytes(16)
        new = name not in users
        users[name] = {"admin": bool(admin), "salt": salt.hex(), "hash": _hash(password, salt, SCRYPT).hex(), **SCRYPT}
        self._write(users)
        return new

    def remove(self, name: str) -> bool:
        users = dict(self.users())
        if users.pop(name, None) is None:
            return False
        self._write(users)
        return True

    def check(self, name: str, password: str) -> bool:
        """The password is this user's (as slow for an unknown name as for a known one)."""
        record = self.users().get(name) if isinstance(name, str) else None
        if not isinstance(password, str):
            return False
        if not isinstance(record, dict):
            _hash(password, b"\0" * 16, SCRYPT)
            return False
        try:
            given = _hash(password, bytes.fromhex(record["salt"]), record)
            return hmac.compare_digest(given, bytes.fromhex(record["hash"]))
        except (KeyError, ValueError, TypeError):
            return False

    def is_admin(self, name: str) -> bool:
        record = self.users().get(name)
        return isinstance(record, dict) and record.get("admin") is True

    def _write(self, users: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({"users": users}, file, indent=1, sort_keys=True)
        os.replace(staging, self.path)
        self._cache = None


def _hash(password: str, salt: bytes, cost: dict) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=int(cost["n"]), r=int(cost["r"]), p=int(cost["p"]),
                          maxmem=64 * 2**20, dklen=32)


# -- from a request to a caller ------------------------------------------------------------------


class Access:
    """How this server tells who calls: "local", "users" (--auth) or "space" (Sign in with HF)."""

    def __init__(self, mode: str = "local", users: UsersFile | None = None, admins: frozenset[str] = frozenset()):
        if mode not in ("local", "users", "space"):
            raise ValueError(f"unknown access mode {mode!r}")
        if mode == "users" and users is None:
            raise ValueError("--auth needs a users file")
        self.mode, self.users, self.admins = mode, users, admins

    def caller(self, username: str | None = None, hf_username: str | None = None, session: str = "") -> Caller:
        """The caller of a request: `username` is Gradio's signed-in user (its server-side session),
        `hf_username` the Hugging Face profile of the server-side OAuth session."""
        if self.mode == "local":
            return LOCAL
        if self.mode == "users" and isinstance(username, str) and username in self.users.users():
            return Caller(f"user:{username}", username, admin=self.users.is_admin(username))
        if self.mode == "space" and isinstance(hf_username, str) and hf_username:
            return Caller(f"hf:{hf_username}", hf_username, admin=hf_username in self.admins)
        return visitor(session)

    def check_password(self, username: str, password: str) -> bool:
        """Gradio's `auth=` callable."""
        return self.users is not None and self.users.check(username, password)
