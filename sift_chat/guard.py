"""The Gradio app as an HTTP API: every event handler can be called directly (a raw
`POST /gradio_api/call/<name>`, or `gradio_client`), with any data at all. Whatever arrives, the
caller gets one line back, never a traceback or a dump of the app's components.

    GuardedBlocks   gr.Blocks whose every call (preprocessing the inputs, the handler, each step
                    of a streaming handler, postprocessing) turns an unexpected exception into a
                    one-line gr.Error naming the handler; refusals (a full line, a user's second
                    message) keep their own words
                    and, before any input is read, refuses a file the caller did not upload
    UploadGate      ASGI middleware inside Gradio's app: records the files each caller's upload
                    request brought (the only ones a call may name), and serves no file back
                    (`/gradio_api/file=`: the app shows none, and an upload is its owner's)
    PRIVATE         the settings that keep Gradio from storing calls in the browser (run history:
                    every input and output in localStorage, shown on the footer's "Runs" page)
                    and from serving /monitoring

A call may name a file (Gradio's FileData: any value with a "path") only when that caller's own
upload request brought it. Gradio checks that a named file lies in its upload folder only in an
app started by `launch()`, and never whose upload it was; mounted, as `server.py` serves the app,
it would copy any file the server can read into its cache and hand it to the handler.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import pydantic
from starlette.requests import Request

from .perimeter import respond
from .vocabulary import first_line, one_line
from .turns import Busy, QueueFull
from .uploads import UploadLedger

PRIVATE = {"run_history": False, "enable_monitoring": False}
CHECKERS = tuple(str(Path(m.__file__).parent) for m in (gr, pydantic))  # where inputs are checked
WIDTH = 200  # characters of an error a caller sees
log = logging.getLogger("sift_chat")


def refusal(error: Exception, handler: str) -> gr.Error:
    """The one-line error a caller sees for `error`, raised by `handler`."""
    if isinstance(error, gr.Error):  # the app's own words, and Gradio's checks of a value
        return gr.Error(one_line(error.message, WIDTH), duration=error.duration, title=error.title,
                        print_exception=False)
    if isinstance(error, (Busy, QueueFull)):
        return gr.Error(one_line(error, WIDTH), print_exception=False)
    if raised_in(error, CHECKERS):  # Gradio's own checks: too few inputs, a value of the wrong type
        return gr.Error(f"{handler}: {one_line(first_line(error), WIDTH)}", print_exception=False)
    log.warning("%s refused a request: %s: %s", handler, type(error).__name__, one_line(error, WIDTH))
    return gr.Error(f"{handler}: this request's inputs are missing or not what the app sends "
                    f"({type(error).__name__}).", print_exception=False)


def raised_in(error: BaseException, folders: tuple[str, ...]) -> bool:
    """Whether the innermost frame of the error's traceback is in one of the `folders`."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(folders)


def named_paths(value: Any) -> Iterator[Any]:
    """Every "path" of every dict in `value`, at any depth (without recursion: a value may be
    deeply nested), as Gradio would read a file from it."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "path" in item:
                yield item["path"]
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


class GuardedBlocks(gr.Blocks):
    """gr.Blocks that answers every failed call with one line, and reads only files its caller
    uploaded (see the module's docstring). `caller_key(request)` names whose uploads a request
    may use (from the server's side of it: `layout.request_caller`)."""

    def __init__(self, *args, caller_key: Callable[[Request | None], str] = lambda request: "", **kwargs):
        super().__init__(*args, **kwargs)
        self.uploads, self.caller_key = UploadLedger(), caller_key

    async def process_api(self, block_fn, inputs=None, state=None, request=None, *args, **kwargs):
        fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
        try:
            self.check_files(inputs, request)
            return await super().process_api(block_fn, inputs, state, request, *args, **kwargs)
        except Exception as error:
            raise refusal(error, getattr(fn, "api_name", None) or getattr(fn, "name", "this event")) from None

    def check_files(self, inputs, request) -> None:
        """Refuse the call (gr.Error) when an input names a file this caller's uploads did not
        bring: before Gradio reads or copies anything."""
        key = None
        for path in named_paths(inputs):
            if key is None:
                key = self.caller_key(getattr(request, "request", None))
            if not self.uploads.holds(key, path):
                raise gr.Error("Only files you uploaded through the app are read: upload the file first.",
                               print_exception=False)


class UploadGate:
    """ASGI middleware inside Gradio's app (`app_kwargs={"middleware": …}`): what an upload
    request brought is recorded for its caller in `blocks.uploads`; `/gradio_api/file=` serves
    nothing (404)."""

    def __init__(self, app, blocks: GuardedBlocks):
        self.app, self.blocks = app, blocks

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if "/gradio_api/file=" in path:
            return await respond(send, 404, "404 the app serves no files\n")
        if scope["method"] != "POST" or not path.endswith("/gradio_api/upload"):
            return await self.app(scope, receive, send)
        caller = self.blocks.caller_key(Request(scope))
        start, body = {}, bytearray()

        async def kept(message):  # the answer (a short JSON list of paths) is read before it leaves
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            if start.get("status") == 200:
                self.blocks.uploads.record(caller, _paths_answered(bytes(body)))
            await send(start)
            await send({"type": "http.response.body", "body": bytes(body)})

        await self.app(scope, receive, kept)


def _paths_answered(body: bytes) -> list[str]:
    try:
        paths = json.loads(body)
    except ValueError:
        return []
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []
