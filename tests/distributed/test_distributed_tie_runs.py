"""Threshold ties on ranks that each hold one run of whole keys (how ``merge_to`` splits a model).

The global trim keeps, of the entries equal to a task's threshold, the first ``ties_to_keep``
in key then flat order. When every key lies whole on one rank and each rank's keys are one
run of that order, a rank's ties are one block of it: its budget is what the ranks before it
left, capped by its own tie count, which its bracket pass has already counted. Given inputs
with thousands of exact ties at every threshold (float32 and bf16), runs in and out of rank
order, and k values that cut the ties inside the first rank's block, inside a later rank's
block or not at all, every rank's pieces are the one process's bits, the ties came from the
bracket counts (no reading pass), and each rank's share of the ties is the one worked out
here by hand from the global order.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import RangeSource, run_gloo, run_threads

from lightning_ties.merging import MergeOptions, TaskVectorMerger, merged_task_vector
from lightning_ties.merging.thresholds import ThresholdFinder

SHAPES = {"a": (900,), "b": (30, 40), "c": (5,), "d": (20, 24), "e": (700,)}
#: per case: each key's rank (one run per rank; a rank may come before a lower one, or hold nothing)
RUNS = {2: [0, 0, 0, 1, 1], 3: [2, 2, 0, 1, 1], "3-late": [0, 1, 1, 1, 2], "3-idle": [0, 0, 2, 2, 2]}


def tie_models(seed: int, dtype: torch.dtype, n_tasks: int = 3):
    """Zero base and task vectors of magnitude 1 + j * 2**-7 (a bf16 grid): thousands of exact ties per value."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.zeros(s, dtype=dtype) for k, s in SHAPES.items()}
    fts = []
    for _ in range(n_tasks):
        ft = {}
        for key, shape in SHAPES.items():
            magnitude = 1 + torch.randint(0, 12, shape, generator=g) / 128
            ft[key] = (magnitude * (torch.rand(shape, generator=g) - 0.5).sign()).to(dtype)
        fts.append(ft)
    return base, fts


def run_pieces(collectives, runs: list[int], k: float, dtype_name: str, seed: int):
    """One rank's merge of its whole keys (the bracket forced on these small inputs), and how the ties were shared."""
    dtype = getattr(torch, dtype_name)
    base, fts = tie_models(seed, dtype)
    shards = {key: (0, base[key].numel()) if runs[j] == collectives.rank else (0, 0) for j, key in enumerate(base)}
    sources = [RangeSource(sd, shards, f"m{i}") for i, sd in enumerate([base, *fts])]
    merger = TaskVectorMerger(sources[0], sources[1:], MergeOptions("ties", k=k), collectives=collectives, shards=shards)
    merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512
    shared = []
    original = merger.finder._run_budgets

    def spy(*args):
        shared.append(original(*args))
        return shared[-1]

    merger.finder._run_budgets = spy  # type: ignore[method-assign]
    pieces = {key: tau for key, tau in merger if tau.numel()}
    return pieces, merger.thresholds, shared


def expected_shares(runs: list[int], k: float, dtype: torch.dtype, seed: int, world: int):
    """Per rank and task, the ties it keeps: the first ties_to_keep of the global (key, flat) order, by hand."""
    base, fts = tie_models(seed, dtype)
    single = TaskVectorMerger(base, fts, MergeOptions("ties", k=k))
    single.finder.min_bracketed, single.finder.sample_size = 1000, 512
    list(single)
    shares = [[0] * len(fts) for _ in range(world)]
    for i, (ft, t) in enumerate(zip(fts, single.thresholds)):
        left = t.ties_to_keep if 0 < t.ties_to_keep < t.n_equal else 0
        for j, key in enumerate(SHAPES):
            found = int(((ft[key].float() - base[key].float()).abs() == t.value).sum())
            shares[runs[j]][i] += min(left, found)
            left -= min(left, found)
    return shares, single.thresholds


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(RUNS))
@pytest.mark.parametrize("k", [0.05, 0.2, 0.45, 0.8])
def test_runs_of_whole_keys_keep_the_one_process_ties(case, k: float, dtype: str) -> None:
    # given keys split into one run per rank, a threshold with many ties that the bracket pass
    # counted (k=0.05: too near the top for a bracket, the radix passes find it: ties by reading)
    runs = RUNS[case]
    world = max(runs) + 1
    seed = 3
    base, fts = tie_models(seed, getattr(torch, dtype))
    expected = merged_task_vector(base, fts, MergeOptions("ties", k=k))
    shares, thresholds = expected_shares(runs, k, getattr(torch, dtype), seed, world)
    assert any(0 < t.ties_to_keep < t.n_equal for t in thresholds)  # ties cut, not all kept
    # when every rank merges its run
    results = run_threads(world, run_pieces, runs, k, dtype, seed)
    # then the ties came from the bracket counts on every rank (no reading pass) ...
    for rank, (_, found, shared) in enumerate(results):
        assert [t.value for t in found] == [t.value for t in thresholds]
        assert len(shared) == 1 and (shared[0] is None) == (k == 0.05), rank
        if shared[0] is None:
            continue
        budget = next(row for row in shared[0] if row is not None) if any(r is not None for r in shared[0]) else None
        if rank in runs:  # its one budget row: the share the global order gives it
            partial = [0 < t.ties_to_keep < t.n_equal for t in thresholds]
            assert [b if p else 0 for b, p in zip(budget, partial)] == shares[rank]
    # ... and the merged pieces are the one process's bits
    for j, key in enumerate(SHAPES):
        piece = results[runs[j]][0][key]
        assert torch.equal(piece.view(torch.int32), expected[key].view(torch.int32)), key


