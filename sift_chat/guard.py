"""The Gradio app as an HTTP API: every event handler can be called directly (a raw
`POST /gradio_api/call/<name>`, or `gradio_client`), with any data at all. Whatever arrives, the
caller gets one line back, never a traceback or a dump of the app's components.

    GuardedBlocks   gr.Blocks whose every call (preprocessing the inputs, the handler, each step
                    of a streaming handler, postprocessing) turns an unexpected exception into a
                    one-line gr.Error naming the handler; refusals (a full line, a user's second
                    message) keep their own words
    PRIVATE         the settings that keep Gradio from storing calls in the browser (run history:
                    every input and output in localStorage, shown on the footer's "Runs" page)
                    and from serving /monitoring
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
import pydantic

from .service import first_line, one_line
from .turns import Busy, QueueFull

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


class GuardedBlocks(gr.Blocks):
    """gr.Blocks that answers every failed call with one line (see the module's docstring)."""

    async def process_api(self, block_fn, *args, **kwargs):
        try:
            return await super().process_api(block_fn, *args, **kwargs)
        except Exception as error:
            fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
            raise refusal(error, getattr(fn, "api_name", None) or getattr(fn, "name", "this event")) from None
