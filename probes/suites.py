"""Probe suites: curated prompt sets, bundled (probes/bundled/*.yaml) or the user's own, loaded and validated.

A release gate on one prompt proves little, so `detaudit run --suite NAME|PATH` fires every entry of a suite as its
own prompt id. Suites are data files so that users can write their own in the same format:

YAML (a mapping; `prompts` is required, `name` and `description` are optional)::

    name: my-suite
    description: What this suite is for.
    prompts:
      - id: capital            # letters, digits, '.', '_' and '-'; unique within the suite
        rationale: Why this prompt is here.
        prompt: What is the capital of France?
        max_tokens: 16
      - id: chat
        messages: [{role: system, content: You are terse.}, {role: user, content: Hi}]
        max_tokens: 32

JSONL: one entry object per line with the same keys (`id`, `rationale`, `prompt` or `messages`, `max_tokens`).

Every problem is reported as a UsageError (exit 2) naming the file and the line, because a suite is usually
edited by hand and a silent fallback would audit something other than what the user wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detaudit.errors import UsageError
from detaudit.rundir.schema import PromptSpec
from detaudit.userfiles import read_user_file

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
SUITE_EXTENSIONS = (".yaml", ".yml", ".jsonl")
MAX_SUITE_FILE_BYTES = 64 * 2**20  # read whole into memory, like a prompt file
ENTRY_KEYS = ("id", "rationale", "prompt", "messages", "max_tokens")
TOP_KEYS = ("name", "description", "prompts")
MESSAGE_KEYS = ("role", "content")
ROLES = ("system", "user", "assistant")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
# Far above any model's context, low enough to catch a typo such as an extra digit group.
MAX_TOKENS_CAP = 1_000_000


@dataclass(frozen=True)
class Suite:
    """A validated suite: its name, where it came from and its prompts in file order."""

    name: str
    description: str
    source: str
    bundled: bool
    prompts: list[PromptSpec]

    @property
    def max_tokens_total(self) -> int:
        """Upper bound on generated tokens per repeat per arm (entries without max_tokens count as 0)."""
        return sum(p.max_tokens or 0 for p in self.prompts)


def bundled_names() -> list[str]:
    """Names of the suites shipped in probes/bundled/, sorted."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def bundled_suites() -> list[Suite]:
    """Every bundled suite, loaded and validated."""
    return [load_suite_file(BUNDLED_DIR / f"{n}.yaml", bundled=True) for n in bundled_names()]


def load_suite(name_or_path: str) -> Suite:
    """Resolve `--suite` the way the CLI does: a bundled name first, then a file path."""
    if name_or_path in bundled_names():
        return load_suite_file(BUNDLED_DIR / f"{name_or_path}.yaml", bundled=True)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load_suite_file(path)
    if path.exists():
        raise UsageError(f"suite {name_or_path}: not a file")
    if path.suffix in SUITE_EXTENSIONS or "/" in name_or_path:  # meant as a path: say it is missing
        raise UsageError(f"suite file {name_or_path} does not exist")
    raise UsageError(
        f"unknown suite {name_or_path!r}: bundled suites are {', '.join(bundled_names())}; "
        f"or give the path of a {'/'.join(SUITE_EXTENSIONS)} file"
    )


