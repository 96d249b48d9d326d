"""`/v1`: an OpenAI-compatible chat API over the application layer, served beside the app.

    POST /v1/chat/completions   messages (with history), max_tokens, temperature, stop, seed, stream;
                                and the extension "sift": {method, mode, context_contrast, contrast_against,
                                passages, read_passages, read_min_match, lam, min_reduction, learning_rate, lora_layers}, checked as the
                                app's settings are
    GET  /v1/models             the one model this server answers with

Every answer learns at test time as in the app, waiting in the same line for the model. The
response carries what the app's panel shows in an extension field "sift" (the picks with their
citation number, source, offsets, σ² after each, reduction and loss; the passages read in the
prompt; the answer with its citations [n] and the numbers cited; how it ended: "end", "limit",
"repeat" or "stop" at a stop sequence; the seconds of each stage; the queue); a stream sends it
in a last chunk before [DONE]. `finish_reason` is "length" when the answer was cut at max_tokens. Errors are OpenAI-shaped JSON: 400 bad request,
401 no or wrong key, 403 a foreign Host or Origin on loopback (`sift_chat.perimeter`), 404 unknown
model or path, 413 too large, 429 too many waiting or this caller's previous request still waiting
or running (one at a time per caller: its bearer token), 503 the
model is loading, 500 (without a traceback) for anything else; a 400 names the field in `param`.
A request carries at most MAX_MESSAGES messages and MAX_CHARACTERS characters (400 otherwise,
before the model). Nothing is stored: a client that goes away stops its request at once, at any
stage (the model back at base at its next event, out of the line), and frees its caller's ticket.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import anyio
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from .access import LOCAL
from .events import Notice, Prompted, Selected, Step, Token
from .panel import SETTING_NAMES, Panel, parse_settings
from .service import Answered, Service, Stopped, Waiting
from .settings import ChatSettings
from .turns import Busy, QueueFull, Turn
from .vocabulary import SettingError, first_line, quoted

MODEL_ID = "sift-chat"
MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON: far more than any context this model reads
# one request's conversation: the prompt is fitted to the model's context (2048 tokens by default)
# in time linear in its length, and what does not fit is left out; beyond these it is refused (400)
MAX_MESSAGES = 1000
MAX_CHARACTERS = 200_000  # in all messages together: far more than the model reads
# the app's settings, less the two the OpenAI fields carry (max_tokens; adaptive = min_reduction given)
EXTENSION_KEYS = tuple(name for name in SETTING_NAMES if name not in ("adaptive", "max_new_tokens"))
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        message, param = (_printable(text) for text in (message, param))
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "5"} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _printable(text: str | None) -> str | None:
    """Text a JSON response can carry: what a client sent may hold half of a surrogate pair."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class ApiState:
    """What the routes serve: the service once the models are loaded (None before: 503)."""

    service: Service | None = None
    api_key: str | None = None
    key_required: bool = False  # serving beyond loopback: no key, no API
    max_body_bytes: int = MAX_BODY_BYTES


@dataclass
class CompletionRequest:
    prompt: str
    history: list[dict]
    chat: ChatSettings
    adaptation: object
    stop: list[str]
    stream: bool
    extension: dict = field(default_factory=dict)


