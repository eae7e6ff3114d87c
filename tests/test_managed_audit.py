"""`detaudit local --engine command`: the managed-server audit end to end, through the CLI, with real processes.

The child is the scripted loopback server (fast, exact answers) started as a command, a variant of it that dies
mid-audit, and — for the real engine — `detaudit serve` with a tiny offline model on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from runhelp import cli, cli_process

from detaudit.rundir.io import load_manifest, read_samples

TESTS = Path(__file__).resolve().parent
PY = sys.executable
LOCAL = ("local", "--engine", "command", "--model", "m")


def _scripted_cmd(tmp_path: Path, **script) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    return f"{PY} {TESTS / 'scripted_server.py'} --port {{port}} --script {path}"


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_command_engine_runs_the_audit_and_stops_the_server(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    res = cli(
        capsys,
        *LOCAL,
        "--server-cmd",
        _scripted_cmd(tmp_path),
        "--suite",
        "smoke",
        "-n",
        "3",
        "--concurrency",
        "1,2",
        "--out",
        out,
        "--server-env",
        "HF_TOKEN=hf_secret12345",
    )
    assert res.code == 0, res.err
    manifest = load_manifest(out)
    eng = manifest.target.engine
    assert manifest.target.kind == "local" and manifest.status == "complete" and manifest.suite == "smoke"
    assert eng["managed"] and eng["engine"] == "command" and eng["served_models"] == ["scripted-model"]
    assert eng["command"][1:3] == [str(TESTS / "scripted_server.py"), "--port"] and not eng["crashed"]
    assert eng["env_switches"] == {"HF_TOKEN": "***"}
    assert "hf_secret12345" not in (out / "manifest.json").read_text()
    rows = read_samples(out, columns=["prompt_id", "arm", "status"]).to_pylist()
    assert Counter((r["prompt_id"], r["arm"]) for r in rows) == {
        (p, a): 3 for p in ("capital", "count", "feynman-short") for a in ("c1", "c2")
    }
    assert "READY" in (out / "server.log").read_text()
    assert _closed(eng["port"])


def test_server_dying_mid_audit_is_exit_3_with_its_last_words(tmp_path: Path, capsys) -> None:
    dying = tmp_path / "dying.py"
    dying.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from scripted_server import ScriptedServer\n"
        "server = ScriptedServer(port=int(sys.argv[1]), latency_s=0.01).start()\n"
        "while server.stats['requests'] < 10:\n"
        "    time.sleep(0.01)\n"
        "print('Fatal: simulated GPU fault (Xid 79)', flush=True)\n"
        "os._exit(9)\n"
    )
    out = tmp_path / "run"
    start = time.monotonic()
    res = cli(
        capsys,
        *LOCAL,
        "--server-cmd",
        f"{PY} {dying} {{port}}",
        "--suite",
        "smoke",
        "-n",
        "200",
        "--concurrency",
        "1,4",
        "--out",
        out,
    )
    assert res.code == 3
    assert "exited with code 9 during the audit" in res.err and "simulated GPU fault (Xid 79)" in res.err
    assert time.monotonic() - start < 60  # stopped at once, not after 1200 failing requests with retries
    manifest = load_manifest(out)
    assert manifest.status == "interrupted" and manifest.target.engine["crashed"]
    assert any("crashed during the audit" in n for n in manifest.notes)
    assert "Xid 79" in (out / "server.log").read_text()


def test_the_child_gets_only_the_environment_it_needs_and_its_log_is_scrubbed(tmp_path: Path) -> None:
    # It inherited detaudit's whole environment (OPENAI_API_KEY, HF_TOKEN, ...), and its log was scrubbed only of
    # the launch's own secrets.
    secrets = {
        "OPENAI_API_KEY": "sk-parent-key-0123456789",
        "HF_TOKEN": "hf_parent_token_0123456789",
        "AWS_SECRET_ACCESS_KEY": "aws-parent-secret-0123456789",
        "MY_DB_PASSWORD": "db-parent-pw-0123456789",
        "VLLM_API_KEY": "vllm-parent-key-0123456789",
    }
    needed = {
        "HF_HOME": str(tmp_path / "hf"),
        "CUDA_VISIBLE_DEVICES": "",
        "LC_ALL": "C.UTF-8",
        "VLLM_LOGGING_LEVEL": "DEBUG",
    }
    seen = tmp_path / "child-env.json"
    child = tmp_path / "child.py"
    child.write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from scripted_server import ScriptedServer\n"
        f"json.dump(dict(os.environ), open({str(seen)!r}, 'w'))\n"
        # a server that read the parent's key from a config file of its own, and logs it
        f"print('config: api key {secrets['OPENAI_API_KEY']} loaded', flush=True)\n"
        "server = ScriptedServer(port=int(sys.argv[1])).start()\n"
        "print('READY', flush=True)\n"
        "server._thread.join()\n"
    )
    out = tmp_path / "run"
    res = cli_process(
        *LOCAL,
        "--server-cmd",
        f"{PY} {child} {{port}}",
        "-p",
        "hi",
        "-n",
        1,
        "--concurrency",
        1,
        "--out",
        out,
        "--server-env",
        "EXTRA_TOKEN=tok-given-explicitly",
        env={**secrets, **needed, "UNRELATED_SETTING": "1"},
    )
    assert res.code == 0, res.err
    env = json.loads(seen.read_text())
    assert not set(secrets) & set(env) and "UNRELATED_SETTING" not in env
    assert {k: env[k] for k in needed} == needed and env["PATH"] and env["EXTRA_TOKEN"] == "tok-given-explicitly"
    log = (out / "server.log").read_text()
    assert "config: api key *** loaded" in log and "READY" in log
    assert not [v for v in secrets.values() if v in log + res.out + res.err]


def test_startup_failure_is_exit_3_and_leaves_the_log_next_to_out(tmp_path: Path, capsys) -> None:
    script = "import sys; print('ValueError: model not found: nope'); sys.exit(1)"
    out = tmp_path / "run"
    res = cli(
        capsys, *LOCAL, "--server-cmd", f'{PY} -c "{script}" {{port}}', "--suite", "smoke", "-n", "2", "--out", out
    )
    assert res.code == 3
    assert "exited with code 1 before it was ready" in res.err and "model not found: nope" in res.err
    assert not out.exists()
    assert "model not found" in (tmp_path / "run.server.log").read_text()


def test_a_failing_servers_last_words_reach_the_terminal_escaped(tmp_path: Path, capsys) -> None:
    script = r"import sys; print('fatal \x1b]0;pwned\x07 \u202eerror\r'); sys.exit(1)"
    res = cli(capsys, *LOCAL, "--server-cmd", f'{PY} -c "{script}" {{port}}', "-p", "hi", "--out", tmp_path / "r")
    assert res.code == 3 and "| fatal \\x1b]0;pwned\\x07 \\u202eerror\\r" in res.err, res.err
    assert not any(c in res.err for c in "\x1b\x07\u202e\r")


def test_busy_port_and_bad_options_exit_2_before_starting(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = cli(
            capsys,
            *LOCAL,
            "--server-cmd",
            _scripted_cmd(tmp_path),
            "--port",
            port,
            "--suite",
            "smoke",
            "--out",
            tmp_path / "r",
        )
    assert res.code == 2 and "something already listens" in res.err
    res = cli(
        capsys,
        *LOCAL,
        "--server-cmd",
        _scripted_cmd(tmp_path),
        "--kernels",
        "batch-invariant",
        "--suite",
        "smoke",
        "--out",
        tmp_path / "r",
    )
    assert res.code == 2 and "needs --engine vllm or sglang" in res.err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.server.log").exists()


def test_command_engine_without_model_audits_the_servers_only_model(tmp_path: Path, capsys) -> None:
    """--engine command finds the model its server lists; the option parser made --model required all the same."""
    out = tmp_path / "run"
    res = cli(
        capsys,
        "local",
        "--engine",
        "command",
        "--server-cmd",
        _scripted_cmd(tmp_path),
        "-p",
        "hi",
        "-n",
        "2",
        "--concurrency",
        "1",
        "--out",
        out,
    )
    assert res.code == 0, res.err
    assert load_manifest(out).target.model == "scripted-model"
    res = cli(capsys, "local", "-p", "hi", "--out", tmp_path / "r")  # the built-in engine does need it
    assert (res.code, res.err.strip()) == (
        2,
        "error: --engine detaudit needs --model (a model directory, .gguf file or hub id)",
    )
    res = cli(capsys, "local", "--model", "m", "-p", "hi", "--port", "5", "--suite", "smoke", "--out", tmp_path / "r")
    assert res.code == 2 and "--port, --suite only apply with" in res.err  # one option "applies", two "apply"


def test_unbalanced_quote_in_server_cmd_is_named(tmp_path: Path, capsys) -> None:
    # it said "--server-cmd must contain {port}": fixing that still left a command line that cannot be split
    res = cli(capsys, *LOCAL, "--server-cmd", "'srv --port 8000", "-p", "hi", "--out", tmp_path / "r")
    assert res.code == 2 and "--server-cmd: cannot split into arguments (No closing quotation)" in res.err, res.err


def test_ctrl_c_stops_the_server_and_resume_finishes_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = _scripted_cmd(tmp_path, latency_s=0.05)
    args = [*LOCAL, "--server-cmd", cmd, "--suite", "smoke", "-n", "20", "--out", str(out)]
    proc = subprocess.Popen([PY, "-m", "detaudit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "shards").is_dir() and time.monotonic() < deadline:  # the audit is under way
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    manifest = load_manifest(out)
    assert manifest.status == "interrupted" and _closed(manifest.target.engine["port"])
    assert "--resume --out" in err
    res = subprocess.run(
        [PY, "-m", "detaudit", *LOCAL, "--server-cmd", cmd, "--resume", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    manifest = load_manifest(out)
    assert manifest.status == "complete" and any("resumed with a new command server" in n for n in manifest.notes)
    assert read_samples(out, columns=["status"]).num_rows == 3 * 20 * 2  # 3 prompts, N=20, arms c1 and c32
    assert (out / "server.log").read_text().count("# detaudit: started") == 2


def test_options_of_the_other_engine_and_a_missing_vllm_exit_2(tmp_path: Path, capsys) -> None:
    res = cli(capsys, "local", "--model", "m", "--prompt", "hi", "--suite", "smoke", "--out", tmp_path / "a")
    assert res.code == 2 and "--suite only applies with --engine vllm, sglang or command" in res.err
    res = cli(
        capsys,
        "local",
        "--engine",
        "vllm",
        "--model",
        "m",
        "--dtype",
        "float32",
        "--suite",
        "smoke",
        "--out",
        tmp_path / "b",
    )
    assert res.code == 2 and "--dtype only applies with --engine detaudit" in res.err
    if shutil.which("vllm") is None:  # the project machines: the preset's program is simply not there
        res = cli(capsys, "local", "--engine", "vllm", "--model", "m", "--suite", "smoke", "--out", tmp_path / "c")
        assert res.code == 2 and "cannot start 'vllm': not found; install vLLM" in res.err
    assert not any(tmp_path.iterdir())


def test_server_dies_with_detaudit_even_on_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = _scripted_cmd(tmp_path, latency_s=0.05)
    proc = subprocess.Popen(
        [PY, "-m", "detaudit", *LOCAL, "--server-cmd", cmd, "--suite", "smoke", "-n", "200", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (out / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    port = int(load_manifest(out).target.base_url.rsplit(":", 1)[1].split("/")[0])
    assert not _closed(port)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while not _closed(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _closed(port)


STAND_IN = """\
import json, os, sys
argv = sys.argv[1:]
with open({record!r}, "w") as f:
    json.dump({{"argv": argv, "env": {{k: os.environ.get(k) for k in ("VLLM_BATCH_INVARIANT", "NCCL_ALGO")}}}}, f)
