"""Property tests of the answer parser: whatever JSON a server sends, the parser returns a Completion whose every field
fits the samples table, or raises CallError with a reason from the vocabulary — never anything else.

Inputs: random JSON values (hypothesis `recursive`), and valid chat/completions answers and stream chunks (the
scripted server's own builder, with logprobs, top-2 alternatives and ids) with random fields replaced or removed.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import orjson
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_server import _Answer, _Token

from detaudit.audit.answers import StreamParser, parse_answer
from detaudit.audit.completion import CallError, Completion
from detaudit.rundir.io import rows_to_table
from detaudit.rundir.schema import SAMPLE_COLUMNS

# Every field path a malformed:<field> reason may name (the schema's fields, dotted, without list indices).
FIELDS = {
    "json",
    "model",
    "system_fingerprint",
    "usage",
    "usage.prompt_tokens",
    "usage.completion_tokens",
    "choices",
    "choices.index",
    "choices.finish_reason",
    "choices.token_ids",
    "choices.text",
    "choices.message",
    "choices.message.content",
    "choices.message.refusal",
    "choices.message.tool_calls",
    "choices.delta",
    "choices.delta.content",
    "choices.delta.refusal",
    "choices.delta.tool_calls",
    "choices.logprobs",
    "choices.logprobs.content",
    "choices.logprobs.content.token",
    "choices.logprobs.content.logprob",
    "choices.logprobs.content.bytes",
    "choices.logprobs.content.top_logprobs",
    "choices.logprobs.content.top_logprobs.token",
    "choices.logprobs.content.top_logprobs.logprob",
    "choices.logprobs.tokens",
    "choices.logprobs.token_logprobs",
    "choices.logprobs.top_logprobs",
}
REASONS = re.compile(
    r"not_openai|server_error|no_content|refusal|tool_calls|empty_stream|truncated_stream|"
    r"choice_index|malformed:(?P<field>.+)"
)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_INT32 = 2**31 - 1
_FLOAT32_MAX = 3.4028234663852886e38

# Strings with lone surrogates (json.dumps writes them as \ud800 escapes), control characters and the vLLM prefix.
texts = st.one_of(
    st.text(st.characters(categories=["L", "N", "Cc", "Cs", "Zs"]), max_size=6),
    st.sampled_from(["token_id:5", "token_id:99999999999", "token_id:x", "stop", ""]),
)
numbers = st.one_of(st.integers(), st.integers(-3, 300), st.floats(allow_nan=False), st.sampled_from([1e39, -1e39]))
# Keys are often the answer's own field names, so random values land where the parser looks.
keys = st.one_of(
    texts,
    st.sampled_from(
        [
            "choices",
            "index",
            "message",
            "delta",
            "content",
            "refusal",
            "tool_calls",
            "text",
            "finish_reason",
            "token_ids",
            "logprobs",
            "token",
            "logprob",
            "bytes",
            "top_logprobs",
            "tokens",
            "token_logprobs",
            "usage",
            "prompt_tokens",
            "model",
            "system_fingerprint",
            "error",
        ]
    ),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=16,
)
# Random values in the outline of an answer: choices of random fields, random head fields.
answer_shapes = st.fixed_dictionaries(
    {"choices": st.lists(st.dictionaries(keys, json_values, max_size=6), max_size=3)},
    optional={"model": json_values, "system_fingerprint": json_values, "usage": json_values, "error": json_values},
)

_TOKENS = [_Token(f" t{i}", 1000 + i, list(f" t{i}".encode()), None) for i in range(4)]


def _answers(api: str, as_ids: bool) -> _Answer:
    return _Answer(api, "m", _TOKENS, "stop", True, 2, as_ids, True, "fp")


def _paths(obj: Any, at: tuple = ()) -> list[tuple]:
    """Every place in `obj` a value sits (dict keys and list positions), the root excluded."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((*at, k))
        out.extend(_paths(v, (*at, k)))
    return out


