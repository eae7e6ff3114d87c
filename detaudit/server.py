"""`detaudit serve`: an OpenAI-compatible HTTP front (FastAPI + uvicorn) over the local engine.

One background thread owns the engine and runs packed steps while any request is in flight; HTTP handlers submit
sequences to it and await per-step events. Concurrent requests therefore share batches exactly as they do in
`detaudit local`: with stock kernels their tokens depend on the load, with batch-invariant kernels they do not.

Because requests share steps, one request must never be able to fail a step: everything is checked before a
sequence reaches the engine (docs/engine.md, "Admission and cancellation"), and a step that raises anyway is rerun
per sequence by the engine so that only the request that raises fails. A request whose client has gone is aborted
at once, so its KV blocks and batch seat go to the requests still waiting.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from detaudit.engine.llm import Engine, StepError
from detaudit.engine.sequence import SamplingParams, Sequence
from detaudit.errors import UsageError


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# How pydantic names the member of a union it tried in an error's location (`stop.str`, `prompt.list[int]`).
_UNION_MEMBER = re.compile(r"(str|int|float|bool|list|dict)(\[.*\])?")


class _ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


# Parameters this engine does not implement, refused unless given their neutral value: ignoring them would answer
# something other than what was asked (None is always neutral).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},),
    "best_of": (1,), "min_tokens": (0,), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "response_format": ({"type": "text"},),
}  # fmt: skip


def _unicode(text: str) -> str:
    """`text` if it is valid Unicode; JSON can escape a lone surrogate (`"\\ud800"`), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Params(BaseModel):
    """Fields shared by both APIs. Types are strict (`"0.5"` is not a temperature, `5.0` not a token count);
    unknown fields are ignored, as OpenAI-compatible servers do, except the ones in _NEUTRAL."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    ignore_eos: bool = False

    def unsupported(self) -> str | None:
        """The first parameter given a value this engine cannot honour, if any."""
        extra = self.model_extra or {}
        return next((k for k, ok in _NEUTRAL.items() if extra.get(k) is not None and extra[k] not in ok), None)


class Message(BaseModel):
    """One chat message, text only: this engine has no tools, images or audio, so a message that needs them is
    refused rather than rendered without them. Content parts are joined with newlines, as vLLM does for text
    models."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> Any:
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise ValueError('content parts must be text parts ({"type": "text", "text": "..."})')
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError("content must be a string or a list of text parts")
        return _unicode(content)

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: `developer` is OpenAI's newer name for `system`."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(_Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Params):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


@dataclass
class _Job:
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


