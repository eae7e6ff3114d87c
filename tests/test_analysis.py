"""Divergence analysis on hand-built run directories whose answers are known."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from detaudit.analysis.summary import Limits, summarize_run
from detaudit.analysis.summary_schema import ArmSummary, RunSummary
from detaudit.analysis.units import completion_key
from detaudit.rundir.io import read_samples, write_manifest
from detaudit.rundir.recorder import ShardWriter, finalize_samples
from detaudit.rundir.schema import ArmSpec, PromptSpec, RequestParams, RunManifest, TargetSpec


def make_run(path: Path, rows: list[dict], *, arms=(("c1", 1),), prompts=("p0",), capture="token_ids") -> Path:
    """A finished run directory holding `rows` (sample_index, prompt/arm defaults and status filled in)."""
    arm_conc = dict(arms)
    full = []
    per_group: dict[tuple, int] = {}
    for r in rows:
        r = {"prompt_id": prompts[0], "arm": arms[0][0], "status": "ok", **r}
        r.setdefault("concurrency", arm_conc.get(r["arm"]))
        group = (r["prompt_id"], r["arm"])
        r["repeat"] = per_group.get(group, 0)  # a group may hold fewer rows than N: the rest are missing
        per_group[group] = r["repeat"] + 1
        full.append(r)
    repeats = max(per_group.values(), default=1)
    arm_pos = {a: i for i, (a, _) in enumerate(arms)}
    for r in full:  # the index formula of RunManifest.sample_index, which readers check
        r["sample_index"] = (prompts.index(r["prompt_id"]) * len(arms) + arm_pos[r["arm"]]) * repeats + r["repeat"]
    manifest = RunManifest(
        run_id="test-run",
        tool_version="test",
        status="complete",
        created_at=datetime.now(timezone.utc),
        target=TargetSpec(kind="endpoint", base_url="http://127.0.0.1:1/v1", model="m"),
        params=RequestParams(max_tokens=16),
        prompts=[PromptSpec(prompt_id=p, prompt=f"prompt {p}") for p in prompts],
        arms=[ArmSpec(name=a, concurrency=c) for a, c in arms],
        repeats=repeats,
        capture=capture,
    )
    write_manifest(path, manifest)
    writer = ShardWriter(path)
    for start in range(0, len(full), 300):  # several shards, like a real run
        writer.write(full[start : start + 300])
    finalize_samples(path)
    return path


def ids_rows(seqs: list[list[int]], **extra) -> list[dict]:
    return [{"token_ids": s, "text": "".join(f"[{t}]" for t in s), **extra} for s in seqs]


def token_rows(seqs: list[list[str]], **extra) -> list[dict]:
    """Rows carrying token strings and their UTF-8 bytes (as OpenAI's logprobs give), no ids."""
    return [{"tokens": s, "token_bytes": [t.encode() for t in s], "text": "".join(s), **extra} for s in seqs]


def only_arm(summary: RunSummary, prompt: int = 0, arm: int = 0) -> ArmSummary:
    return summary.prompts[prompt].arms[arm]


def fork_shape(arm: ArmSummary) -> list[tuple]:
    return [(f.position, f.prefix_count, [(b.token, b.count) for b in f.branches]) for f in arm.forks]


def test_feynman_shape_is_one_fork_at_102(tmp_path):
    shared = [f" t{i}" for i in range(102)]
    seqs = [shared + [" Queens", ",", " New", " York"]] * 992 + [shared + [" New", " York", " City"]] * 8
    order = list(range(1000))
    random.Random(1).shuffle(order)  # the 8 are scattered through the run
    rows = token_rows([seqs[i] for i in order])
    s = summarize_run(make_run(tmp_path, rows, capture="tokens"))
    arm = only_arm(s)
    assert s.unit == "token" and s.unit_detail.compared_as == "token_bytes"
    assert arm.unique == 2 and arm.ok == 1000
    assert [(c.count, c.first_divergence) for c in arm.completions] == [(992, None), (8, 102)]
    assert fork_shape(arm) == [(102, 1000, [(" Queens", 992), (" New", 8)])]
    assert arm.forks[0].prefix.endswith(" t100 t101") and arm.forks[0].prefix.startswith("…")
    assert arm.first_divergence.model_dump() == {"min": 102, "median": 102, "histogram": {"102": 8}, "samples": 8}
    assert arm.stats.modal_share == 0.992 and arm.stats.divergence_rate_upper95 is None
    lo, hi = arm.stats.modal_share_wilson95
    assert lo < 0.992 < hi
    assert s.earliest_fork.position == 102


def test_prefix_of_another_diverges_where_the_shorter_ends(tmp_path):
    s = summarize_run(make_run(tmp_path, ids_rows([[1, 2, 3]] * 3 + [[1, 2]] * 2)))
    arm = only_arm(s)
    assert fork_shape(arm) == [(2, 5, [("<id:3>", 3), ("", 2)])]
    assert arm.forks[0].branches[0].token_id == 3 and arm.forks[0].branches[1].token_id is None
    assert [(c.count, c.first_divergence, c.length) for c in arm.completions] == [(3, None, 3), (2, 2, 2)]


def test_modal_completion_that_is_a_prefix(tmp_path):
    arm = only_arm(summarize_run(make_run(tmp_path, ids_rows([[7, 8]] * 3 + [[7, 8, 9, 10]] * 1))))
    assert arm.completions[1].first_divergence == 2
    assert fork_shape(arm) == [(2, 4, [("", 3), ("<id:9>", 1)])]


def test_tie_for_modal_goes_to_the_lexicographically_first_whatever_the_row_order(tmp_path):
    seqs = [[5, 1]] * 4 + [[4, 9, 9]] * 4 + [[6]] * 2
    results = []
    for k in range(3):
        order = list(range(len(seqs)))
        random.Random(k).shuffle(order)
        s = summarize_run(make_run(tmp_path / str(k), ids_rows([seqs[i] for i in order])))
        results.append(only_arm(s).completions)
    assert results[0] == results[1] == results[2]
    assert [(c.text, c.count) for c in results[0]] == [("[4][9][9]", 4), ("[5][1]", 4), ("[6]", 2)]
    # token ids compare as numbers, not as their decimal strings
    arm = only_arm(summarize_run(make_run(tmp_path / "num", ids_rows([[10]] * 2 + [[9]] * 2))))
    assert arm.completions[0].text == "[9]"


def test_all_identical_gives_the_clopper_pearson_bound(tmp_path):
    s = summarize_run(make_run(tmp_path, ids_rows([[3, 1, 4, 1, 5]] * 60)))
    arm = only_arm(s)
    assert arm.unique == 1 and arm.forks == [] and arm.earliest_fork is None
    assert arm.first_divergence.model_dump() == {"min": None, "median": None, "histogram": {}, "samples": 0}
    assert arm.stats.divergence_rate_upper95 == pytest.approx(1 - 0.05 ** (1 / 60))
    assert arm.stats.miss_probability["0.01"] == pytest.approx(0.99**60)
    assert s.prompts[0].verdict == "deterministic"
    assert s.agreement.share == 1.0 and s.earliest_fork is None


def test_all_different_is_one_wide_fork_at_zero(tmp_path):
    s = summarize_run(make_run(tmp_path, ids_rows([[i, 0, 0] for i in range(30)])), Limits(branches=4))
    arm = only_arm(s)
    assert arm.unique == 30 and arm.forks_total == 1
    fork = arm.forks[0]
    assert fork.position == 0 and fork.branches_total == 30 and len(fork.branches) == 4
    assert [b.count for b in fork.branches] == [1, 1, 1, 1] and fork.branches[0].token == "<id:0>"
    assert arm.first_divergence.histogram == {"0": 29}


def test_nested_forks_sorted_by_position(tmp_path):
    seqs = [[1, 1, 7]] * 4 + [[1, 1, 8]] * 3 + [[1, 2, 9]] * 2 + [[2]] * 1
    arm = only_arm(summarize_run(make_run(tmp_path, ids_rows(seqs))))
    assert fork_shape(arm) == [
        (0, 10, [("<id:1>", 9), ("<id:2>", 1)]),
        (1, 9, [("<id:1>", 7), ("<id:2>", 2)]),
        (2, 7, [("<id:7>", 4), ("<id:8>", 3)]),
    ]
    assert arm.first_divergence.model_dump() == {
        "min": 0,
        "median": 1.5,
        "histogram": {"0": 1, "1": 2, "2": 3},
        "samples": 6,
    }


def test_empty_completions(tmp_path):
    arm = only_arm(summarize_run(make_run(tmp_path / "a", ids_rows([[]] * 3 + [[42]] * 2))))
    assert fork_shape(arm) == [(0, 5, [("", 3), ("<id:42>", 2)])]
    assert arm.completions[0].length == 0 and arm.completions[1].first_divergence == 0
    arm = only_arm(summarize_run(make_run(tmp_path / "b", ids_rows([[]] * 4))))
    assert arm.unique == 1 and arm.forks == []


def test_errors_are_counted_but_never_compared(tmp_path):
    rows = ids_rows([[1, 2]] * 5) + [{"status": "error", "error": "HTTP 500"}] * 2
    s = summarize_run(make_run(tmp_path, rows))
    arm = only_arm(s)
    assert (arm.n, arm.ok, arm.errors, arm.unique) == (7, 5, 2, 1)
    assert s.samples.errors == 2
    assert s.prompts[0].verdict == "inconclusive" and "errors" in s.prompts[0].verdict_reason


def test_multibyte_characters_split_across_tokens(tmp_path):
    # "café" vs "cafè": the é/è share their lead byte, so the fork sits on the continuation byte
    rows = [{"token_bytes": [b"caf", b"\xc3", b"\xa9", b"!"]}] * 3 + [{"token_bytes": [b"caf", b"\xc3", b"\xa8"]}]
    # "x€" vs "x£": the fork sits on the lead byte, the character is finished by the next token
    rows += [{"token_bytes": [b"x", b"\xe2\x82", b"\xac"]}] * 2 + [{"token_bytes": [b"x", b"\xc2", b"\xa3"]}]
    for r in rows:
        r["text"] = b"".join(r["token_bytes"]).decode()
        r["tokens"] = [b.decode("utf-8", errors="replace") for b in r["token_bytes"]]
    cafe = only_arm(summarize_run(make_run(tmp_path / "cafe", rows[:4], capture="tokens")))
    assert fork_shape(cafe) == [(2, 4, [("é", 3), ("è", 1)])]
    assert cafe.forks[0].prefix == "caf"
    euro = only_arm(summarize_run(make_run(tmp_path / "euro", rows[4:], capture="tokens")))
    assert fork_shape(euro) == [(1, 3, [("€", 2), ("£", 1)])]
    assert euro.completions[0].text == "x€"


def test_multibyte_prefix_is_shown_whole(tmp_path):
    rows = [{"token_bytes": [b"\xe6\x97", b"\xa5\xe6", b"\x9c\xac", b"A"]}] * 2
    rows += [{"token_bytes": [b"\xe6\x97", b"\xa5\xe6", b"\x9c\xac", b"B"]}]
    for r in rows:
        r["text"] = b"".join(r["token_bytes"]).decode()
    arm = only_arm(summarize_run(make_run(tmp_path, rows, capture="tokens")))
    assert arm.forks[0].prefix == "日本" and fork_shape(arm)[0][2] == [("A", 2), ("B", 1)]


def test_text_only_runs_compare_characters(tmp_path):
    rows = [{"text": "naïve world"}] * 3 + [{"text": "naïve there"}] + [{"text": None}]
    s = summarize_run(make_run(tmp_path, rows, capture="text"))
    arm = only_arm(s)
    assert s.unit == "text" and s.unit_detail.positions.startswith("characters")
    assert fork_shape(arm) == [(0, 5, [("n", 4), ("", 1)]), (6, 4, [("w", 3), ("t", 1)])]
    assert arm.forks[1].prefix == "naïve " and arm.forks[1].margin is None


def test_only_ids_show_as_id_tokens(tmp_path):
    rows = [{"token_ids": [5, 6]}] * 2 + [{"token_ids": [5, 7]}]
    arm = only_arm(summarize_run(make_run(tmp_path, rows)))
    assert fork_shape(arm) == [(1, 3, [("<id:6>", 2), ("<id:7>", 1)])]
    assert arm.forks[0].prefix == "<id:5>" and arm.completions[0].text == "<id:5><id:6>"


def test_margin_comes_from_the_modal_branch(tmp_path):
    top_a = [[-0.1, -4.0], [-0.50, -0.55], [-0.2, -2.0]]
    top_b = [[-0.1, -4.0], [-0.60, -0.62], [-0.2, -2.0]]
    rows = [{"token_ids": [1, 2, 3], "top_logprobs": top_a}] * 3 + [{"token_ids": [1, 4, 3], "top_logprobs": top_b}]
    arm = only_arm(summarize_run(make_run(tmp_path / "m", rows)))
    assert arm.forks[0].margin == pytest.approx(0.05)
    arm = only_arm(summarize_run(make_run(tmp_path / "none", ids_rows([[1, 2]] * 2 + [[1, 3]]))))
    assert arm.forks[0].margin is None


def test_verdicts_from_load_arms(tmp_path):
    arms = (("c1", 1), ("c8", 8))

    def verdict_of(name, serial, loaded):
        rows = [{**r, "arm": "c1"} for r in ids_rows(serial)] + [{**r, "arm": "c8"} for r in ids_rows(loaded)]
        return summarize_run(make_run(tmp_path / name, rows, arms=arms)).prompts[0].verdict

    assert verdict_of("dep", [[1, 2]] * 4, [[1, 2]] * 3 + [[1, 3]]) == "load-dependent"
    assert verdict_of("moved", [[1, 2]] * 4, [[1, 3]] * 4) == "load-dependent"
    assert verdict_of("indep", [[1, 2]] * 3 + [[1, 3]], [[1, 2]] * 4) == "load-independent"
    assert verdict_of("det", [[1, 2]] * 4, [[1, 2]] * 4) == "deterministic"
    assert verdict_of("thin", [[1, 2]], [[1, 2]] * 4) == "inconclusive"
    rows = [{**r, "arm": "c8"} for r in ids_rows([[1]] * 3 + [[2]])]
    s = summarize_run(make_run(tmp_path / "noserial", rows, arms=(("c8", 8),)))
    assert s.prompts[0].verdict == "inconclusive" and "serial" in s.prompts[0].verdict_reason


def test_several_prompts_agreement_and_earliest_fork(tmp_path):
    rows = [{**r, "prompt_id": "a"} for r in ids_rows([[1, 2, 3, 4]] * 3 + [[1, 2, 3, 5]])]
    rows += [{**r, "prompt_id": "b"} for r in ids_rows([[9, 9]] * 4)]
    rows += [{**r, "prompt_id": "c"} for r in ids_rows([[7, 1]] * 2 + [[7, 2]] * 2)]
    s = summarize_run(make_run(tmp_path, rows, prompts=("a", "b", "c")))
    assert [(p.prompt_id, p.unique) for p in s.unique_per_prompt] == [("a", 2), ("b", 1), ("c", 2)]
    assert s.agreement.prompts == 3 and s.agreement.all_identical == 1
    assert s.agreement.share == pytest.approx(1 / 3)
    assert (s.earliest_fork.prompt_id, s.earliest_fork.position) == ("c", 1)


def test_split_by_system_fingerprint(tmp_path):
    rows = ids_rows([[1, 2]] * 4, system_fingerprint="fp_a") + ids_rows(
        [[1, 2]] * 2 + [[1, 3]] * 2, system_fingerprint="fp_b"
    )
    s = summarize_run(make_run(tmp_path, rows))
    fps = {f.system_fingerprint: (f.n, f.unique) for f in only_arm(s).system_fingerprints}
    assert fps == {"fp_a": (4, 1), "fp_b": (4, 2)}
    by_fp = {f.system_fingerprint: f.share for f in s.agreement.by_system_fingerprint}
    assert by_fp == {"fp_a": 1.0, "fp_b": 0.0}


def test_unique_count_agrees_with_the_live_counter_key(tmp_path):
    """The runner's live counter (completion_key) and the analysis count the same distinct completions."""
    rng = random.Random(7)
    seqs = [[rng.randrange(3) for _ in range(rng.randrange(4))] for _ in range(80)]
    for name, rows in (("ids", ids_rows(seqs)), ("tok", token_rows([[f"t{t}" for t in s] for s in seqs]))):
        path = make_run(tmp_path / name, rows)
        keys = {completion_key(r) for r in read_samples(path).to_pylist()}
        assert only_arm(summarize_run(path)).unique == len(keys - {None})


def _naive_forks(seqs: list[tuple]) -> list[tuple]:
    """Forks by brute force over every prefix: (position, prefix_count, sorted branch counts)."""
    out = []
    for prefix in {s[:d] for s in seqs for d in range(len(s) + 1)}:
        through = [s for s in seqs if s[: len(prefix)] == prefix]
        children: dict = {}
        for s in through:
            nxt = s[len(prefix)] if len(s) > len(prefix) else None
            children[nxt] = children.get(nxt, 0) + 1
        if len(children) > 1:
            out.append((len(prefix), len(through), sorted(children.values(), reverse=True)))
    return sorted(out, key=lambda f: (f[0], -f[1], f[2]))


_ALPHABETS = {"token_ids": [0, 1, 2], "tokens": ["x", "yy", "é"], "text": ["a", "b", "ç"]}


def _rows_for(capture: str, seqs: list[tuple]) -> list[dict]:
    if capture == "token_ids":
        return ids_rows([list(s) for s in seqs])
    if capture == "tokens":
        return token_rows([list(s) for s in seqs])
    return [{"text": "".join(s)} for s in seqs]


@pytest.mark.parametrize("capture", ["token_ids", "tokens", "text"])
@pytest.mark.parametrize("seed", range(4))
def test_everything_matches_brute_force(tmp_path, seed, capture):
    """Forks, counts, modal order with ties, first divergences: against brute force over random corpora."""
    rng = random.Random(seed)
    alphabet = _ALPHABETS[capture]
    seqs = [tuple(rng.choice(alphabet) for _ in range(rng.randrange(6))) for _ in range(120)]
    arm = only_arm(summarize_run(make_run(tmp_path, _rows_for(capture, seqs), capture=capture), Limits(10**4, 10**4)))
    got = sorted(
        ((f.position, f.prefix_count, [b.count for b in f.branches]) for f in arm.forks),
        key=lambda f: (f[0], -f[1], f[2]),
    )
    assert got == _naive_forks(seqs)
    assert [(f.position, -f.prefix_count) for f in arm.forks] == sorted(
        (f.position, -f.prefix_count) for f in arm.forks
    )
    # most frequent first, ties in lexicographic order (token bytes for strings, code points for text)
    key = (lambda s: tuple(t.encode() for t in s)) if capture == "tokens" else (lambda s: s)
    expected = sorted(set(seqs), key=lambda s: (-seqs.count(s), key(s)))
    modal = expected[0]
    lcp = [
        next((i for i in range(min(len(s), len(modal))) if s[i] != modal[i]), min(len(s), len(modal))) for s in expected
    ]
    assert [(c.count, c.length) for c in arm.completions] == [(seqs.count(s), len(s)) for s in expected]
    assert [c.first_divergence for c in arm.completions] == [None] + lcp[1:]
    assert arm.unique == len(set(seqs))


def test_large_run_reads_display_rows_from_few_row_groups(tmp_path):
    """Over several Parquet row groups: the same answers, and shown rows come from as few row groups as possible."""
    from detaudit.analysis.run_reader import RunDirReader, sample_rows
    from detaudit.analysis.summary import analyze
    from detaudit.rundir.io import ROW_GROUP_ROWS, load_manifest, read_sample_rows, sample_row_groups

    n = 3 * ROW_GROUP_ROWS + 100
    rng = random.Random(3)
    variants = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6], [7]]
    seqs = [variants[0] if rng.random() < 0.9 else rng.choice(variants[1:]) for _ in range(n)]
    top = [[-0.1, -0.3]] * 4
    rows = [{"token_ids": s, "tokens": [f"t{t}" for t in s], "text": str(s), "top_logprobs": top} for s in seqs]
    path = make_run(tmp_path, rows)
    bounds = sample_row_groups(path)
    assert len(bounds) == 5 and bounds[-1] == n
    table = read_samples(path)
    picked = np.array([5, n - 1, ROW_GROUP_ROWS, 17])
    assert (
        read_sample_rows(path, picked, ["sample_index", "text"]).to_pylist()
        == table.select(["sample_index", "text"]).take(picked).to_pylist()
    )
    summary, s, _, _ = analyze(load_manifest(path), RunDirReader(path))
    arm = only_arm(summary)
    counts = {tuple(v): seqs.count(v) for v in variants}
    assert sorted(c.count for c in arm.completions) == sorted(counts.values())
    assert fork_shape(arm)[0][0] == 0 and arm.forks[0].margin == pytest.approx(0.2)
    chosen = sample_rows(s, np.arange(s.n_unique), bounds)
    assert [seqs[r] for r in chosen] == [list(s.seq(u)) for u in range(s.n_unique)]
    assert len(np.unique(np.searchsorted(bounds, chosen, side="right"))) == 1  # every variant is in row group 0


