"""Who may reach the server at all, decided before any route runs: the `Host`, `Origin` and
`Referer` of every request (the app's routes, Gradio's, and `/v1` alike), and on loopback the
server's token.

Same origin, always: a request that comes from a page (`Origin`, or without it `Referer`) is
served only when that page is the app itself (the same host and port as the request's `Host`)
or a host named by `--allowed-hosts`. A page elsewhere that the user visits, signed in or not,
can neither act as them nor read an answer (Gradio's CORS layer would otherwise answer any origin
with credentials; `server.create_server` also turns it off). A request naming its `Host`,
`Origin` or `Referer` twice is refused: which one counts would depend on who reads it.

Bound to loopback, a request is served only when its `Host` is localhost, 127.0.0.1 or [::1]
(any port), which stops DNS rebinding (a name of the attacker's that first resolves to the
attacker and then to 127.0.0.1 sends the attacker's name in `Host`). Serving publicly
(`--host 0.0.0.0`, `--share`, a Space) any `Host` is served unless `--allowed-hosts` names them.

On loopback the app is also its owner's alone among the machine's accounts: `TokenCheck` wants
the random token the server printed at start (in the URL it opens, a cookie after that, or
`Authorization: Bearer TOKEN`), as Jupyter does; another account on the machine, which can reach
127.0.0.1 too, gets 401.

However it is served, one upload request (Gradio's `/gradio_api/upload`, where files go before an
ingest reads them) carries at most what one ingest takes: `UploadLimit` refuses a larger one, or
one that does not say its length, before a byte of it is written.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import CookieError, SimpleCookie
from typing import Iterable
from urllib.parse import parse_qs, urlencode, urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_of(header: str) -> str | None:
    """The host named by a `Host` header, lower-case, without its port ('[::1]:7860' → '::1');
    None when the header is empty or malformed."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal: [addr] or [addr]:port
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "?"
        return header[1:end] if end > 0 and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else None
    name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()) or any(c in name for c in "/@ \\"):
        return None
    return name


def allowed_hosts(public: bool, named: Iterable[str] = ()) -> frozenset[str] | None:
    """The hosts a request may name: on loopback the loopback names (and any `named`); serving
    publicly, the `named` ones and the loopback names, or None (no check) when none are named."""
    named = frozenset(h for h in (host_of(n) for n in named) if h)
    if public and not named:
        return None
    return LOOPBACK_NAMES | named


ONCE = ("host", "origin", "referer")  # headers a request may carry at most once


def refusal(headers: list[tuple[str, str]], hosts: frozenset[str] | None,
            named: frozenset[str] = frozenset()) -> str:
    """Why a request with these headers (lower-case names, in order) is refused; '' when it may
    pass. `hosts`: the hosts its `Host` may name (None: any); `named`: the hosts of
    `--allowed-hosts`, whose pages may call the app from any port."""
    seen: dict[str, str] = {}
    for name, value in headers:
        if name in ONCE:
            if name in seen:
                return f"a request names its {name.capitalize()} once"
            seen[name] = value
    if hosts is not None and host_of(seen.get("host", "")) not in hosts:
        return "this server answers only requests addressed to " + _listed(hosts)
    page = seen.get("origin", seen.get("referer"))
    if page is not None and not same_origin(page, seen.get("host", ""), named):
        return (f"this server answers only its own pages, served from {seen.get('host', '')[:100]!r} "
                "(same origin; see --allowed-hosts)")
    return ""


def same_origin(page: str, host_header: str, named: frozenset[str] = frozenset()) -> bool:
    """Whether a page (an `Origin`, or a `Referer` URL) is the app itself: the same host and port
    as the request's `Host` (a port left out is the default of the page's scheme), or a host in
    `named`. 'null' (a sandboxed frame, a local file) never is."""
    try:
        parts = urlsplit(page.strip())
        page_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port out of range
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return False
    if parts.hostname in named:
        return True
    return host_of(host_header) == parts.hostname and (port_of(host_header) or page_port) == page_port


def port_of(header: str) -> int | None:
    """The port a `Host` header names ('[::1]:7860' → 7860), None when it names none."""
    header = header.strip()
    tail = header[header.find("]") + 1:] if header.startswith("[") else header
    _, colon, port = tail.rpartition(":")
    return int(port) if colon and port.isdigit() else None


