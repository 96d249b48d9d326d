"""Who may reach the server at all, decided before any route runs: the `Host` and `Origin` of
every request (the app's routes, Gradio's, and `/v1` alike).

Bound to loopback, the app is its owner's alone, but a web page the owner visits can still send
it requests: across sites (a form or `fetch` to http://127.0.0.1:7860), or through DNS rebinding
(a name of the attacker's that first resolves to the attacker and then to 127.0.0.1, so that the
page is "same-origin" with the app). Both show in the headers: a rebound request names the
attacker's host in `Host`, a cross-site one names its page in `Origin`. So on loopback a request
is served only when its `Host` is localhost, 127.0.0.1 or [::1] (any port) and its `Origin`, when
there is one, is such a host too; anything else gets 403 and one line.

Serving publicly (`--host 0.0.0.0`, `--share`, a Space) nothing is checked unless
`--allowed-hosts` names the hosts the app is reached by: then those (and the loopback names)
are the only ones served, in `Host` and `Origin` alike.

However it is served, one upload request (Gradio's `/gradio_api/upload`, where files go before an
ingest reads them) carries at most what one ingest takes: `UploadLimit` refuses a larger one, or
one that does not say its length, before a byte of it is written.
"""

from __future__ import annotations

import json
from typing import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


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


def origin_host(origin: str) -> str | None:
    """The host of an `Origin` header ('http://localhost:7860' → 'localhost'); None for 'null'
    (a sandboxed frame or a local file) and anything that is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        return parts.hostname if parts.scheme in ("http", "https") and parts.hostname else None
    except ValueError:
        return None


def allowed_hosts(public: bool, named: Iterable[str] = ()) -> frozenset[str] | None:
    """The hosts a request may name: on loopback the loopback names (and any `named`); serving
    publicly, the `named` ones and the loopback names, or None (no check) when none are named."""
    named = frozenset(h for h in (host_of(n) for n in named) if h)
    if public and not named:
        return None
    return LOOPBACK_NAMES | named


def refusal(headers: dict[str, str], hosts: frozenset[str]) -> str:
    """Why a request with these headers (lower-case names) is refused; '' when it may pass."""
    if host_of(headers.get("host", "")) not in hosts:
        return "this server answers only requests addressed to " + _listed(hosts)
    origin = headers.get("origin")
    if origin is not None and origin_host(origin) not in hosts:
        return "this server answers only pages served from " + _listed(hosts)
    return ""


def _listed(hosts: frozenset[str]) -> str:
    return ", ".join(f"[{h}]" if ":" in h else h for h in sorted(hosts)) + " (see --allowed-hosts)"


class HostCheck:
    """ASGI middleware: requests and websockets whose `Host` or `Origin` is not one of `hosts`
    are refused with 403 and one line (OpenAI-shaped JSON under /v1, plain text elsewhere)."""

    def __init__(self, app, hosts: Iterable[str]):
        self.app, self.hosts = app, frozenset(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            reason = refusal(headers, self.hosts)
            if reason:
                return await self._refuse(scope, send, reason)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope, send, reason: str) -> None:
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation: 403 before accept
        if scope.get("path", "").startswith("/v1"):
            error = {"message": reason, "type": "invalid_request_error", "param": None, "code": "forbidden_host"}
            return await _respond(send, 403, json.dumps({"error": error}), "application/json")
        await _respond(send, 403, f"403 Forbidden: {reason}\n")


class UploadLimit:
    """ASGI middleware: an upload to Gradio must state its length (411 otherwise) and be at most
    `max_bytes` long (413 otherwise)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/gradio_api/upload"):
            length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
            if not length.isdigit():
                return await _respond(send, 411, "411 an upload must say its length (Content-Length)\n")
            if int(length) > self.max_bytes:
                return await _respond(send, 413, f"413 an upload may carry at most {self.max_bytes // 2**20} MiB: "
                                                 "send fewer files at once\n")
        return await self.app(scope, receive, send)


async def _respond(send, status: int, text: str, kind: str = "text/plain; charset=utf-8") -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})