def test_the_cases_cut_ties_inside_every_rank_s_block() -> None:
    # the k values above cut some task's ties inside the first rank's block and inside a later one's
    cuts = set()
    for k in (0.2, 0.45, 0.8):
        for case, runs in RUNS.items():
            world = max(runs) + 1
            shares, thresholds = expected_shares(runs, k, torch.float32, 3, world)
            order = list(dict.fromkeys(runs))
            for i, t in enumerate(thresholds):
                if 0 < t.ties_to_keep < t.n_equal:
                    taking = [r for r in order if shares[r][i]]
                    cuts.add("first" if taking == order[:1] else "later")
    assert cuts == {"first", "later"}


def test_a_split_key_counts_ties_by_reading() -> None:
    # given one key split over the ranks: no run of whole keys, the budgets come from reading
    def run(collectives):
        base, fts = tie_models(5, torch.float32)
        shards = {key: (0, base[key].numel()) if collectives.rank == 0 else (0, 0) for key in base}
        shards["a"] = (0, 400) if collectives.rank == 0 else (400, 900)
        sources = [RangeSource(sd, shards, f"m{i}") for i, sd in enumerate([base, *fts])]
        merger = TaskVectorMerger(sources[0], sources[1:], MergeOptions("ties", k=0.3), collectives=collectives, shards=shards)
        merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512
        calls = []
        original = merger.finder._run_budgets
        merger.finder._run_budgets = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
        return dict(merger), calls

    base, fts = tie_models(5, torch.float32)
    expected = merged_task_vector(base, fts, MergeOptions("ties", k=0.3))
    (zero, calls0), (one, calls1) = run_threads(2, run)
    assert calls0 == calls1 == []
    assert torch.equal(torch.cat([zero["a"].reshape(-1), one["a"].reshape(-1)]), expected["a"].reshape(-1))
    for key in ("b", "c", "d", "e"):
        assert torch.equal(zero[key], expected[key]), key


def gloo_pieces(collectives, runs, k, dtype_name, seed):
    pieces, thresholds, shared = run_pieces(collectives, runs, k, dtype_name, seed)
    return pieces, [t.value for t in thresholds], shared


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_runs_of_whole_keys_on_gloo_processes() -> None:
    # given 3 real gloo processes holding runs out of rank order, bf16 inputs full of ties
    runs, k, seed = RUNS[3], 0.2, 7
    base, fts = tie_models(seed, torch.bfloat16)
    expected = merged_task_vector(base, fts, MergeOptions("ties", k=k))
    # when each merges its run
    results = run_gloo(3, "test_distributed_tie_runs:gloo_pieces", runs, k, "bfloat16", seed, timeout=60)
    # then the ties came from the bracket counts and the pieces are the one process's bits
    assert all(shared and shared[0] is not None for _, _, shared in results)
    for j, key in enumerate(SHAPES):
        assert torch.equal(results[runs[j]][0][key].view(torch.int32), expected[key].view(torch.int32)), key


def test_bracket_counts_are_not_kept_in_one_process() -> None:
    base, fts = tie_models(1, torch.float32)
    merger = TaskVectorMerger(base, fts, MergeOptions("ties", k=0.2))
    merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512
    list(merger)
    assert isinstance(merger.finder, ThresholdFinder) and merger.finder._bracket_counts is None
