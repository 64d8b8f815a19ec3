"""The CPU merge pass on several threads: threshold ties kept afterwards, in flat order, bit for bit.

With several torch threads :class:`~lightning_ties.merging.ties_pass.TiesPass` cuts a key's
columns into one range per thread. The ranges merge without the threshold ties a task may still
keep and note where they lie; then the first ones in (key, flat) order are kept and their
columns merged again. Whatever the threads, ranks and input dtype, the merge is the one thread's.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import RangeSource, run_gloo
from test_merging_distributed import LAYOUTS, grid_models, rank_shards

from lightning_ties.merging import MergeSpec, TaskVectorMerger
from lightning_ties.merging.contested import Contested
from lightning_ties.merging.select import MagnitudeThreshold
from lightning_ties.merging.steps import ThresholdTrim, disjoint_merge

SPECS = [MergeSpec(k=0.3), MergeSpec(k=0.2, sign="count", merge="max"), MergeSpec(k=0.5, merge="sum")]


def _threshold(value: float, kept: int = 2, n_greater: int = 1, n_equal: int = 3) -> MagnitudeThreshold:
    return MagnitudeThreshold(value, kept=kept, n_greater=n_greater, n_equal=n_equal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_in_finds_the_entries_at_the_threshold_by_their_bits(dtype: torch.dtype) -> None:
    # given |x| == 0.5 at positions 0, 1 and 4 (both signs), 0.25 and -0.0 elsewhere
    row = torch.tensor([0.5, -0.5, 0.25, -0.0, 0.5], dtype=dtype)
    trim_step = ThresholdTrim([_threshold(0.5), _threshold(0.75)], dtype)
    assert trim_step.ties_in(row, 0).tolist() == [0, 1, 4]
    assert trim_step.ties_in(row, 1) is None  # no entry at 0.75
    assert torch.equal(row, torch.tensor([0.5, -0.5, 0.25, -0.0, 0.5], dtype=dtype))  # not in place: untouched
    scratch = row.clone()
    assert trim_step.ties_in(scratch, 0, in_place=True).tolist() == [0, 1, 4]
    assert trim_step.ties_in(torch.empty(0, dtype=dtype), 0) is None


def test_a_watched_tasks_ties_are_listed_and_not_kept_up_to_its_count() -> None:
    # given task 0 watched for 3 ties (no budget) and task 1 with a budget of one tie at 0.5
    taus = torch.tensor([[0.5, 1.0, -0.5], [-0.5, 0.5, 2.0]])
    trim_step = ThresholdTrim([_threshold(0.5), _threshold(0.5)], torch.float32)
    trim_step.tie_budget, trim_step.watch = [0, 1], {0: 3}
    trimmed = trim_step(taus)
    # then task 0 keeps only |x| > 0.5 and lists its ties; task 1 keeps its first tie and spends its budget
    assert trimmed.tolist() == [[0.0, 1.0, 0.0], [-0.5, 0.0, 2.0]]
    assert [(task, pos.tolist()) for task, pos in trim_step.seen] == [(0, [0, 2])]
    assert trim_step.tie_budget == [0, 0] and trim_step.watch == {0: 1}
    # and the next chunk lists one more tie of task 0, then looks for none
    trim_step(torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert [(task, pos.tolist()) for task, pos in trim_step.seen] == [(0, [0])] and trim_step.watch == {}
    trim_step(torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert trim_step.seen == []


def test_contested_drop_forgets_the_entries_of_the_given_columns() -> None:
    c = Contested(disjoint_merge, "mean")
    trimmed = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 2.0, -3.0]])
    c.collect_columns(10, torch.tensor([0, 1, 2]), trimmed)
    c.drop(torch.tensor([11, 40]))
    assert c.index[0].tolist() == [10, 12] and c.negative[0].tolist() == [-1.0, -3.0]
    out = torch.zeros(13)
    c.resolve(out, sign_total=-1)
    assert out[10:].tolist() == [-1.0, 0.0, -3.0]


def _merge(base, fts, spec: MergeSpec, threads: int, chunk_size: int = 100) -> tuple[dict[str, torch.Tensor], list]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merger = TaskVectorMerger(base, fts, spec, chunk_size=chunk_size)
        return dict(merger), merger.thresholds
    finally:
        torch.set_num_threads(before)


def test_kept_ties_move_the_majority_sign_that_resolves_a_contested_entry() -> None:
    # given 2 tasks over 400 entries, 4 kept per task (k=0.01), merged on 2 threads (ranges [0, 200), [200, 400)):
    # task 0: +3 at 300, +2 at 0, and six entries at its threshold 1.0 (-1 at 150, 250..254): 2 of them kept;
    # task 1: -2 at 0 (so column 0 is contested), -5 at 310 and 311, +5 at 312
    tau = torch.zeros(2, 400)
    tau[0, [300, 0]] = torch.tensor([3.0, 2.0])
    tau[0, [150, 250, 251, 252, 253, 254]] = -1.0
    tau[1, [0, 310, 311, 312]] = torch.tensor([-2.0, -5.0, -5.0, 5.0])
    base = {"w": torch.zeros(400)}
    fts = [{"w": row.clone()} for row in tau]
    # when merged on one thread and on two (the tie columns merged again after the ranges)
    one, thresholds = _merge(base, fts, MergeSpec(k=0.01), threads=1)
    several, _ = _merge(base, fts, MergeSpec(k=0.01), threads=2)
    assert (thresholds[0].value, thresholds[0].ties_to_keep, thresholds[0].n_equal) == (1.0, 2, 6)
    # then the first two ties (150, 250) are kept: elected signs +1 (300) -1 -1 +1 (310..312) -1 -1 (ties) = -2 < 0,
    # so the contested column 0 takes the negative majority: -2 (without the kept ties' signs it would be +2)
    expected = torch.zeros(400)
    expected[[0, 150, 250, 300, 310, 311, 312]] = torch.tensor([-2.0, -1.0, -1.0, 3.0, -5.0, -5.0, 5.0])
    assert torch.equal(one["w"], expected) and torch.equal(several["w"], expected)


@pytest.mark.parametrize(("threads", "dtype"), [(2, torch.float32), (2, torch.bfloat16), (3, torch.bfloat16)])
def test_ties_at_the_threshold_over_keys_ranges_and_threads_merge_the_one_thread_bits(threads: int, dtype: torch.dtype) -> None:
    # given models on a grid of quarters: hundreds of entries at every task's threshold, in every
    # key and every thread's range, a budget that keeps some of them, exact zero sign scores and
    # a majority sign that only the whole model shows (keeping a tie can move it)
    for seed, spec in [(seed, spec) for seed in range(2) for spec in SPECS]:
        base, fts = grid_models(seed, dtype=dtype)
        one, thresholds = _merge(base, fts, spec, threads=1)
        partial = [t for t in thresholds if 0 < t.ties_to_keep < t.n_equal and t.value != 0.0]
        assert partial, (seed, spec)  # the case under test: ties cut at the threshold
        several, _ = _merge(base, fts, spec, threads=threads)
        for key in one:
            assert torch.equal(one[key].view(torch.int32), several[key].view(torch.int32)), (seed, spec, key)


def test_a_key_whose_ties_are_all_kept_or_none_needs_no_second_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    # given a tie-free model (random floats): the ranges note nothing and no column is merged again
    from lightning_ties.merging.ties_pass import TiesPass

    calls = []
    original = TiesPass._keep_ties
    monkeypatch.setattr(TiesPass, "_keep_ties", lambda self, *a: calls.append(a[3]) or original(self, *a))
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(5000, generator=g)}
    fts = [{"w": base["w"] + torch.randn(5000, generator=g)} for _ in range(3)]
    one, _ = _merge(base, fts, MergeSpec(k=0.3), threads=1)
    several, _ = _merge(base, fts, MergeSpec(k=0.3), threads=2)
    assert torch.equal(one["w"], several["w"]) and calls == []


def merge_pieces_on_threads(collectives, seed: int, dtype_name: str, threads: int) -> dict:
    """One rank's pieces of the TIES merge of ``grid_models``, its ranges merged on ``threads`` threads."""
    torch.set_num_threads(threads)
    base, fts = grid_models(seed, dtype=getattr(torch, dtype_name))
    shards = rank_shards(LAYOUTS[collectives.world_size], collectives.rank)
    sources = [RangeSource(sd, shards, f"model[{i}]") for i, sd in enumerate([base, *fts])]
    merger = TaskVectorMerger(sources[0], sources[1:], MergeSpec(k=0.3), collectives=collectives, shards=shards, chunk_size=100)
    return {key: tau.clone() for key, tau in merger}


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world_size", "dtype"), [(2, "float32"), (3, "bfloat16")])
def test_gloo_ranks_of_two_threads_keep_the_ties_across_the_rank_boundary_in_order(world_size: int, dtype: str) -> None:
    # given keys cut over 2-3 ranks (uneven, one rank empty) and each rank's range over 2 threads:
    # a task's ties at its threshold on both sides of a rank boundary; the budget goes in global order
    results = run_gloo(world_size, "test_merging_ties_pass:merge_pieces_on_threads", 2, dtype, 2, timeout=90)
    base, fts = grid_models(2, dtype=getattr(torch, dtype))
    expected, thresholds = _merge(base, fts, MergeSpec(k=0.3), threads=1)
    assert any(0 < t.ties_to_keep < t.n_equal for t in thresholds)
    for key, ranges in LAYOUTS[world_size].items():
        flat = expected[key].reshape(-1)
        for rank, (start, stop) in enumerate(ranges):
            piece = results[rank][key].reshape(-1)
            assert torch.equal(piece.view(torch.int32), flat[start:stop].view(torch.int32)), (key, rank)
