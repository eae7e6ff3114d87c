"""Cache arms (`detaudit run --cache cold,warm`): what makes an endpoint's prefix cache cold or warm for a request.

Every production server caches prompt prefixes by default, and a cached prefix is computed by other kernel calls
than a fresh one (a shorter prefill over the uncached suffix), so the same prompt can answer differently cold and
warm. A cache arm asks for one state and the answers' `usage.prompt_tokens_details.cached_tokens` prove (or not)
that it got it (analysis/cache_evidence.py).

- **cold**: each request gets its own `cache_salt` (vLLM: a salt isolates the request's cache entries) when the
  capability probe saw the endpoint honour it; else, when the probe saw `POST /reset_prefix_cache` empty the cache
  (vLLM's dev route, `detaudit serve`), that is sent before each cold request (race-free at concurrency 1 only: a
  request of a loaded arm may still find what another one cached since, which its cached_tokens then show);
  otherwise a unique nonce line is put before the prompt, so no prefix of it was ever seen. The nonce is a hash
  of the run id and the sample index; it is never part of the prompt the run records (prompt ids, texts and
  `content_key` stay those of the prompt), but it does change what the model reads, which the verdict reason says.
- **warm**: before the arm's first request, the same request body is sent once per prompt with `max_tokens` 1 and
  its answer dropped (not recorded); with a honoured salt the warm arm uses one salt of its own, so only that
  warm-up (and the arm's own requests) warmed it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

from detaudit.rundir.schema import ArmSpec

CacheState = Literal["cold", "warm"]
CACHE_STATES: tuple[CacheState, ...] = ("cold", "warm")
NONCE_LINE = "[detaudit nonce {nonce}]\n"
# A prompt that begins with a nonce line; group 1 is the prompt as recorded.
NONCE_PATTERN = re.compile(r"\[detaudit nonce [0-9a-f]{16}\]\n(.*)", re.S)
WARMUP_MAX_TOKENS = 1


def arm_specs(concurrency: list[int], cache: list[CacheState]) -> list[ArmSpec]:
    """The arms of a run: one per concurrency (`c1`, `c64`), or with cache states one per concurrency and state, in
    that order (`c1-cold`, `c1-warm`, `c64-cold`, `c64-warm`)."""
    if not cache:
        return [ArmSpec(name=f"c{c}", concurrency=c) for c in concurrency]
    return [ArmSpec(name=f"c{c}-{s}", concurrency=c, cache=s) for c in concurrency for s in cache]


def nonce(run_id: str, sample_index: int) -> str:
    """The cold nonce of one sample: 16 hex digits of sha256(run id, sample index), reproducible from the run."""
    return hashlib.sha256(f"{run_id}:{sample_index}".encode()).hexdigest()[:16]


def cold_body(body: dict[str, Any], api: str, run_id: str, sample_index: int, method: str) -> dict[str, Any]:
    """The request body of one cold sample: its own cache_salt (method "cache_salt"), the body as it is (method
    "reset": the cache is emptied before it is sent), or a nonce line before the prompt (method "nonce": the first
    chat message, or the completions prompt)."""
    key = nonce(run_id, sample_index)
    if method == "reset":
        return body
    if method == "cache_salt":
        return {**body, "cache_salt": f"detaudit-cold-{key}"}
    line = NONCE_LINE.format(nonce=key)
    if api == "chat":
        first, *rest = body["messages"]
        return {**body, "messages": [{**first, "content": line + first["content"]}, *rest]}
    return {**body, "prompt": line + body["prompt"]}


def warm_salt(run_id: str) -> str:
    """The salt every request of the run's warm arms shares (when the endpoint honours salts)."""
    return f"detaudit-warm-{run_id}"


def warmup_body(body: dict[str, Any]) -> dict[str, Any]:
    """The unrecorded request that warms the cache for `body`: the same prompt, one token, not streamed."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["max_tokens"] = WARMUP_MAX_TOKENS
    return out