def create_router(state: ApiState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models(request: Request):
        try:
            _service(state, request)
        except ApiError as error:
            return error.response()
        return {"object": "list", "data": [_model_card()]}

    @router.get("/models/{model}")
    async def model(model: str, request: Request):
        try:
            _service(state, request)
            _check_model(model)
        except ApiError as error:
            return error.response()
        return _model_card()

    @router.post("/chat/completions")
    async def completions(request: Request):
        try:
            service = _service(state, request)
            body = await _body(request, state.max_body_bytes)
            parsed = _parse(body, service)
            try:
                service.queue.check()  # the turn joins the line when its answer starts
                turn = service.new_turn(caller(request))
            except QueueFull as error:
                raise ApiError(429, str(error), "rate_limit_exceeded", code="queue_full") from None
            except Busy as error:
                raise ApiError(429, str(error), "rate_limit_exceeded", code="one_at_a_time") from None
        except ApiError as error:
            return error.response()
        answer = _answer(service, turn, parsed)
        if parsed.stream:
            return AnswerStream(_chunks(answer), lambda: service.release(turn))
        try:
            return JSONResponse(await _answered(request, answer, turn, service))
        except ApiError as error:
            return error.response()
        except QueueFull as error:
            return ApiError(429, str(error), "rate_limit_exceeded", code="queue_full").response()
        except Exception as error:  # the model failed: say so, without a traceback
            return ApiError(500, f"the answer failed: {first_line(error)}", "server_error").response()
        finally:
            service.release(turn)

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(path: str):
        return ApiError(404, f"no such endpoint: /v1/{path}", code="unknown_url").response()

    return router


# -- checks ------------------------------------------------------------------------------------


def _service(state: ApiState, request: Request) -> Service:
    """The caller may use the API (401 otherwise), and the model is loaded (503 otherwise)."""
    if state.api_key or state.key_required:
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not state.api_key:
            raise ApiError(401, "this server is reachable beyond this machine: start it with --api-key KEY "
                                "to use the API", code="invalid_api_key")
        if not token or not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise ApiError(401, "no API key, or a wrong one: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
    if state.service is None:
        raise ApiError(503, "the model is loading: try again in a few seconds", "server_error",
                       code="model_loading")
    return state.service


def caller(request: Request) -> str:
    """Who is asking, for the rule of one request at a time per user: the holder of the bearer
    token (with --api-key, everyone who has the key is one caller; on loopback without one, a
    client names itself by its token: any string, as the machine is its owner's alone)."""
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    return "api:" + hashlib.sha256(token.encode()).hexdigest()[:16]


async def _body(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request is larger than {limit} bytes", code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request is larger than {limit} bytes", code="request_too_large")
    try:
        body = json.loads(data, parse_constant=_not_json)
    except RecursionError:  # nested deeper than Python's parser goes
        raise ApiError(400, "the body is not JSON this server reads: nested too deeply") from None
    except (UnicodeDecodeError, ValueError):  # also NaN and Infinity, and integers too long to read
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _not_json(constant: str):
    """NaN, Infinity and -Infinity: Python's JSON reads them, JSON has no such values."""
    raise ValueError(f"{constant} is not JSON")


def _check_model(model) -> None:
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    if model != MODEL_ID:
        raise ApiError(404, f"the model {quoted(model)} does not exist here: use {MODEL_ID!r}", param="model",
                       code="model_not_found")


def _parse(body: dict, service: Service) -> CompletionRequest:
    """The request as engine settings, or ApiError(400) naming the field to fix."""
    _check_model(body.get("model"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"messages has {len(messages)} messages, more than the {MAX_MESSAGES} one request "
                            "may carry: leave out the oldest", param="messages", code="conversation_too_long")
    turns, characters = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role ({', '.join(ROLES)})", param=f"messages[{i}].role")
        turns.append({"role": message["role"], "content": _text(message.get("content"), i)})
        characters += len(turns[-1]["content"])
        if characters > MAX_CHARACTERS:
            raise ApiError(400, f"the messages are longer than the {MAX_CHARACTERS} characters one request may "
                                "carry: leave out the oldest", param="messages", code="conversation_too_long")
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ApiError(400, "the last message must be the user's, with text", param="messages")
    if body.get("n") is not None and (isinstance(body["n"], bool) or body["n"] != 1):
        raise ApiError(400, "n must be 1: one answer per request", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings", param="stop")

    extension = body.get("sift") or {}
    if not isinstance(extension, dict):
        raise ApiError(400, "sift must be an object", param="sift")
    unknown = sorted(set(extension) - set(EXTENSION_KEYS))
    if unknown:
        raise ApiError(400, f"unknown sift setting(s) {', '.join(quoted(k) for k in unknown[:5])}: use "
                            f"{', '.join(EXTENSION_KEYS)}", param=f"sift.{unknown[0][:40]}")
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    values = {**extension, "adaptive": extension.get("min_reduction") is not None,
              "max_new_tokens": body.get(tokens_field)}
    fields = {"max_new_tokens": tokens_field, "adaptive": "sift.min_reduction"}
    try:
        chat, adaptation = parse_settings(values, service.base_adaptation, layers=service.engine.layer_count)
        chat = ChatSettings(**{**chat.__dict__, **_sampling(body)})
    except SettingError as error:
        raise ApiError(400, str(error), param=fields.get(error.name) or (
            f"sift.{error.name}" if error.name in EXTENSION_KEYS else error.name)) from None
    history = [t for t in turns[:-1] if t["role"] in ("user", "assistant")]
    return CompletionRequest(turns[-1]["content"], history, chat, adaptation, stop, stream, extension)


def _text(content, i: int) -> str:
    """A message's text: a string, or a list of text parts; Unicode that UTF-8 can carry (JSON's
    escapes can name half of a surrogate pair, which no tokenizer reads)."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be text (a string or text parts)",
                       param=f"messages[{i}].content")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"messages[{i}].content is not valid Unicode: it holds half of a surrogate pair",
                       param=f"messages[{i}].content") from None
    return content


def _sampling(body: dict) -> dict:
    """temperature (OpenAI's range, [0, 2]) and seed (`ChatSettings` checks its range)."""
    out = {}
    if body.get("temperature") is not None:
        value = body["temperature"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
            raise SettingError("temperature", f"temperature must be a number in [0, 2], got {quoted(value)}")
        out["temperature"] = float(value)
    if body.get("seed") is not None:
        if isinstance(body["seed"], bool) or not isinstance(body["seed"], int):
            raise SettingError("seed", f"seed must be an integer, got {quoted(body['seed'])}")
        out["seed"] = body["seed"]
    return out


# -- answering ---------------------------------------------------------------------------------


def _answer(service: Service, turn: Turn, request: CompletionRequest) -> Iterator[tuple]:
    """("wait", ahead)…, ("step", i, n)…, ("text", piece)…, then ("end", finish_reason, text,
    extension). The text is the answer as the model wrote it (streamed, so without the citation
    markers; the extension has the answer with them). Cuts the answer at the first stop sequence
    (generation stops there too), holding back the last few characters while they could still
    begin one, and the last `loop_tokens` pieces while the engine could still cut them as a repeat,
    so a stream sends exactly the text a request without streaming gets."""
    hold = max((len(s) for s in request.stop), default=1) - 1
    held_pieces = request.chat.loop_tokens
    pieces, sent, panel, notices = [], 0, None, []
    # the API key is the local owner's: it reads the shared library (per-user keys: see the README)
    run = service.run(turn, request.prompt, request.history, request.chat, request.adaptation, caller=LOCAL)

    def extension(ended: str, cited: str, answered: Answered | None = None) -> dict:
        chat, adaptation = request.chat, request.adaptation
        return {"method": chat.method, "mode": chat.mode, "context_contrast": chat.context_contrast,
                "contrast_against": chat.contrast_against, "passages": chat.passages,
                "read_passages": chat.read_passages, "read_min_match": chat.read_min_match, "lam": chat.lam,
                "min_reduction": chat.min_reduction, "learning_rate": adaptation.learning_rate,
                "lora_layers": adaptation.top_layers or 0,
                "selection": panel.to_json() if panel else None,
                "ended": ended, "cited_answer": cited, "citations": list(panel.citations) if panel else [],
                "read": list(panel.read) if panel else [],
                "seconds": answered.record.seconds if answered else {}, "notices": notices,
                "queue": {"arrived": turn.arrived, "started": turn.started}}

    try:
        for event in run:
            if isinstance(event, Waiting):
                yield "wait", event.ahead
            elif isinstance(event, Selected):
                panel = Panel.from_selected(event, request.chat.mode)
            elif isinstance(event, Prompted) and panel is not None:
                panel.read = [p.id for p in event.passages]
            elif isinstance(event, Step):
                panel.add_step(event)
                yield "step", event.index, event.total
            elif isinstance(event, Notice):
                notices.append(event.message)
            elif isinstance(event, Stopped):  # its client went away
                return
            elif isinstance(event, Token):  # sent as the stored answer reads: without outer whitespace
                pieces.append(event.text)
                shown = "".join(pieces).lstrip()
                cut = min((i for i in (shown.find(s) for s in request.stop) if i >= 0), default=-1)
                if cut >= 0:
                    answer = shown[:cut].rstrip()
                    yield "text", answer[sent:]
                    cited = answer
                    if panel is not None:  # the citations the engine would have added
                        cited, panel.citations = panel.cite(answer, request.prompt)
                    yield "end", "stop", answer, extension("stop", cited)
                    return
                sendable = "".join(pieces[:max(len(pieces) - held_pieces, 0)]).lstrip()
                ready = len(sendable.rstrip()) - hold
                if ready > sent:
                    yield "text", sendable[sent:ready]
                    sent = ready
            elif isinstance(event, Answered):
                answer, panel = event.raw_answer, event.panel or panel
                yield "text", answer[sent:]
                ended = event.record.ended
                yield ("end", "length" if ended == "limit" else "stop", answer,
                       extension(ended, event.answer, event))
                return
    finally:
        run.close()  # the model back at base, out of the line


async def _answered(request: Request, answer: Iterator[tuple], turn: Turn, service: Service) -> dict:
    """The completion, made in a worker thread; the moment the client goes away (while the
    turn waits, selects, steps or generates) the turn is stopped and its ticket freed."""
    async def stop_when_gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        service.release(turn)

    completion, failure = None, None
    async with anyio.create_task_group() as group:
        group.start_soon(stop_when_gone)
        try:
            completion = await run_in_threadpool(_complete, answer, turn)
        except Exception as error:  # raised below, not as a task group's exception group
            failure = error
        group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return completion


def _complete(answer: Iterator[tuple], turn: Turn) -> dict:
    try:
        for item in answer:
            if item[0] == "end":
                _, reason, text, extension = item
                return {**_envelope("chat.completion"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": reason, "logprobs": None}],
                        "sift": extension}
    finally:
        answer.close()
    if turn.stopped:  # no one is left to read this
        raise ApiError(400, "the request was stopped: its client went away", code="client_gone")
    raise ApiError(500, "the answer ended without a result", "server_error")


def _chunks(answer: Iterator[tuple]) -> Iterator[str]:
    """The answer as server-sent events: a role chunk, text chunks, the finish reason, then the
    extension in a chunk of its own, and [DONE]. While waiting in line, SSE comments say the place."""
    envelope = _envelope("chat.completion.chunk")

    def event(choices: list, **more) -> str:
        return f"data: {json.dumps({**envelope, 'choices': choices, **more})}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        for item in answer:
            if item[0] == "wait":
                yield f": waiting for the model, {item[1]} ahead\n\n"
            elif item[0] == "step":  # a comment (clients skip it) that also finds a client gone
                yield f": fine-tuning, step {item[1]} of {item[2]}\n\n"
            elif item[0] == "text" and item[1]:
                yield event([{"index": 0, "delta": {"content": item[1]}, "finish_reason": None}])
            elif item[0] == "end":
                yield event([{"index": 0, "delta": {}, "finish_reason": item[1]}])
                yield event([], sift=item[3])
    except Exception as error:  # the headers are sent: the error goes into the stream, as OpenAI's does
        failure = {"message": f"the answer failed: {first_line(error)}", "type": "server_error",
                   "param": None, "code": None}
        yield f"data: {json.dumps({'error': failure})}\n\n"
    finally:
        answer.close()
    yield "data: [DONE]\n\n"


class AnswerStream(StreamingResponse):
    """An answer as server-sent events, made in worker threads. It listens for the client going
    away all along (not only between chunks): then `release()` stops the turn at once, whatever
    stage it is in (waiting, selecting, stepping, generating; the model is let go at its next
    event), and frees the caller's ticket, also when the answer never started."""

    def __init__(self, chunks: Iterator[str], release: Callable[[], None]):
        super().__init__(_pumped(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream():
                    with contextlib.suppress(OSError):  # the client went away while a chunk was sent
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                self.release()
                group.cancel_scope.cancel()
        finally:
            self.release()


async def _pumped(chunks: Iterator[str]):
    """Iterate a blocking generator in worker threads; closed (the model back at base, the turn
    out of the line) however the stream ends."""
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(next, chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(chunks.close)


def _envelope(kind: str) -> dict:
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": kind, "created": int(time.time()),
            "model": MODEL_ID}


def _model_card() -> dict:
    return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "sift-chat"}
