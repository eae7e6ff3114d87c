"""The OpenAI request bodies `detaudit serve` accepts, and the error shape of every answer that is not a success.

Types are strict and everything the engine could not honour is refused here, before a sequence exists: a request
that shares a step with others must never be able to fail it (docs/engine.md, "Admission and cancellation").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# How pydantic names the member of a union it tried in an error's location (`stop.str`, `prompt.list[int]`).
_UNION_MEMBER = re.compile(r"(str|int|float|bool|list|dict)(\[.*\])?")

# Parameters this engine does not implement, refused unless given their neutral value: ignoring them would answer
# something other than what was asked (None is always neutral).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},),
    "best_of": (1,), "min_tokens": (0,), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "response_format": ({"type": "text"},),
}  # fmt: skip


def unicode_text(text: str) -> str:
    """`text` if it is valid Unicode; JSON can escape a lone surrogate (`"\\ud800"`), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Params(BaseModel):
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
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ValueError('content parts must be text parts ({"type": "text", "text": "..."})')
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError("content must be a string or a list of text parts")
        return unicode_text(content)

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: `developer` is OpenAI's newer name for `system`."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(Params):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Params):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def one_prompt(self) -> str | list[int]:
        """The prompt as text or as token ids; a list of strings must hold exactly one."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        texts = [p for p in prompt if isinstance(p, str)]
        if len(texts) == len(prompt):  # a list of strings (or an empty list)
            if len(texts) != 1:
                raise ApiError(400, "send one prompt per request", param="prompt")
            return texts[0]
        return [p for p in prompt if isinstance(p, int)]


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 for the first error pydantic found in a body, naming the field as the client named it."""
    first: Mapping[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON: {why}")
    # pydantic names the member of a union it tried (`stop.str`): the client named only the field
    param = ".".join(str(p) for p in first["loc"][1:] if not _UNION_MEMBER.fullmatch(str(p))) or None
    return ApiError(400, f"invalid request: {param or 'body'}: {first['msg']}", param=param)