# Wrong values a server might send in any field: ids past int32, bools, numbers as strings, NaN-free floats beyond
# float32, lone surrogates, vLLM id strings out of range, containers where scalars belong.
NASTY = [
    2**31,
    2**63,
    -1,
    1.5,
    1e39,
    True,
    "8",
    "",
    "\ud800",
    "token_id:2147483648",
    "token_id:5",
    None,
    [],
    {},
    [256],
    [-1],
    {"type": "stop"},
]
values = st.one_of(st.sampled_from(NASTY).map(copy.deepcopy), json_values)  # a fresh [] or {} each time


@st.composite
def mutated(draw: st.DrawFn, obj: Any) -> Any:
    """`obj` (JSON) with 1 to 3 of its values replaced by a wrong one, or removed. The field is drawn first (every
    field of the answer equally likely, whatever its number of entries), then one of its places."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        by_field: dict[str, list[tuple]] = {}
        for path in _paths(obj):
            by_field.setdefault(".".join(str(k) for k in path if not isinstance(k, int)), []).append(path)
        if not by_field:
            break
        path = draw(st.sampled_from(by_field[draw(st.sampled_from(sorted(by_field)))]))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(values)
    return obj


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: a lone surrogate goes on the wire as an escape


def _check(make) -> None:
    """`make()` returns a Completion of exactly the samples' types, or raises CallError with a known reason."""
    try:
        c = make()
    except CallError as e:
        m = REASONS.fullmatch(e.reason)
        assert m is not None, e.reason
        assert m["field"] is None or m["field"] in FIELDS, e.reason
        assert "\n" not in str(e) and str(e).encode("utf-8")  # one line, storable in the error column
        return
    assert isinstance(c, Completion)
    row = c.columns()
    for name, value in row.items():
        _check_type(name, value, SAMPLE_COLUMNS[name][0])
    rows_to_table([{"status": "ok", **row}])  # and Parquet's own conversion takes it


def _check_type(name: str, value: Any, typ: pa.DataType) -> None:
    if value is None:
        return
    if pa.types.is_list(typ):
        assert type(value) is list, (name, value)
        for v in value:
            _check_type(name, v, typ.value_type)
    elif pa.types.is_string(typ):
        assert type(value) is str, (name, value)
        value.encode("utf-8")
    elif pa.types.is_binary(typ):
        assert type(value) is bytes, (name, value)
    elif pa.types.is_int32(typ):
        assert type(value) is int and -(2**31) <= value <= _INT32, (name, value)
    elif pa.types.is_float32(typ):
        assert type(value) is float and (math.isnan(value) or abs(value) <= _FLOAT32_MAX), (name, value)
    else:
        raise AssertionError(f"{name}: unexpected column type {typ}")


def _stream(api: str, lines: list[bytes]) -> Completion:
    parser = StreamParser(api)
    for line in lines:
        if parser.line(line):
            break
    return parser.result()


@SETTINGS
@given(value=st.one_of(json_values, answer_shapes), api=st.sampled_from(["chat", "completions"]))
def test_random_json_whole_or_as_one_stream_event(value, api) -> None:
    _check(lambda: parse_answer(_dumps(value), api))
    _check(lambda: _stream(api, [b"data: " + _dumps(value), b"data: [DONE]"]))


@SETTINGS
@given(data=st.data(), api=st.sampled_from(["chat", "completions"]), as_ids=st.booleans())
def test_mutated_whole_answers(data, api, as_ids) -> None:
    answer = _answers(api, as_ids).full()
    _check(lambda: parse_answer(_dumps(answer), api))  # the unmutated answer parses
    _check(lambda: parse_answer(_dumps(data.draw(mutated(answer))), api))


@SETTINGS
@given(data=st.data(), api=st.sampled_from(["chat", "completions"]), as_ids=st.booleans())
def test_mutated_stream_chunks(data, api, as_ids) -> None:
    ans = _answers(api, as_ids)
    chunks = [ans.chunk(i, i == len(_TOKENS) - 1) for i in range(len(_TOKENS))] + [ans.usage_chunk()]
    bad = data.draw(st.integers(0, len(chunks) - 1))
    chunks[bad] = data.draw(mutated(chunks[bad]))
    lines = [b"data: " + _dumps(c) for c in chunks]
    if data.draw(st.booleans()):
        lines.append(b"data: [DONE]")
    _check(lambda: _stream(api, lines))