def _listed(hosts: frozenset[str]) -> str:
    return ", ".join(f"[{h}]" if ":" in h else h for h in sorted(hosts)) + " (see --allowed-hosts)"


def _headers(scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]


class HostCheck:
    """ASGI middleware: requests and websockets whose `Host` is not one of `hosts` (None: any),
    or that come from a page other than the app's own (or a `named` host's), are refused with
    403 and one line (OpenAI-shaped JSON under /v1, plain text elsewhere)."""

    def __init__(self, app, hosts: Iterable[str] | None, named: Iterable[str] = ()):
        self.app = app
        self.hosts = None if hosts is None else frozenset(hosts)
        self.named = frozenset(h for h in (host_of(n) for n in named) if h)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            reason = refusal(_headers(scope), self.hosts, self.named)
            if reason:
                return await _refuse(scope, send, 403, reason, "forbidden_host")
        return await self.app(scope, receive, send)


class TokenCheck:
    """ASGI middleware: every request carries `token`, as `?token=` (a page then gets it as a
    cookie and is sent on without it in the address), the cookie, or `Authorization: Bearer`;
    `/v1` also takes `api_key`. Anything else gets 401 and one line."""

    def __init__(self, app, token: str, api_key: str | None = None):
        self.app, self.token, self.api_key = app, token, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(_headers(scope))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        cookie = self.cookie_name(scope)
        cookies = {k: m.value for k, m in _cookies(headers.get("cookie", "")).items()}
        bearer = headers.get("authorization", "")
        bearer = bearer[7:].strip() if bearer.lower().startswith("bearer ") else ""
        api = scope.get("path", "").startswith("/v1")
        if self._is_token(query.get("token", [""])[-1]):
            if scope["type"] == "http" and scope["method"] == "GET" and not api:  # a page: keep it, drop it from the URL
                rest = urlencode([(k, v) for k, values in query.items() if k != "token" for v in values], doseq=True)
                location = scope.get("root_path", "") + scope.get("path", "/") + (f"?{rest}" if rest else "")
                return await respond(send, 303, "", extra=[
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", f"{cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode())])
            return await self.app(scope, receive, send)
        if self._is_token(cookies.get(cookie, "")) or self._is_token(bearer) or \
                (api and self.api_key and hmac.compare_digest(bearer.encode(), self.api_key.encode())):
            return await self.app(scope, receive, send)
        return await _refuse(scope, send, 401, "this sift-chat wants its token: open the address it printed at start "
                                               "(…/?token=…), or send 'Authorization: Bearer TOKEN'", "invalid_api_key")

    def _is_token(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def cookie_name(scope) -> str:
        """One cookie per port: browsers share cookies across a host's ports."""
        server = scope.get("server") or ("", 0)
        return f"sift-chat-token-{server[1]}"


def _cookies(header: str) -> SimpleCookie:
    jar = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        pass
    return jar


async def _refuse(scope, send, status: int, reason: str, code: str) -> None:
    if scope["type"] == "websocket":
        return await send({"type": "websocket.close", "code": 1008})  # policy violation: refused before accept
    if scope.get("path", "").startswith("/v1"):
        kind = "invalid_request_error" if status == 403 else "authentication_error"
        error = {"message": reason, "type": kind, "param": None, "code": code}
        return await respond(send, status, json.dumps({"error": error}), "application/json")
    await respond(send, status, f"{status} {'Forbidden' if status == 403 else 'Unauthorized'}: {reason}\n")


class UploadLimit:
    """ASGI middleware: an upload to Gradio must state its length (411 otherwise) and be at most
    `max_bytes` long (413 otherwise)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/gradio_api/upload"):
            length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
            if not length.isdigit():
                return await respond(send, 411, "411 an upload must say its length (Content-Length)\n")
            if int(length) > self.max_bytes:
                return await respond(send, 413, f"413 an upload may carry at most {self.max_bytes // 2**20} MiB: "
                                                 "send fewer files at once\n")
        return await self.app(scope, receive, send)


async def respond(send, status: int, text: str, kind: str = "text/plain; charset=utf-8",
                   extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff"), *extra]})
    await send({"type": "http.response.body", "body": body})