port = argv[argv.index("--port") + 1]
os.execv(sys.executable, [sys.executable, {scripted!r}, "--port", port, "--script", {script!r}])
"""


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_presets_end_to_end_with_stand_in_programs(engine: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """Real vLLM/SGLang cannot be installed here: a stand-in `vllm` program (on PATH) or `sglang.launch_server`
    module (on PYTHONPATH) records how it was started, then serves the scripted server on the port it was given."""
    record = tmp_path / "started.json"
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"models": ["Qwen/Qwen3-8B"]}))
    code = STAND_IN.format(record=str(record), scripted=str(TESTS / "scripted_server.py"), script=str(script))
    if engine == "vllm":
        exe = tmp_path / "bin" / "vllm"
        exe.parent.mkdir()
        exe.write_text(f"#!{PY}\n{code}")
        exe.chmod(0o755)
        monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    else:
        pkg = tmp_path / "py" / "sglang"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "launch_server.py").write_text(code)
        monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    out = tmp_path / "run"
    res = cli(
        capsys,
        "local",
        "--engine",
        engine,
        "--model",
        "Qwen/Qwen3-8B",
        "--tensor-parallel-size",
        "2",
        "--kernels",
        "batch-invariant",
        "--server-env",
        "NCCL_ALGO=Tree",
        "--suite",
        "smoke",
        "-n",
        "2",
        "--concurrency",
        "1,2",
        "--out",
        out,
    )
    assert res.code == 0, res.err
    started = json.loads(record.read_text())
    eng = load_manifest(out).target.engine
    if engine == "vllm":
        assert started["argv"][:2] == ["serve", "Qwen/Qwen3-8B"]
        assert started["argv"][-4:] == ["--tensor-parallel-size", "2", "--attention-backend", "FLASH_ATTN"]
        assert started["env"] == {"VLLM_BATCH_INVARIANT": "1", "NCCL_ALGO": "Tree"}
        assert eng["env_switches"] == {"NCCL_ALGO": "Tree", "VLLM_BATCH_INVARIANT": "1"}
    else:
        assert started["argv"][:2] == ["--model-path", "Qwen/Qwen3-8B"]
        assert started["argv"][-3:] == ["--tp-size", "2", "--enable-deterministic-inference"]
        assert started["env"]["VLLM_BATCH_INVARIANT"] is None
    assert eng["engine"] == engine and eng["kernels"] == "batch-invariant" and eng["tensor_parallel_size"] == 2
    assert read_samples(out, columns=["status"]).num_rows == 3 * 2 * 2
