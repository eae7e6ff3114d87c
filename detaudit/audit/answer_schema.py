"""The strict typed schema of an OpenAI answer: what each field of a whole answer or a stream chunk may hold.

A number is an int or a float (never a bool or a string), a string is a string, and the bounds are those of the
samples columns: ids and counts in int32, logprobs finite and within float32, bytes 0..255. Fields detaudit does
not record are not checked. `validate` turns the first field that does not fit into a CallError naming it
(`malformed:choices.logprobs.content.bytes`).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from detaudit.audit.completion import Api, malformed

INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38

_Logprob = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]
_Id = Annotated[int, Field(ge=0, le=INT32_MAX)]
_Byte = Annotated[int, Field(ge=0, le=255)]
_STRICT = ConfigDict(strict=True)


_T = TypeVar("_T")
# A list validated up to its first bad entry: an 8 MiB answer of bad entries would otherwise cost seconds of
# event-loop time collecting every error, of which only the first is reported.
_List = Annotated[list[_T], Field(fail_fast=True)]


@with_config(_STRICT)
class _PromptDetails(TypedDict):
    cached_tokens: NotRequired[_Id | None]  # prompt tokens served from the prefix cache (OpenAI, vLLM, SGLang)


@with_config(_STRICT)
class _Usage(TypedDict):
    prompt_tokens: NotRequired[_Id | None]
    completion_tokens: NotRequired[_Id | None]
    prompt_tokens_details: NotRequired[_PromptDetails | None]


@with_config(_STRICT)
class _ChatTop(TypedDict):
    token: str
    id: NotRequired[_Id | None]  # llama-server gives every entry its token id
    logprob: NotRequired[_Logprob | None]


@with_config(_STRICT)
class _ChatEntry(TypedDict):
    token: str
    id: NotRequired[_Id | None]
    logprob: NotRequired[_Logprob | None]
    bytes: NotRequired[_List[_Byte] | None]
    top_logprobs: NotRequired[_List[_ChatTop] | None]


@with_config(_STRICT)
class _Logprobs(TypedDict):
    """Either shape on either API: servers do not keep to one per API (llama-server answers /v1/completions with
    the chat shape, `content` entries), so both are read wherever they come."""

    content: NotRequired[_List[_ChatEntry] | None]  # the chat shape
    tokens: NotRequired[_List[str] | None]  # the legacy completions shape: parallel lists
    token_logprobs: NotRequired[_List[_Logprob | None] | None]
    # token -> logprob; the values are checked by _top_rows (a dict cannot stop at its first bad entry)
    top_logprobs: NotRequired[_List[dict[str, Any] | None] | None]


@with_config(_STRICT)
class _Message(TypedDict):
    content: NotRequired[str | None]
    refusal: NotRequired[str | None]
    tool_calls: NotRequired[_List[Any] | None]
    function_call: NotRequired[Any]


@with_config(_STRICT)
class _ChatChoice(TypedDict):
    index: NotRequired[int]
    message: _Message
    logprobs: NotRequired[_Logprobs | None]
    finish_reason: NotRequired[str | None]
    token_ids: NotRequired[_List[_Id] | None]


@with_config(_STRICT)
class _ChatChunkChoice(TypedDict):
    index: NotRequired[int]
    delta: NotRequired[_Message | None]
    logprobs: NotRequired[_Logprobs | None]
    finish_reason: NotRequired[str | None]
    token_ids: NotRequired[_List[_Id] | None]


@with_config(_STRICT)
class _ComplChoice(TypedDict):
    index: NotRequired[int]
    text: NotRequired[str | None]
    logprobs: NotRequired[_Logprobs | None]
    finish_reason: NotRequired[str | None]
    token_ids: NotRequired[_List[_Id] | None]


@with_config(_STRICT)
class _ChatAnswer(TypedDict):
    model: NotRequired[str | None]
    system_fingerprint: NotRequired[str | None]
    usage: NotRequired[_Usage | None]
    choices: _List[_ChatChoice]


@with_config(_STRICT)
class _ChatChunk(TypedDict):
    error: NotRequired[Any]  # an error event that also carries choices
    model: NotRequired[str | None]
    system_fingerprint: NotRequired[str | None]
    usage: NotRequired[_Usage | None]
    choices: _List[_ChatChunkChoice]


@with_config(_STRICT)
class _ComplAnswer(TypedDict):
    error: NotRequired[Any]  # an error event that also carries choices (streams)
    model: NotRequired[str | None]
    system_fingerprint: NotRequired[str | None]
    usage: NotRequired[_Usage | None]
    choices: _List[_ComplChoice]


# (api, streamed) -> the validator of one whole answer or one stream chunk
SCHEMAS: dict[tuple[str, bool], TypeAdapter[Any]] = {
    ("chat", False): TypeAdapter(_ChatAnswer),
    ("chat", True): TypeAdapter(_ChatChunk),
    ("completions", False): TypeAdapter(_ComplAnswer),
    ("completions", True): TypeAdapter(_ComplAnswer),
}


def validate(api: Api, streamed: bool, obj: dict[str, Any]) -> dict[str, Any]:
    """The answer as checked by its schema, or a CallError naming the first bad field (dotted, no list indices)."""
    try:
        return SCHEMAS[api, streamed].validate_python(obj)
    except ValidationError as e:
        first = e.errors(include_url=False, include_context=False, include_input=False)[0]
        raise malformed(_field_path(first["loc"]), first["msg"]) from None


def _field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the reason's field: dotted, list positions left out."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            continue
        parts.append(p)
        if parts == ["choices", "logprobs", "top_logprobs"]:
            break  # what follows is a completions top_logprobs key: a token, not a field
    return ".".join(parts)