class AsyncEngine:
    """Owns the engine in one thread: admits submitted sequences between steps, reports progress per step."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[_Job] = []
        self._aborts: list[Sequence] = []
        self._jobs: dict[int, _Job] = {}
        self._sent: dict[int, int] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="detaudit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> asyncio.Queue:
        with self._lock:
            if len(self._incoming) + len(self.engine.scheduler.waiting) >= self.max_queue:
                raise ApiError(503, "the server is overloaded; retry later", type_="server_error", code="overloaded")
            job = _Job(seq, asyncio.get_running_loop(), asyncio.Queue())
            self._incoming.append(job)
        self._wake.set()
        return job.events

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (waiting, running, or not yet admitted); idempotent."""
        with self._lock:
            self._aborts.append(seq)
        self._wake.set()

    def load(self) -> dict[str, int]:
        """Sequences running and waiting (for /health): how an operator sees that aborted requests are gone."""
        with self._lock:
            incoming = len(self._incoming)
        return {"running": len(self.engine.scheduler.running), "waiting": len(self.engine.scheduler.waiting) + incoming}

    def _emit(self, job: _Job, event: tuple) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
            for job in incoming:
                try:
                    self.engine.add(job.seq)
                except UsageError as e:  # the handler checks first; the engine's own refusal stays this request's
                    self._emit(job, ("error", ApiError(400, str(e))))
                    continue
                except Exception as e:  # never let one request kill the engine thread
                    self._emit(job, ("error", ApiError(500, f"cannot admit: {e}", type_="server_error")))
                    continue
                self._jobs[job.seq.seq_id] = job
                self._sent[job.seq.seq_id] = 0
            for seq in aborts:
                if seq.seq_id in self._jobs:
                    self.engine.scheduler.abort(seq)
                    self._forget(seq)
            if not self.engine.scheduler.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                finished = self.engine.step()
            except StepError as e:  # the engine found which requests raise: only they fail, the others go on
                print(f"detaudit serve: {e} ({len(e.failed)} request(s) failed)", file=sys.stderr, flush=True)
                for seq in e.failed:
                    if seq.seq_id in self._jobs:
                        self._emit(self._jobs[seq.seq_id], ("error", ApiError(500, str(e), type_="server_error")))
                        self._forget(seq)
                finished = e.finished
            except Exception as e:  # outside the forward: nothing says which request, so fail those in flight
                print(f"detaudit serve: engine step failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for job in list(self._jobs.values()):
                    self.engine.scheduler.abort(job.seq)
                    self._emit(job, ("error", ApiError(500, f"engine step failed: {type(e).__name__}: {e}",
                                                       type_="server_error")))  # fmt: skip
                    self._forget(job.seq)
                continue
            for seq_id, job in list(self._jobs.items()):
                n = len(job.seq.output_ids)
                if n > self._sent[seq_id]:
                    self._sent[seq_id] = n
                    self._emit(job, ("tokens", n))
            for seq in finished:
                if seq.seq_id in self._jobs:
                    self._emit(self._jobs[seq.seq_id], ("done", len(seq.output_ids)))
                    self._forget(seq)
        for job in self._jobs.values():
            self._emit(job, ("error", ApiError(503, "the server is shutting down", type_="server_error")))

    def _forget(self, seq: Sequence) -> None:
        self._jobs.pop(seq.seq_id, None)
        self._sent.pop(seq.seq_id, None)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


class _Output:
    """Turns a growing sequence into text and per-token records, honouring stop strings."""

    def __init__(self, engine: Engine, seq: Sequence, stops: list[str], as_ids: bool) -> None:
        self.engine, self.seq, self.stops, self.as_ids = engine, seq, stops, as_ids
        self.n_tokens = 0  # tokens released so far
        self.text = ""  # text released so far
        self.finish_reason: str | None = None

    def advance(self, n: int, done: bool) -> tuple[str, list[int]]:
        """Release tokens up to n: returns (new text, new token positions); sets finish_reason when over."""
        ids = self.seq.output_ids[:n]
        full = self.engine.decode(ids)
        hits = [(full.find(s), s) for s in self.stops if s in full]
        if hits:
            cut, stop = min(hits)
            n = self.n_tokens  # keep the tokens up to the one that completed the stop string, drop the rest
            while stop not in self.engine.decode(ids[:n]):
                n += 1
            full, done, self.finish_reason = full[:cut], True, "stop"
        if done:
            self.finish_reason = self.finish_reason or self.seq.finish_reason or "length"
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                hold = max(hold, len(full) - len(full.rstrip("\ufffd")))
            full = full[: max(len(self.text), len(full) - hold)]
        new_text, self.text = full[len(self.text) :], full
        positions = list(range(self.n_tokens, n))
        self.n_tokens = n
        return new_text, positions

    def token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.engine.token_str(token_id)

    def chat_logprobs(self, positions: list[int], k: int) -> dict[str, Any]:
        s = self.seq
        return {
            "content": [
                {
                    "token": self.token(s.output_ids[i]),
                    "logprob": s.logprobs[i],
                    "bytes": list(self.engine.token_bytes(s.output_ids[i])),
                    "top_logprobs": [
                        {"token": self.token(t), "logprob": lp, "bytes": list(self.engine.token_bytes(t))}
                        for t, lp in zip(s.top_ids[i][:k], s.top_logprobs[i][:k], strict=True)
                    ],
                }
                for i in positions
            ]
        }

    def completion_logprobs(self, positions: list[int], k: int) -> dict[str, Any]:
        s = self.seq
        return {
            "tokens": [self.token(s.output_ids[i]) for i in positions],
            "token_logprobs": [s.logprobs[i] for i in positions],
            "top_logprobs": [
                {self.token(t): lp for t, lp in zip(s.top_ids[i][:k], s.top_logprobs[i][:k], strict=True)}
                for i in positions
            ],
            "text_offset": [],
        }


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed its connection. The body has been read by then, so the next ASGI message
    for this request is http.disconnect (uvicorn sends it when the socket closes or the answer is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected after the body; never spin on it


def create_app(engine: Engine, *, model_name: str, max_queue: int = 1024) -> FastAPI:
    """The ASGI app serving `model_name` from `engine`."""
    core = AsyncEngine(engine, max_queue)
    fingerprint = f"detaudit-engine-{engine.cfg.kernels}-{engine.cfg.dtype}-{engine.cfg.device}"

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        core.start()
        yield
        core.stop()
        print("detaudit serve: engine stopped, shut down cleanly", file=sys.stderr, flush=True)

    app = FastAPI(title="detaudit serve", lifespan=lifespan)

    # Every answer but a success is OpenAI's error JSON, whatever raised: clients parse `error.message`.
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error", "")
            return ApiError(400, f"the body is not valid JSON: {why}").response()
        # pydantic names the member of a union it tried (`stop.str`): the client named only the field
        param = ".".join(str(p) for p in first["loc"][1:] if not _UNION_MEMBER.fullmatch(str(p))) or None
        return ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:  # uvicorn still logs the traceback
        return ApiError(500, f"internal server error ({type(exc).__name__})", type_="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **core.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "detaudit",
                "max_model_len": engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    def admit(req: _Params, prompt_ids: list[int], prompt_param: str, k: int | None) -> SamplingParams:
        """The request's sampling parameters, or a 400 for anything the engine could not run: the prompt must leave
        room for at least one token, and an explicit max_tokens must fit the room left."""
        if req.model != model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{model_name}`",
                           param="model", code="model_not_found")  # fmt: skip
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported; send N separate requests", param="n")
        if bad := req.unsupported():
            raise ApiError(400, f"{bad} is not supported by this engine", param=bad)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty: it tokenizes to no tokens", param=prompt_param)
        if not all(0 <= t < engine.spec.vocab_size for t in prompt_ids):
            raise ApiError(400, "prompt token id out of the vocabulary", param=prompt_param)
        limit, n = engine.max_model_len, len(prompt_ids)
        room = limit - n
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens and the prompt has {n}: no "
                           "room is left to generate", param=prompt_param, code="context_length_exceeded")  # fmt: skip
        field, asked = "max_tokens", req.max_tokens
        if (completion_tokens := getattr(req, "max_completion_tokens", None)) is not None:  # chat's newer name wins
            field, asked = "max_completion_tokens", completion_tokens
        if asked is not None and asked > room:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n}, so "
                           f"{field} may be at most {room}, not {asked}", param=field,
                           code="context_length_exceeded")  # fmt: skip
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return SamplingParams(max_tokens=asked or room, temperature=req.temperature, top_p=req.top_p, seed=seed,
                              top_logprobs=k or 0, ignore_eos=req.ignore_eos)  # fmt: skip

    async def generate(request: Request, req: _Params, prompt_ids: list[int], chat: bool, k: int | None):
        stops = _stops(req.stop)
        params = admit(req, prompt_ids, "messages" if chat else "prompt", k)
        seq = Sequence(prompt_ids, params)
        out = _Output(engine, seq, stops, req.return_tokens_as_token_ids)
        events = core.submit(seq)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        head = {"id": rid, "created": created, "model": model_name, "system_fingerprint": fingerprint}

        # A client that leaves aborts its sequence at once (its blocks and seat go to waiting requests) and wakes
        # the handler, streamed or not; the watcher is cancelled once the answer is complete.
        def gone(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None:
                core.abort(seq)
                events.put_nowait(("gone", None))

        watcher = asyncio.ensure_future(_client_gone(request))
        watcher.add_done_callback(gone)

        async def next_event() -> tuple[str, list[int], bool]:
            kind, n = await events.get()
            if kind == "error":
                raise n
            if kind == "gone":
                raise _ClientGone
            new_text, positions = out.advance(n, kind == "done")
            if out.finish_reason and kind != "done":
                core.abort(seq)
            return new_text, positions, out.finish_reason is not None

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": out.n_tokens,
                    "total_tokens": len(prompt_ids) + out.n_tokens}  # fmt: skip

        def logprobs(positions: list[int]) -> dict[str, Any] | None:
            if k is None:
                return None
            return out.chat_logprobs(positions, k) if chat else out.completion_logprobs(positions, k)

        if not req.stream:
            try:
                done = False
                while not done:
                    _, _, done = await next_event()
            except _ClientGone:  # nobody reads this answer; 499 is nginx's status for it
                return ApiError(499, "the client closed the connection", code="client_closed").response()
            finally:
                watcher.cancel()
                if not done:
                    core.abort(seq)
            every = list(range(out.n_tokens))
            choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason, "logprobs": logprobs(every)}
            if chat:
                choice["message"] = {"role": "assistant", "content": out.text}
            else:
                choice["text"] = out.text
            body = {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": usage()}  # fmt: skip
            if req.return_token_ids:
                choice["token_ids"] = seq.output_ids[: out.n_tokens]
                if chat:
                    body["prompt_token_ids"] = prompt_ids
                else:
                    choice["prompt_token_ids"] = prompt_ids
            return JSONResponse(body)

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str, positions: list[int], finish: str | None, first: bool) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs(positions)}
            if chat:
                choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            else:
                choice["text"] = text
            if req.return_token_ids:
                choice["token_ids"] = [seq.output_ids[i] for i in positions]
                if first:
                    choice["prompt_token_ids"] = prompt_ids
            return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

        async def stream() -> AsyncIterator[str]:
            first, done = True, False
            try:
                while not done:
                    text, positions, done = await next_event()
                    if text or positions or done:
                        yield chunk(text, positions, out.finish_reason if done else None, first)
                        first = False
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            except _ClientGone:
                return
            except Exception as e:  # the status line has gone out: the error becomes the stream's last event
                err = e if isinstance(e, ApiError) else ApiError(500, f"internal server error ({type(e).__name__})",
                                                                 type_="server_error")  # fmt: skip
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                watcher.cancel()
                if not done:
                    core.abort(seq)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:
            prompt_ids = engine.encode_chat([m.for_template() for m in req.messages])
        except UsageError as e:
            raise ApiError(400, str(e), param="messages") from None
        except (TemplateError, TypeError, KeyError, ValueError) as e:  # the template's checks: roles alternate, ...
            raise ApiError(400, f"cannot apply the chat template to these messages: {e}", param="messages") from None
        k = (req.top_logprobs or 0) if req.logprobs else None
        return await generate(request, req, prompt_ids, True, k)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompt = req.prompt
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                prompt_ids = engine.encode_text(_unicode(prompt))
            except ValueError as e:
                raise ApiError(400, f"invalid request: prompt: {e}", param="prompt") from None
        else:
            prompt_ids = list(prompt)
        return await generate(request, req, prompt_ids, False, req.logprobs)

    return app
