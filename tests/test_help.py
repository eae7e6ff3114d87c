"""`--help` of every command reads like a manual (issue #21 item 9): click-style value names (TEXT, INTEGER, PATH,
nothing after a flag) instead of typer 0.29's Python types, an argument's name in the usage line, one example at the
end; the short and long dtype names are accepted everywhere; the defaults a newcomer copies are the recommended ones."""

from __future__ import annotations

import re

import pytest
import typer
from runhelp import cli

from detaudit.cli.app import app

ROOT = typer.main.get_command(app)


def _commands(group=ROOT, path=()):  # type: ignore[no-untyped-def]
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands())
# typer 0.29's placeholders: `<bool>`, `<list[str]>`, `<int range>`, `<path>` ..., and a range in min/max form.
TYPE_PLACEHOLDER = re.compile(r"<[a-z][a-z_\[\], ]*>")


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "detaudit")
def test_help_names_values_like_click_and_ends_with_an_example(path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    r = cli(capsys, *path, "--help")
    assert r.code == 0, r.err
    text = r.out
    assert not TYPE_PLACEHOLDER.findall(text), TYPE_PLACEHOLDER.findall(text)
    assert "<=x<=" not in text and "18446744073709551615" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    assert re.search(r"(Example|Start with the offline demo): detaudit ", text), text[-400:]


def test_flags_show_no_value_and_values_show_their_kind(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = cli(capsys, "rescore", "--help").out
    assert "Usage: detaudit rescore [OPTIONS] RUN_DIR" in text
    assert re.search(r"--json +Print", text) and re.search(r"--help +Show", text)
    assert re.search(r"--max-batch +INTEGER", text) and re.search(r"--model +TEXT", text)
    assert "batch-invariant: the reference" in text  # why rescore's default differs from local's and serve's
    text = cli(capsys, "report", "--help").out
    assert "Usage: detaudit report [OPTIONS] RUNS..." in text


def test_every_dtype_option_takes_short_and_long_names() -> None:
    with_dtype = [(p, c) for p, c in COMMANDS if any(o.name == "dtype" for o in c.params)]
    assert {p for p, _ in with_dtype} >= {("local",), ("serve",), ("rescore",), ("tiny-model",), ("probe", "kernels")}
    required = {("serve",): ["--model", "m"], ("rescore",): ["r", "--model", "m"], ("tiny-model",): ["d"]}
    for path, command in with_dtype:
        for given, meant in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32"), ("fp16", "float16")):
            ctx = command.make_context(" ".join(path), [*required.get(path, []), "--dtype", given])
            assert ctx.params["dtype"] == meant, (path, given)


def test_probe_kernels_runs_with_a_long_dtype_name(capsys) -> None:
    import json

    r = cli(capsys, "probe", "kernels", "--dtype", "float32", "--quick", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["dtype"] == "float32"


def test_a_torch_seed_out_of_range_is_one_line(capsys, tmp_path) -> None:
    for seed in ("-1", str(2**64)):
        r = cli(capsys, "tiny-model", tmp_path / "m", "--seed", seed)
        assert r.code == 2 and r.err.count("\n") == 1 and "2**64 - 1" in r.err, r.err
    assert not (tmp_path / "m").exists()


def test_local_defaults_to_a_serial_control_arm_and_panels_say_which_engine(capsys, monkeypatch) -> None:
    local = ROOT.commands["local"]  # type: ignore[attr-defined]
    assert next(o for o in local.params if o.name == "scenario").default == "serial,mixed"
    monkeypatch.setenv("COLUMNS", "200")
    text = cli(capsys, "local", "--help").out
    builtin, managed = text.index("Built-in engine only"), text.index("Managed engine only")
    assert builtin < text.index("--scenario") < managed < text.index("--concurrency")
    assert text.index("--resume") > managed