def load_suite_file(path: Path, *, bundled: bool = False) -> Suite:
    """Parse and validate one suite file (YAML or JSONL, chosen by extension)."""
    path = Path(path)
    if path.suffix.lower() not in SUITE_EXTENSIONS:
        raise UsageError(f"{path}: suite files end in {', '.join(SUITE_EXTENSIONS)}")
    try:
        text = read_user_file(path, MAX_SUITE_FILE_BYTES, "suite file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".jsonl":
        header: dict[str, tuple[Any, int]] = {}
        entries = _parse_jsonl(path, text)
    else:
        header, entries = _parse_yaml(path, text)
    if not entries:
        raise UsageError(f"{path}: the suite has no prompts")
    prompts: list[PromptSpec] = []
    seen: dict[str, int] = {}
    for fields, line in entries:
        spec = _validate_entry(path, fields, line)
        if spec.prompt_id in seen:
            raise UsageError(
                f"{path}:{line}: duplicate id {spec.prompt_id!r} (first used on line {seen[spec.prompt_id]})"
            )
        seen[spec.prompt_id] = line
        prompts.append(spec)
    name = _header_str(path, header, "name") or path.stem
    description = _header_str(path, header, "description") or ""
    return Suite(name=name, description=description, source=str(path), bundled=bundled, prompts=prompts)


def _header_str(path: Path, header: dict[str, tuple[Any, int]], key: str) -> str | None:
    if key not in header:
        return None
    value, line = header[key]
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{path}:{line}: '{key}' must be a non-empty string")
    return " ".join(value.split())


# An entry is {key: (value, line of the key)} plus the line where the entry starts.
Entry = tuple[dict[str, tuple[Any, int]], int]


def _parse_yaml(path: Path, text: str) -> tuple[dict[str, tuple[Any, int]], list[Entry]]:
    """Walk the composed node tree (not the loaded objects) so every key keeps its line number."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise UsageError(f"{path}: the file is empty")
        if isinstance(root, yaml.SequenceNode):
            header: dict[str, tuple[Any, int]] = {}
            items = root
        elif isinstance(root, yaml.MappingNode):
            header = _mapping(path, loader, root, TOP_KEYS, "suite")
            if "prompts" not in header:
                raise UsageError(f"{path}:{_line(root)}: missing 'prompts' (the list of entries)")
            items = _node_of(root, "prompts")
            if not isinstance(items, yaml.SequenceNode):
                raise UsageError(f"{path}:{_line(items)}: 'prompts' must be a list of entries")
        else:
            raise UsageError(f"{path}:{_line(root)}: a suite is a mapping with 'prompts', or a list of entries")
        entries: list[Entry] = []
        for item in items.value:
            if not isinstance(item, yaml.MappingNode):
                raise UsageError(f"{path}:{_line(item)}: each entry must be a mapping (id, prompt, max_tokens, ...)")
            entries.append((_mapping(path, loader, item, ENTRY_KEYS, "entry"), _line(item)))
        return header, entries
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML: {e}") from None
    except RecursionError:
        raise UsageError(f"{path}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _node_of(mapping: yaml.MappingNode, key: str) -> yaml.Node:
    return next(v for k, v in mapping.value if k.value == key)


def _mapping(
    path: Path, loader: yaml.SafeLoader, node: yaml.MappingNode, allowed: tuple[str, ...], what: str
) -> dict[str, tuple[Any, int]]:
    out: dict[str, tuple[Any, int]] = {}
    for key_node, value_node in node.value:
        line = _line(key_node)
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or key not in allowed:
            raise UsageError(f"{path}:{line}: unknown {what} key {key!r} (allowed: {', '.join(allowed)})")
        if key in out:
            raise UsageError(f"{path}:{line}: {what} key {key!r} given twice (first on line {out[key][1]})")
        out[key] = (loader.construct_object(value_node, deep=True), line)
    return out


def _parse_jsonl(path: Path, text: str) -> list[Entry]:
    entries: list[Entry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, object_pairs_hook=lambda pairs, n=lineno: _json_pairs(path, n, pairs))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise UsageError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}:{lineno}: each line must be one JSON object (an entry)")
        for key in obj:
            if key not in ENTRY_KEYS:
                raise UsageError(f"{path}:{lineno}: unknown entry key {key!r} (allowed: {', '.join(ENTRY_KEYS)})")
        entries.append(({k: (v, lineno) for k, v in obj.items()}, lineno))
    return entries


def _json_pairs(path: Path, lineno: int, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise UsageError(f"{path}:{lineno}: key {k!r} given twice")
        out[k] = v
    return out


def _validate_entry(path: Path, fields: dict[str, tuple[Any, int]], line: int) -> PromptSpec:
    def where(key: str) -> str:
        return f"{path}:{fields[key][1] if key in fields else line}"

    if "id" not in fields:
        raise UsageError(f"{path}:{line}: entry has no 'id'")
    pid = fields["id"][0]
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise UsageError(
            f"{where('id')}: bad id {pid!r}: use 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    has_prompt, has_messages = "prompt" in fields, "messages" in fields
    if has_prompt == has_messages:
        raise UsageError(f"{where('id')}: entry {pid!r} needs exactly one of 'prompt' or 'messages'")
    prompt = messages = None
    if has_prompt:
        prompt = fields["prompt"][0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where('prompt')}: entry {pid!r} has an empty prompt")
    else:
        messages = _validate_messages(where("messages"), pid, fields["messages"][0])
    max_tokens = None
    if "max_tokens" in fields:
        max_tokens = fields["max_tokens"][0]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_CAP:
            raise UsageError(
                f"{where('max_tokens')}: entry {pid!r} has bad max_tokens {max_tokens!r}: "
                f"use a whole number from 1 to {MAX_TOKENS_CAP}"
            )
    rationale = None
    if "rationale" in fields:
        rationale = fields["rationale"][0]
        if not isinstance(rationale, str) or not rationale.strip():
            raise UsageError(f"{where('rationale')}: entry {pid!r} has an empty rationale")
        rationale = " ".join(rationale.split())
    return PromptSpec(prompt_id=pid, prompt=prompt, messages=messages, max_tokens=max_tokens, rationale=rationale)


def _validate_messages(where: str, pid: str, messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: entry {pid!r}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != set(MESSAGE_KEYS):
            raise UsageError(f"{where}: entry {pid!r}: message {i} must have exactly the keys role and content")
        if m["role"] not in ROLES:
            raise UsageError(f"{where}: entry {pid!r}: message {i} has role {m['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise UsageError(f"{where}: entry {pid!r}: message {i} has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return out
