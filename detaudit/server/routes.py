"""The FastAPI app of `detaudit serve`: routes, admission into the engine, whole and streamed answers, and what
happens when a client leaves (its sequence is aborted at once)."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from detaudit.engine.llm import Engine
from detaudit.engine.sequence import SamplingParams, Sequence
from detaudit.errors import UsageError
from detaudit.server.engine_thread import AsyncEngine
from detaudit.server.output import Output
from detaudit.server.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Params,
    invalid_request,
    stop_strings,
    unicode_text,
)


class _ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


async def _client_gone(request: Request) -> None:
    """Returns once the client has closed its connection. The body has been read by then, so the next ASGI message
    for this request is http.disconnect (uvicorn sends it when the socket closes or the answer is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected after the body; never spin on it


class _Served:
    """The engine the routes serve from, and its thread; emptied when the app shuts down. FastAPI keeps route
    functions in a process-wide cache, so an engine their closures held directly would outlive its app: in a process
    that serves twice (`detaudit demo`, tests) the first engine's memory, and its pin on the kernel overrides, with
    it."""

    def __init__(self, engine: Engine, core: AsyncEngine) -> None:
        self.engine, self.core = engine, core

    def release(self) -> None:
        del self.engine, self.core


def create_app(engine: Engine, *, model_name: str, max_queue: int = 1024) -> FastAPI:
    """The ASGI app serving `model_name` from `engine`."""
    served = _Served(engine, AsyncEngine(engine, max_queue))
    fingerprint = f"detaudit-engine-{engine.cfg.kernels}-{engine.cfg.dtype}-{engine.cfg.device}"

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        served.core.start()
        yield
        served.core.stop()
        served.release()
        print("detaudit serve: engine stopped, shut down cleanly", file=sys.stderr, flush=True)

    app = FastAPI(title="detaudit serve", lifespan=lifespan)

    # Every answer but a success is OpenAI's error JSON, whatever raised: clients parse `error.message`.
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:  # uvicorn still logs the traceback
        return ApiError(500, f"internal server error ({type(exc).__name__})", type_="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **served.core.load()}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, Any]:
        """vLLM's route: forget every cached prefix, so the next requests are computed cold (`detaudit run --cache
        cold` sends it before each cold request when no cache_salt is honoured)."""
        await served.core.flush_prefix_cache()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "detaudit",
            "max_model_len": served.engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    def admit(req: Params, prompt_ids: list[int], prompt_param: str, k: int | None) -> SamplingParams:
        """The request's sampling parameters, or a 400 for anything the engine could not run: the prompt must leave
        room for at least one token, and an explicit max_tokens must fit the room left."""
        if req.model != model_name:
            raise ApiError(
                404,
                f"The model `{req.model}` does not exist; this server serves `{model_name}`",
                param="model",
                code="model_not_found",
            )
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported; send N separate requests", param="n")
        if bad := req.unsupported():
            raise ApiError(400, f"{bad} is not supported by this engine", param=bad)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty: it tokenizes to no tokens", param=prompt_param)
        if not all(0 <= t < served.engine.spec.vocab_size for t in prompt_ids):
            raise ApiError(400, "prompt token id out of the vocabulary", param=prompt_param)
        limit, n = served.engine.max_model_len, len(prompt_ids)
        room = limit - n
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens and the prompt has {n}: no "
                "room is left to generate",
                param=prompt_param,
                code="context_length_exceeded",
            )
        field, asked = "max_tokens", req.max_tokens
        if (completion_tokens := getattr(req, "max_completion_tokens", None)) is not None:  # chat's newer name wins
            field, asked = "max_completion_tokens", completion_tokens
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens; the prompt has {n}, so "
                f"{field} may be at most {room}, not {asked}",
                param=field,
                code="context_length_exceeded",
            )
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return SamplingParams(
            max_tokens=asked or room,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=seed,
            top_logprobs=k or 0,
            ignore_eos=req.ignore_eos,
        )

    async def generate(request: Request, req: Params, prompt_ids: list[int], chat: bool, k: int | None):
        stops = stop_strings(req.stop)
        params = admit(req, prompt_ids, "messages" if chat else "prompt", k)
        seq = Sequence(prompt_ids, params)
        out = Output(served.engine, seq, stops, req.return_tokens_as_token_ids)
        events = served.core.submit(seq)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        head = {"id": rid, "created": created, "model": model_name, "system_fingerprint": fingerprint}

        # A client that leaves aborts its sequence at once (its blocks and seat go to waiting requests) and wakes
        # the handler, streamed or not; the watcher is cancelled once the answer is complete.
        def gone(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None:
                served.core.abort(seq)
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
                served.core.abort(seq)
            return new_text, positions, out.finish_reason is not None

        def usage() -> dict[str, Any]:
            """OpenAI's usage, with the prompt tokens the prefix cache supplied (as vLLM and SGLang report them)."""
            return {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": out.n_tokens,
                "total_tokens": len(prompt_ids) + out.n_tokens,
                "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
            }

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
                    served.core.abort(seq)
            every = list(range(out.n_tokens))
            choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason, "logprobs": logprobs(every)}
            if chat:
                choice["message"] = {"role": "assistant", "content": out.text}
            else:
                choice["text"] = out.text
            body = {
                **head,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": usage(),
            }
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
                err = (
                    e
                    if isinstance(e, ApiError)
                    else ApiError(500, f"internal server error ({type(e).__name__})", type_="server_error")
                )
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                watcher.cancel()
                if not done:
                    served.core.abort(seq)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:
            prompt_ids = served.engine.encode_chat([m.for_template() for m in req.messages])
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
        prompt = req.one_prompt()
        if isinstance(prompt, str):
            try:
                prompt_ids = served.engine.encode_text(unicode_text(prompt))
            except ValueError as e:
                raise ApiError(400, f"invalid request: prompt: {e}", param="prompt") from None
        else:
            prompt_ids = prompt
        return await generate(request, req, prompt_ids, False, req.logprobs)

    return app