def test_unmutated_answers_parse_whole_and_streamed() -> None:
    """The property tests' starting points are valid: they exercise the parser's success path too."""
    for api in ("chat", "completions"):
        for as_ids in (False, True):
            ans = _answers(api, as_ids)
            whole = parse_answer(orjson.dumps(ans.full()), api)
            lines = [b"data: " + orjson.dumps(ans.chunk(i, i == 3)) for i in range(4)] + [b"data: [DONE]"]
            assert _stream(api, lines).columns() == {
                **whole.columns(),
                "prompt_tokens": None,
                "completion_tokens": None,
            }
            assert whole.token_ids == [1000, 1001, 1002, 1003] and len(whole.top_logprobs[0]) == 2


@SETTINGS
@given(raw=st.binary(max_size=64), api=st.sampled_from(["chat", "completions"]))
def test_random_bytes(raw, api) -> None:
    _check(lambda: parse_answer(raw, api))
    _check(lambda: _stream(api, [b"data: " + raw, b"data: [DONE]"]))


def test_deep_nesting_and_huge_numbers_anywhere() -> None:
    """What the random draws are too small to reach: nesting near and past the JSON parsers' limits, in a field
    that is printed (the error message) and in one that is ignored; numbers of thousands of digits."""
    hole = '"@"'  # where the raw JSON text goes
    ok_choice = {"index": 0, "message": {"content": "x"}, "text": "x"}
    shapes = [
        {"error": "@"},
        {"error": {"message": "@"}},
        {"choices": [ok_choice], "x": "@"},
        {"choices": [{"index": 0, "message": {"content": None, "tool_calls": "@"}}]},
        {"choices": [{**ok_choice, "index": "@"}]},
        {"choices": [{**ok_choice, "token_ids": ["@"]}]},
        {"choices": [ok_choice], "usage": {"prompt_tokens": "@"}},
    ]
    nested = ["[" * depth + "]" * depth for depth in (150, 250, 1000, 1030, 5000)]
    numbers = ["9" * 30, "9" * 5000, "-" + "9" * 400, "1e400"]
    for shape in shapes:
        for text in nested + numbers:
            body = json.dumps(shape).replace(hole, text).encode()
            for api in ("chat", "completions"):
                _check(lambda: parse_answer(body, api))  # noqa: B023 (called at once)
                _check(lambda: _stream(api, [b"data: " + body, b"data: [DONE]"]))  # noqa: B023
    for digits in numbers[:2] + ["0" * 30 + "5"]:
        lp = {"tokens": [f"token_id:{digits}"], "token_logprobs": [-1.0]}
        _check(lambda: parse_answer(_dumps({"choices": [{**ok_choice, "logprobs": lp}]}), "completions"))  # noqa: B023


def test_every_field_with_every_wrong_value() -> None:
    """Exhaustive beside the random draws: each field of each answer shape (its first place), set to each wrong
    value or removed, whole and in a stream chunk."""
    tried = 0
    for api in ("chat", "completions"):
        for as_ids in (False, True):
            ans = _answers(api, as_ids)
            chunks = [ans.chunk(i, i == 3) for i in range(4)] + [ans.usage_chunk()]
            for target in ("whole", 1, 4):
                obj = ans.full() if target == "whole" else chunks[target]
                first: dict[str, tuple] = {}
                for path in _paths(obj):
                    first.setdefault(".".join(str(k) for k in path if not isinstance(k, int)), path)
                for path in first.values():
                    for value in [*NASTY, "<removed>"]:
                        bad = json.loads(json.dumps(obj))
                        parent = bad
                        for k in path[:-1]:
                            parent = parent[k]
                        if value == "<removed>":
                            if not isinstance(parent, dict):
                                continue
                            del parent[path[-1]]
                        else:
                            parent[path[-1]] = copy.deepcopy(value)
                        if target == "whole":
                            _check(lambda: parse_answer(_dumps(bad), api))  # noqa: B023 (called at once)
                        else:
                            lines = [b"data: " + _dumps(bad if i == target else c) for i, c in enumerate(chunks)]
                            _check(lambda: _stream(api, [*lines, b"data: [DONE]"]))  # noqa: B023
                        tried += 1
    assert tried > 2000
