"""Properties of the engine that hold for every input (hypothesis).

Values are small dyadic rationals (i / 256): task vectors and their sums are then exact in
float32, so properties can be checked bit for bit, and the many equal magnitudes exercise the
tie rule at the trim threshold.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ties import ties_merge
from lightning_ties.merging import MergeSpec, TaskVectorMerger, elect_sign, merged_task_vector, trim

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def models(draw, n_tasks=st.integers(1, 5), dtype: torch.dtype = torch.float32):
    """(base, [fine-tuned]) over 1-3 keys of random shapes with dyadic values."""
    n = draw(n_tasks)
    shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=2), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def values(shape):
        return (torch.randint(-24, 25, shape, generator=g) / 8.0).to(dtype)

    base = {f"p{i}": values(s) for i, s in enumerate(shapes)}
    fts = [{k: values(v.shape) for k, v in base.items()} for _ in range(n)]
    return base, fts


ks = st.sampled_from([0.1, 0.2, 0.35, 0.5, 0.8, 1.0])
scopes = st.sampled_from(["global", "per_tensor"])
signs = st.sampled_from(["mass", "count"])
merges = st.sampled_from(["mean", "sum", "max"])


@PROPERTY_SETTINGS
@given(models(n_tasks=st.just(1)), scopes)
def test_one_task_no_trim_lam_one_gives_back_the_fine_tuned_model(data, scope) -> None:
    base, (ft,) = data
    merged = ties_merge(base, [ft], k=1.0, lam=1.0, scope=scope)
    for key in base:
        assert torch.equal(merged[key], ft[key]), key


@PROPERTY_SETTINGS
@given(models(), ks, scopes, signs, merges, st.randoms())
def test_permuting_the_tasks_changes_nothing(data, k, scope, sign, merge, rnd) -> None:
    base, fts = data
    spec = MergeSpec(k=k, scope=scope, sign=sign, merge=merge)
    shuffled = list(fts)
    rnd.shuffle(shuffled)
    a, b = merged_task_vector(base, fts, spec), merged_task_vector(base, shuffled, spec)
    for key in base:
        assert torch.equal(a[key], b[key]), key


@PROPERTY_SETTINGS
@given(models(), ks, signs, merges)
def test_every_non_zero_merged_entry_has_the_elected_sign(data, k, sign, merge) -> None:
    base, fts = data
    keys = list(base)
    tau = merged_task_vector(base, fts, MergeSpec(k=k, scope="global", sign=sign, merge=merge))
    taus = torch.stack([torch.cat([(ft[key] - base[key]).reshape(-1) for key in keys]) for ft in fts])
    gamma = elect_sign(trim(taus, k), sign)  # one flat vector: the global scope
    merged = torch.cat([tau[key].reshape(-1) for key in keys])
    nonzero = merged != 0
    assert torch.equal(merged[nonzero].sign(), gamma[nonzero])


@PROPERTY_SETTINGS
@given(models(), ks, scopes, st.sampled_from(["mass", "count", "normfrac", "normmass"]), st.sampled_from([1, 3, 7]))
def test_results_are_bitwise_identical_across_runs_and_chunk_sizes(data, k, scope, sign, chunk_size) -> None:
    base, fts = data
    spec = MergeSpec(k=k, scope=scope, sign=sign)
    reference = dict(TaskVectorMerger(base, fts, spec))
    again = dict(TaskVectorMerger(base, fts, spec))
    chunked = dict(TaskVectorMerger(base, fts, spec, chunk_size=chunk_size))
    for key in base:
        assert torch.equal(reference[key], again[key]), key
        assert torch.equal(reference[key], chunked[key]), (key, chunk_size)


@PROPERTY_SETTINGS
@given(models(), ks, scopes)
def test_integer_and_bool_buffers_come_from_base(data, k, scope) -> None:
    base, fts = data
    base = {**base, "num_batches_tracked": torch.tensor(3), "mask": torch.tensor([True, False])}
    fts = [{**ft, "num_batches_tracked": torch.tensor(100 + i), "mask": torch.tensor([False, True])} for i, ft in enumerate(fts)]
    merged = ties_merge(base, fts, k=k, scope=scope)
    assert torch.equal(merged["num_batches_tracked"], base["num_batches_tracked"])
    assert torch.equal(merged["mask"], base["mask"])
    assert "not floating point" in merged.report.skipped["num_batches_tracked"]
    assert "mask" in merged.report.skipped


@PROPERTY_SETTINGS
@given(st.data(), st.sampled_from([torch.bfloat16, torch.float16, torch.float64]), ks, scopes, st.sampled_from([0.5, 1.0, 1.7]))
def test_dtypes_are_preserved_and_results_are_the_compute_dtype_merge_rounded(data, dtype, k, scope, lam) -> None:
    base, fts = data.draw(models(dtype=dtype))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    merged = ties_merge(base, fts, k=k, lam=lam, scope=scope, compute_dtype=compute)
    upcast = lambda sd: {key: v.to(compute) for key, v in sd.items()}  # noqa: E731
    tau = merged_task_vector(upcast(base), [upcast(ft) for ft in fts], MergeSpec(k=k, scope=scope), compute_dtype=compute)
    for key, b in base.items():
        assert tau[key].dtype == compute
        assert merged[key].dtype == dtype
        assert torch.equal(merged[key], (b.to(compute) + lam * tau[key]).to(dtype)), key


@pytest.mark.parametrize("grid", [False, True, "mixed"])
def test_several_torch_threads_merge_the_one_thread_bits(grid: bool | str) -> None:
    # the CPU merge pass cuts a key's columns over torch's threads (threshold ties shared out in
    # flat order, contested entries per range): the merge is the one-thread merge, bit for bit.
    # "mixed": only tasks 0 and 2 have ties cut at their threshold (the ranges count theirs alone)
    g = torch.Generator().manual_seed(9)

    def values(n, on_grid=grid is True):
        return torch.randint(-8, 8, (n,), generator=g) / 4 if on_grid else torch.randn(n, generator=g)

    base = {"a": values(30000), "b": values(100), "c": values(9000)}
    fts = [{k: v + values(v.numel(), grid is True or (grid == "mixed" and t % 2 == 0)) for k, v in base.items()} for t in range(4)]
    specs = [
        MergeSpec(k=0.3), MergeSpec(k=0.2, sign="count", merge="max"), MergeSpec(k=0.5, merge="sum"),
        MergeSpec(k=0.4, scope="per_tensor", merge="task_mean"), MergeSpec(k=1.0),
    ]  # fmt: skip
    before = torch.get_num_threads()
    for spec in specs:
        torch.set_num_threads(1)
        one = dict(TaskVectorMerger(base, fts, spec, chunk_size=1000))
        torch.set_num_threads(3)
        try:
            merger = TaskVectorMerger(base, fts, spec, chunk_size=1000)
            several = dict(merger)
            assert torch.get_num_threads() == 3 and merger.ties_pass._pool is None  # the threads are gone, the setting kept
        finally:
            torch.set_num_threads(before)
        for key in one:
            assert torch.equal(one[key].view(torch.int32), several[key].view(torch.int32)), (grid, spec, key)


def test_the_merge_pass_workers_run_their_torch_ops_on_one_thread() -> None:
    # a thread's first torch call copies the process default into its own setting: the pool's
    # workers must keep 1 after the caller restores its own value (else every worker runs its
    # ops on all of torch's threads, and two workers ask for twice the cores)
    from lightning_ties.merging.reading import single_threaded_pool

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with single_threaded_pool(2) as pool:
            seen = list(pool.map(lambda _: (torch.get_num_threads(), torch.ones(4).sum().item(), torch.get_num_threads()), range(4)))
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, 4.0, 1)] * 4