def test_in_memory_summary_equals_the_streamed_one(tmp_path):
    from detaudit.analysis.summary import summarize
    from detaudit.rundir.io import load_manifest

    rows = token_rows([["a", "b"]] * 5 + [["a", "c"]] * 2) + [{"status": "error", "error": "timeout"}]
    path = make_run(tmp_path, rows, capture="tokens")
    assert summarize(load_manifest(path), read_samples(path)) == summarize_run(path)


def test_runs_of_failed_requests_only(tmp_path):
    """Every request failed: counted, nothing compared, the verdict says so (and nothing crashes)."""
    s = summarize_run(make_run(tmp_path, [{"status": "error", "error": "HTTP 503"}] * 4))
    arm = only_arm(s)
    assert (arm.n, arm.ok, arm.errors, arm.unique, arm.forks) == (4, 0, 4, 0, [])
    assert s.prompts[0].verdict == "inconclusive" and s.unit_detail.compared_as == "token_ids"
    assert s.agreement.prompts == 0 and s.agreement.share is None


@pytest.mark.parametrize("capture", ["token_ids", "tokens", "text"])
def test_any_batching_gives_the_same_summary(tmp_path, capture):
    """Batches of one row, of failed requests only, or of a mix: the streamed result does not depend on them."""
    from detaudit.analysis.run_reader import TableReader
    from detaudit.analysis.summary import analyze
    from detaudit.rundir.io import load_manifest

    rng = random.Random(5)
    seqs = [[rng.randrange(4) for _ in range(rng.randrange(6))] for _ in range(60)]
    rows = {"token_ids": ids_rows(seqs), "tokens": token_rows([[f"é{t}" for t in s] for s in seqs])}.get(
        capture, [{"text": "".join(map(str, s))} for s in seqs]
    )
    failed = [{"status": "error", "error": "timeout"}]
    path = make_run(tmp_path, failed * 5 + rows[:30] + failed * 9 + rows[30:], capture=capture)
    streamed = summarize_run(path, Limits(forks=1000))
    for batch_rows in (1, 2, 7):
        reader = TableReader(read_samples(path), batch_rows=batch_rows)
        assert analyze(load_manifest(path), reader, Limits(forks=1000))[0] == streamed
