"""Managed engines: command construction for vLLM/SGLang presets, and the child-server lifecycle for real.

vLLM and SGLang cannot be installed here, so their presets are tested by the command line and environment they
produce. The lifecycle (start, health wait, stop, crash, port clash, interrupts, secret scrubbing) runs real child
processes: the scripted loopback server (tests/scripted_server.py) started as a command, and small Python scripts
that misbehave on purpose.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from detaudit.audit.launch import HOST, build_launch, redact_argv
from detaudit.audit.managed import file_log, managed_server, stash_log
from detaudit.errors import EndpointError, UsageError

SCRIPTED = Path(__file__).resolve().parent / "scripted_server.py"
PY = sys.executable


def test_vllm_preset_maps_batch_invariant_to_env_and_attention_backend() -> None:
    spec = build_launch("vllm", model="Qwen/Qwen3-8B", port=None, tensor_parallel_size=4, kernels="batch-invariant")
    assert spec.argv == [
        "vllm",
        "serve",
        "Qwen/Qwen3-8B",
        "--host",
        HOST,
        "--port",
        str(spec.port),
        "--tensor-parallel-size",
        "4",
        "--attention-backend",
        "FLASH_ATTN",
    ]
    assert spec.env == {"VLLM_BATCH_INVARIANT": "1"}
    assert spec.health_path == "/health" and spec.base_url == f"http://{HOST}:{spec.port}/v1"
    stock = build_launch("vllm", model="m", kernels="stock", engine_args="--max-num-seqs 64 --enable-prefix-caching")
    assert stock.env == {"VLLM_BATCH_INVARIANT": "0"}  # an inherited =1 must not turn the stock arm deterministic
    assert "--attention-backend" not in stock.argv
    assert stock.argv[-3:] == ["--max-num-seqs", "64", "--enable-prefix-caching"]
    assert stock.argv[stock.argv.index("--tensor-parallel-size") + 1] == "1"
    triton = build_launch("vllm", model="m", kernels="batch-invariant", attention_backend="TRITON_ATTN")
    assert triton.argv[-2:] == ["--attention-backend", "TRITON_ATTN"]
    auto = build_launch("vllm", model="m", kernels="batch-invariant", attention_backend="auto")
    assert "--attention-backend" not in auto.argv and auto.env == {"VLLM_BATCH_INVARIANT": "1"}


def test_sglang_preset_maps_batch_invariant_to_its_flag() -> None:
    spec = build_launch("sglang", model="/models/q", tensor_parallel_size=2, kernels="batch-invariant")
    assert spec.argv == [
        PY,
        "-m",
        "sglang.launch_server",
        "--model-path",
        "/models/q",
        "--host",
        HOST,
        "--port",
        str(spec.port),
        "--tp-size",
        "2",
        "--enable-deterministic-inference",
    ]
    assert spec.env == {}
    stock = build_launch("sglang", model="/models/q", attention_backend="fa3")
    assert "--enable-deterministic-inference" not in stock.argv and stock.argv[-2:] == ["--attention-backend", "fa3"]


def test_command_preset_substitutes_placeholders_and_records_without_secrets() -> None:
    spec = build_launch(
        "command",
        model="tiny",
        server_cmd="srv --model {model} --host {host} --port {port} --api-key sk-verysecret1 --hf-token=hf_abcdefgh",
        server_env=["MY_API_TOKEN=tok-123456789", "NCCL_ALGO=Tree"],
    )
    assert spec.argv[:7] == ["srv", "--model", "tiny", "--host", HOST, "--port", str(spec.port)]
    assert spec.health_path == "/v1/models"
    rec = spec.record()
    assert rec["command"][-3:] == ["--api-key", "***", "--hf-token=***"]
    assert "sk-verysecret1" not in str(rec) and "hf_abcdefgh" not in str(rec) and "tok-123456789" not in str(rec)
    assert rec["env_switches"] == {"MY_API_TOKEN": "***", "NCCL_ALGO": "Tree"}
    assert set(spec.secrets) >= {"sk-verysecret1", "hf_abcdefgh", "tok-123456789"}
    assert redact_argv(["x", "--password", "p", "--port", "1"]) == ["x", "--password", "***", "--port", "1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "command"}, "needs --server-cmd"),
        ({"engine": "command", "server_cmd": "srv --port 1", "port": None}, "must contain {port}"),
        ({"engine": "command", "server_cmd": "srv {port}", "kernels": "batch-invariant"}, "needs --engine vllm"),
        ({"engine": "command", "server_cmd": "srv {port}", "tensor_parallel_size": 2}, "applies to vllm/sglang"),
        ({"engine": "command", "server_cmd": "srv '{port}"}, "cannot split"),
        ({"engine": "vllm", "model": None}, "needs --model"),
        ({"engine": "vllm", "model": "m", "kernels": "fast"}, "--kernels 'fast'"),
        ({"engine": "sglang", "model": "m", "server_cmd": "x"}, "only for --engine command"),
        ({"engine": "tgi", "model": "m"}, "or one of vllm, sglang, command"),
        ({"engine": "vllm", "model": "m", "server_env": ["NOEQUALS"]}, "use NAME=VALUE"),
    ],
)
def test_bad_engine_options_are_usage_errors(kwargs: dict, message: str) -> None:
    engine = kwargs.pop("engine")
    kwargs.setdefault("model", "m")
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("(", r"\(")):
        build_launch(engine, **kwargs)


def test_port_in_use_is_refused_before_starting() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match=f"--port {port}: something already listens"):
            build_launch("command", model=None, port=port, server_cmd=f"{PY} {SCRIPTED} --port {{port}}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_health_stop_and_log(tmp_path: Path) -> None:
    spec = build_launch("command", model=None, server_cmd=f"{PY} {SCRIPTED} --port {{port}}")
    log = tmp_path / "server.log"
    with managed_server(spec, log, startup_timeout_s=60) as server:
        assert server.exited() is None and server.served_models == ["scripted-model"]
        pid = server.proc.pid
    assert server.exited() is not None and server.stopped_by_us and not _alive(pid)
    text = log.read_text()
    assert text.startswith("# detaudit: started ") and f"READY http://{HOST}:{spec.port}/v1" in text


def test_interrupt_inside_the_audit_stops_the_server(tmp_path: Path) -> None:
    spec = build_launch("command", model=None, server_cmd=f"{PY} {SCRIPTED} --port {{port}}")
    with pytest.raises(KeyboardInterrupt):
        with managed_server(spec, tmp_path / "log", startup_timeout_s=60) as server:
            pid = server.proc.pid
            raise KeyboardInterrupt
    assert not _alive(pid)


def test_startup_crash_is_exit_3_with_log_tail_and_scrubbed_secrets(tmp_path: Path) -> None:
    script = "import sys; print('loading', sys.argv[1:]); print('RuntimeError: CUDA out of memory'); sys.exit(7)"
    spec = build_launch("command", model=None, server_cmd=f'{PY} -c "{script}" {{port}} --api-key sk-secret-42xyz')
    log = tmp_path / "server.log"
    with pytest.raises(EndpointError) as exc:
        with managed_server(spec, log, startup_timeout_s=60):
            pytest.fail("should not become healthy")
    msg = str(exc.value)
    assert exc.value.exit_code == 3
    assert "exited with code 7 before it was ready" in msg and "RuntimeError: CUDA out of memory" in msg
    assert "sk-secret-42xyz" not in msg and "sk-secret-42xyz" not in log.read_text() and "***" in log.read_text()


def test_startup_timeout_stops_the_child(tmp_path: Path) -> None:
    hang = "import time; print('hang'); time.sleep(60)"
    spec = build_launch("command", model=None, server_cmd=f'{PY} -c "{hang}" {{port}}')
    with pytest.raises(EndpointError, match=r"not ready within 1 s"):
        with managed_server(spec, tmp_path / "log", startup_timeout_s=1):
            pytest.fail("should not become healthy")


def test_port_taken_between_check_and_bind_is_retried_on_a_new_port(tmp_path: Path) -> None:
    marker = tmp_path / "first-try-done"
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, sys, pathlib\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n"
        "    m.write_text('x'); print('OSError: [Errno 98] Address already in use', flush=True); sys.exit(1)\n"
        f"os.execv(sys.executable, [sys.executable, {str(SCRIPTED)!r}, '--port', sys.argv[1]])\n"
    )
    spec = build_launch("command", model=None, server_cmd=f"{PY} {script} {{port}}")
    with managed_server(spec, tmp_path / "log", startup_timeout_s=60) as server:
        assert server.served_models == ["scripted-model"] and server.spec.port != spec.port
    assert (tmp_path / "log").read_text().count("# detaudit: started") == 2


def test_log_is_filed_into_the_run_dir_or_next_to_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tmp = stash_log(out)
    tmp.write_text("first\n")
    assert file_log(tmp, out) == tmp_path / "run.server.log" and not tmp.exists()
    out.mkdir()
    tmp.write_text("a\n")
    assert file_log(tmp, out) == out / "server.log"
    tmp.write_text("b\n")
    file_log(tmp, out)
    assert (out / "server.log").read_text() == "a\nb\n"


@pytest.mark.parametrize("option", ["--startup-timeout", "--request-timeout"])
def test_nan_timeouts_are_refused_before_starting(option: str, tmp_path: Path, capsys) -> None:
    """--startup-timeout nan passed `<= 0` and waited forever for the server; --request-timeout nan named --timeout."""
    from runhelp import cli

    r = cli(
        capsys,
        "local",
        "--model",
        "m",
        "--prompt",
        "hi",
        "--engine",
        "command",
        "--server-cmd",
        "sleep {port}",
        "--out",
        tmp_path / "run",
        option,
        "nan",
    )
    assert (r.code, r.err.count("\n")) == (2, 1) and f"{option} must be > 0, got nan" in r.err, r.err
    assert not (tmp_path / "run").exists()
