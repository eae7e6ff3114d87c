"""StepFit, the scheduler's step-size policy under piecewise CUDA graphs: exact choices on replay times measured on
the H200, its optimality as a property, the moving overhead mean, and the budgets the scheduler asks it for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detaudit.engine.block_manager import BlockManager
from detaudit.engine.scheduler import Scheduler, StepFit, fit_tokens
from detaudit.engine.sequence import SamplingParams, Sequence

# Replay ms per token bucket of the Qwen3-8B-shaped engine on the H200 (benchmarks/h200/engine_bench_88eed0c_run1.json,
# cuda_graph_token_replay_ms; 96 runs on 128, its measured route).
SIZES = [64, 96, 128, 192, 256]
BI = {64: 6.662, 96: 7.521, 128: 7.521, 192: 9.795, 256: 10.674}
STOCK = {64: 6.828, 96: 7.27, 128: 7.521, 192: 8.636, 256: 9.42}


def _cost(table: dict[int, float]):
    return lambda n: table[next(b for b in SIZES if b >= n)]


def test_a_step_just_past_128_tokens_is_held_to_128_where_that_runs_more_tokens_per_ms():
    bi, stock = _cost(BI), _cost(STOCK)
    # 126 decodes + 12 prompt tokens: 138 / (9.795 + 3.5) = 10.38 tokens/ms, 128 / (7.521 + 3.5) = 11.61.
    assert fit_tokens(126, 138, SIZES, bi, 3.5) == 128
    assert fit_tokens(126, 138, SIZES, stock, 3.5) == 128  # 138 / 12.136 = 11.37
    # The break-even: bi 128 * 13.295 / 11.021 = 154.4 tokens, stock 128 * 12.136 / 11.021 = 140.95.
    assert fit_tokens(126, 154, SIZES, bi, 3.5) == 128
    assert fit_tokens(126, 155, SIZES, bi, 3.5) == 155
    assert fit_tokens(126, 140, SIZES, stock, 3.5) == 128
    assert fit_tokens(126, 141, SIZES, stock, 3.5) == 141
    # Without overhead the pure replay rates decide: 160 / 9.795 = 16.3 < 128 / 7.521 = 17.0.
    assert fit_tokens(126, 160, SIZES, bi, 0.0) == 128


def test_a_step_is_never_held_below_what_it_must_hold():
    bi = _cost(BI)
    assert fit_tokens(128, 138, SIZES, bi, 3.5) == 138  # 128 decodes: no size between 128 and 138
    assert fit_tokens(100, 100, SIZES, bi, 0.0) == 100
    # 200 replays as 256 (18.7 tokens/ms); 192 runs 19.6, better than 128's 17.0.
    assert fit_tokens(0, 200, SIZES, bi, 0.0) == 192


@given(
    st.dictionaries(st.integers(1, 512), st.floats(0.01, 100.0), min_size=1, max_size=8),
    st.integers(0, 512),
    st.integers(0, 512),
    st.floats(0.0, 50.0),
)
def test_the_fit_is_the_best_rate_among_want_and_the_sizes_between(table, floor, extra, overhead):
    sizes = sorted(table)
    want = min(floor + extra, sizes[-1])
    floor = min(floor, want)
    cost = lambda n: table[next(b for b in sizes if b >= n)]  # noqa: E731
    got = fit_tokens(floor, want, sizes, cost, overhead)
    candidates = [want] + [s for s in sizes if floor < s < want]
    assert got in candidates
    rate = lambda n: n / (cost(n) + overhead)  # noqa: E731
    assert all(rate(got) >= rate(c) for c in candidates)
    if rate(got) == rate(want):
        assert got == want  # a tie keeps the larger step


def test_step_fit_waits_for_a_measured_step_then_keeps_a_moving_mean_of_the_overhead():
    fit = StepFit([256, 64, 192, 96, 128], _cost(BI))
    assert fit(126, 138) == 138 and fit.fitted == 0  # nothing measured yet
    fit.observe(12.5, 9.5)
    assert fit.overhead_ms == 3.0
    fit.observe(20.5, 9.5)
    assert abs(fit.overhead_ms - 3.8) < 1e-12  # 3.0 + 0.1 * (11.0 - 3.0)
    fit.observe(1.0, 9.5)  # a wall below the replay time counts as no overhead
    assert abs(fit.overhead_ms - 3.42) < 1e-12
    assert fit(126, 138) == 128 and fit.fitted == 1
    assert fit(126, 163) == 163 and fit.fitted == 1
    assert fit(10, 300) == 300  # past the largest graph: the step runs eagerly, unfitted


def _seq(tokens: list[int], **kw) -> Sequence:
    return Sequence(tokens, SamplingParams(max_tokens=4), **kw)


def _finish(s: Scheduler, batch) -> None:
    for seq, n in zip(batch.seqs, batch.num_new, strict=True):
        if not seq.score_only and seq.num_cached + n == len(seq):
            seq.append(7, -1.0, [], [], eos_ids=set())
    s.finish_step(batch)


def test_the_scheduler_asks_with_decodes_and_uncached_prompt_tokens_and_keeps_to_the_budget():
    asked: list[tuple[int, int]] = []
    budget = {"next": 0}

    def fit(floor: int, want: int) -> int:
        asked.append((floor, want))
        return budget["next"] or want

    s = Scheduler(BlockManager(32, 4, prefix_cache=True), max_batch=4, max_batched_tokens=64, fit=fit)
    a = _seq(list(range(1, 10)))  # 9 tokens: two full blocks go to the prefix cache
    s.add(a)
    _finish(s, s.schedule())
    assert asked == [(0, 9)]
    b = _seq(list(range(1, 9)) + [20, 21])  # its first 8 tokens are cached: 2 to compute
    c = _seq([30, 31, 32, 33, 34])
    s.add(b)
    s.add(c)
    budget["next"] = 3
    batch = s.schedule()
    assert asked[-1] == (1, 8)  # a's decode must run; 1 + 2 + 5 wanted
    assert batch.seqs == [a, b] and batch.num_new == [1, 2] and list(s.waiting) == [c]
    _finish(s, batch)
    budget["next"] = 0
    batch = s.schedule()
    assert asked[-1] == (2, 7) and batch.seqs == [a, b, c] and batch.num_new == [1, 1, 5]  # c runs next step


def test_a_score_only_prompt_that_would_be_admitted_must_fit_whole():
    asked: list[tuple[int, int]] = []

    def fit(floor: int, want: int) -> int:
        asked.append((floor, want))
        return want

    s = Scheduler(BlockManager(32, 4), max_batch=4, max_batched_tokens=64, fit=fit)
    d = _seq([1, 2])
    s.add(d)
    _finish(s, s.schedule())
    s.add(_seq([5, 6, 7, 8], score_only=True, score_from=2))
    s.add(_seq([9, 10, 11]))
    s.schedule()
    assert asked[-1] == (5, 8)  # the decode and the whole scored prompt; the last prompt may wait
    s2 = Scheduler(BlockManager(32, 4), max_batch=4, max_batched_tokens=64, fit=fit)
    s2.add(_seq([9, 10, 11]))
    s2.add(_seq([5, 6, 7, 8], score_only=True, score_from=2))
    n = len(asked)
    s2.schedule()
    assert len(asked) == n  # everything it wants it must take: nothing to ask


def test_serve_fits_steps_by_default_and_local_keeps_its_batches_to_the_seed(capsys):
    """`detaudit local` records batches that must follow from the seed alone, so StepFit (which follows measured
    times) is off there unless asked for; `detaudit serve` runs it; a managed engine refuses the switch."""
    import typer.main

    from detaudit.cli.app import app, main

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    default = {
        name: next(p for p in commands[name].params if p.name == "fit_steps").default for name in ("local", "serve")
    }
    assert default == {"local": False, "serve": True}
    with pytest.raises(SystemExit) as e:
        main(["local", "--engine", "vllm", "--model", "m", "--prompt", "x", "--fit-steps"])
    assert e.value.code == 2 and "--fit-steps only appl" in capsys.readouterr().err
