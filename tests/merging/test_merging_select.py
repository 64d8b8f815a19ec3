"""The exact streaming threshold equals the sort/kthvalue one, whatever the data holds."""

from __future__ import annotations

import pytest
import torch

from lightning_ties.merging import MagnitudeSelector, keep_count, top_magnitude_threshold


def awkward_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with many exact ties, zeros (both signs) and denormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    x[torch.rand(n, generator=g) < 0.3] = 0.0
    x[torch.rand(n, generator=g) < 0.1] = -0.0
    tied = torch.rand(n, generator=g) < 0.3
    x[tied] = torch.tensor([0.5, -0.5, 1.25])[torch.randint(0, 3, (int(tied.sum()),), generator=g)].double()
    x = x.to(dtype)
    tiny = torch.finfo(dtype).tiny
    denormal = torch.rand(n, generator=g) < 0.1
    steps = torch.randint(1, 50, (int(denormal.sum()),), generator=g).to(dtype)
    x[denormal] = steps * (tiny / 2**20) * torch.where(torch.rand(steps.shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    assert bool((x[denormal] != 0).all()) and bool((x[denormal].abs() < tiny).all())
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0.01, 0.05, 0.2, 0.5, 0.65, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_equals_kthvalue(dtype: torch.dtype, k: float, seed: int) -> None:
    x = awkward_values(5003, dtype, seed)
    n = x.numel()
    m = keep_count(k, n)
    expected = x.abs().kthvalue(n - m + 1).values  # the m-th largest magnitude
    got = top_magnitude_threshold(x, k)
    assert got.value == expected.item()
    assert got.n_greater == int((x.abs() > expected).sum())
    assert got.n_equal == int((x.abs() == expected).sum())
    assert got.kept == m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_over_a_stream_of_tensors_equals_the_flattened_one(dtype: torch.dtype) -> None:
    parts = [awkward_values(n, dtype, seed) for seed, n in enumerate([1, 700, 33, 4000])]
    flat = torch.cat(parts)
    m = keep_count(0.3, flat.numel())
    expected = flat.abs().kthvalue(flat.numel() - m + 1).values.item()
    assert top_magnitude_threshold(parts, 0.3).value == expected


def test_threshold_of_denormals_only() -> None:
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]) * tiny / 8
    assert top_magnitude_threshold(x, 0.5).value == x[2].item()


def test_keep_count_is_int_k_n() -> None:
    assert keep_count(0.2, 10) == 2
    assert keep_count(0.2, 9) == 1
    assert keep_count(1.0, 7) == 7


def test_selector_refuses_nan_and_inf_naming_the_tensor() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        sel = MagnitudeSelector(m=1)
        with pytest.raises(ValueError, match="layer.weight holds NaN or Inf"):
            sel.observe(torch.tensor([1.0, bad]), name="layer.weight")


def test_selector_result_before_the_end_is_an_error() -> None:
    sel = MagnitudeSelector(m=1)
    sel.observe(torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="not finished"):
        sel.result()


def test_selector_refuses_more_than_it_saw() -> None:
    sel = MagnitudeSelector(m=3)
    sel.observe(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="3-th largest of 2"):
        sel.next_pass()


def bracket_around(x: torch.Tensor, k: float, below: int, above: int) -> tuple[float, float]:
    """Magnitudes ``below`` ranks under and ``above`` ranks over the exact threshold's rank."""
    ranked = x.abs().sort(descending=True).values
    m = keep_count(k, x.numel())
    return ranked[min(x.numel() - 1, m - 1 + below)].item(), ranked[max(0, m - 1 - above)].item()


def select(x: torch.Tensor, k: float, bracket) -> tuple[MagnitudeSelector, int]:
    sel = MagnitudeSelector(keep_count(k, x.numel()), x.dtype, bracket)
    passes = 0
    while not sel.done:
        for part in x.split(777):
            sel.observe(part)
        sel.next_pass()
        passes += 1
    return sel, passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0.05, 0.2, 0.65])
@pytest.mark.parametrize(("below", "above"), [(0, 0), (3, 40), (200, 1)])
def test_a_bracket_holding_the_threshold_finds_it_in_one_pass(dtype, k, below, above) -> None:
    # given values a few bit patterns apart (a bracket spans at most 2**19 of them), with ties and zeros
    g = torch.Generator().manual_seed(7)
    step = 4 * torch.finfo(dtype).eps
    x = (1 + torch.randint(0, 3000, (5003,), generator=g).to(dtype) * step) * (torch.rand(5003, generator=g) - 0.5).sign().to(dtype)
    x[:400] = 0.0
    sel, passes = select(x, k, bracket_around(x, k, below, above))
    assert sel.result() == top_magnitude_threshold(x, k)
    assert passes == 1 and sel.used_bracket


@pytest.mark.parametrize(
    "bracket",
    [(10.0, 10.00001), (0.0, 1e-40), (1e-3, 1.0001e-3)],
    ids=["above-the-threshold", "zeros-and-denormals", "below-the-threshold"],
)
def test_a_bracket_that_misses_falls_back_to_the_exact_radix_passes(bracket) -> None:
    x = awkward_values(5003, torch.float32, seed=8)
    sel, passes = select(x, 0.2, bracket)
    assert sel.bracketed is False and passes > 1
    assert sel.result() == top_magnitude_threshold(x, 0.2)
    assert passes == 3 and not sel.used_bracket


def test_a_bracket_wider_than_the_histogram_is_ignored() -> None:
    sel = MagnitudeSelector(m=1, bracket=(1e-30, 1e30))
    assert not sel.bracketed


def test_the_bracket_pass_refuses_nan_and_inf() -> None:
    sel = MagnitudeSelector(m=1, bracket=(0.5, 0.50001))
    assert sel.bracketed
    with pytest.raises(ValueError, match="w holds NaN or Inf"):
        sel.observe(torch.tensor([0.7, float("inf")]), name="w")


def _bracketed_merger(base, fts, chunk_size=None, **spec):
    from lightning_ties.merging import MergeSpec, TaskVectorMerger

    merger = TaskVectorMerger(base, fts, MergeSpec(**spec), chunk_size=chunk_size)
    merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512  # a sampled bracket on a small model
    return merger


@pytest.mark.parametrize(("threads", "chunk_size"), [(1, None), (2, None), (1, 300), (3, 300)])
def test_the_batched_bracket_pass_counts_what_observe_counts(threads: int, chunk_size, monkeypatch: pytest.MonkeyPatch) -> None:
    # given tie-heavy task vectors over several keys, bracketed (batched CPU pass; small chunks:
    # each key's columns cut over the threads, the digit buffer emptied into the histograms
    # several times per key)
    from lightning_ties.merging import MergeSpec, TaskVectorMerger, thresholds

    monkeypatch.setattr(thresholds, "_DIGITS_BYTES", 3 * 4 * 700)  # 700 digits per task: 2 chunks of 300

    passes = []
    original = thresholds.ThresholdFinder._bracket_pass
    monkeypatch.setattr(thresholds.ThresholdFinder, "_bracket_pass", lambda self, *a: passes.append(original(self, *a)))

    g = torch.Generator().manual_seed(3)
    eps = torch.finfo(torch.float32).eps
    base = {f"k{j}": torch.zeros(n) for j, n in enumerate((4000, 2500, 1))}

    def dense(shape):  # magnitudes a few bit patterns apart (a bracket the histogram can hold), many ties
        signs = (torch.rand(shape, generator=g) - 0.5).sign()
        return (1 + torch.randint(0, 300, shape, generator=g) * 4 * eps) * signs

    fts = [{k: dense(v.shape) for k, v in base.items()} for _ in range(3)]
    expected = TaskVectorMerger(base, fts, MergeSpec(k=0.3))
    tau_expected = dict(expected)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merger = _bracketed_merger(base, fts, chunk_size, k=0.3)
        tau = dict(merger)
    finally:
        torch.set_num_threads(before)
    # then the thresholds (value, counts) and the merge are those of the radix passes
    assert len(passes) == 1 and merger.thresholds == expected.thresholds
    assert all(torch.equal(tau[k], tau_expected[k]) for k in tau)


@pytest.mark.parametrize(("threads", "where"), [(1, 7), (2, 7), (2, 1900)])
def test_the_batched_bracket_pass_names_the_task_and_key_of_a_nan(threads: int, where: int) -> None:
    # (2 threads, small chunks: the Inf in the first or the second thread's columns of 'b')
    g = torch.Generator().manual_seed(4)
    base = {"a": torch.randn(3000, generator=g), "b": torch.randn(2000, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    fts[1]["b"][where] = float("inf")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(ValueError, match=r"task vector of model\[1\] at 'b' holds NaN or Inf values"):
            dict(_bracketed_merger(base, fts, 250 if threads > 1 else None, k=0.2))
    finally:
        torch.set_num_threads(before)


def test_the_sample_and_the_counts_bookkeeping_run_on_one_thread_and_the_setting_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # on the CPU with several torch threads the bracket pass's workers take every core; the small
    # ops around them (the sample, closing the pass) run on this thread alone: an OpenMP team
    # there would spin between its ops on a busy machine, a core taken from the workers
    from lightning_ties.merging import select, thresholds

    seen = []
    sample, close = thresholds.ThresholdFinder.sample_brackets, select.MagnitudeSelector.next_pass
    def noting(fn):
        return lambda *a, **k: seen.append(torch.get_num_threads()) or fn(*a, **k)

    monkeypatch.setattr(thresholds.ThresholdFinder, "sample_brackets", noting(sample))
    monkeypatch.setattr(select.MagnitudeSelector, "next_pass", noting(close))
    g = torch.Generator().manual_seed(6)
    base = {"w": torch.zeros(6000)}
    eps = torch.finfo(torch.float32).eps  # magnitudes a few bit patterns apart: a bracket the histogram holds
    fts = [{"w": 1 + torch.randint(0, 3000, (6000,), generator=g) * 4 * eps} for _ in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        merger = _bracketed_merger(base, fts, 1000, k=0.2)
        dict(merger)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1] and after == 3  # the sample, then one pass closed per task


def test_a_selection_too_small_for_a_bracket_runs_its_radix_passes_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # a small model's thresholds are radix passes of small ops: on several torch threads each op
    # waits for the OpenMP team (on a busy machine, a descheduled one), so they run on one
    from lightning_ties import ties_merge
    from lightning_ties.merging import select

    seen = []
    observe = select.MagnitudeSelector.observe
    monkeypatch.setattr(select.MagnitudeSelector, "observe",
                        lambda self, *a, **k: seen.append(torch.get_num_threads()) or observe(self, *a, **k))
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.zeros(64, 64)}
    fts = [{"w": torch.randn(64, 64, generator=g)} for _ in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        merged = ties_merge(base, fts, k=0.2)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1} and after == 3
    assert torch.equal(merged["w"], ties_merge(base, fts, k=0.2)["w"])  # and the same bits as one thread gives


@pytest.mark.parametrize("threads", [1, 2])
def test_the_bracket_pass_on_ranks_never_reads_a_key_a_rank_holds_nothing_of(threads: int) -> None:
    # given 2 ranks where 'b' lies wholly on rank 0 and a source that cannot read what its rank
    # does not hold (merge_to's), bracketed: the thresholds and tau_m are one process's
    from distributed_utils import RangeSource, run_threads

    from lightning_ties.merging import MergeSpec, TaskVectorMerger

    class OwnRangeOnly(RangeSource):
        def get(self, key):
            start, stop = self.shards[key]
            assert stop > start, f"read {key!r} on a rank holding nothing of it"
            return super().get(key)

    g = torch.Generator().manual_seed(8)
    eps = torch.finfo(torch.float32).eps
    base = {"a": torch.zeros(3000), "b": torch.zeros(2000)}
    def dense(shape):  # magnitudes a few bit patterns apart, both signs: a bracket the histogram holds
        return (1 + torch.randint(0, 3000, shape, generator=g) * 4 * eps) * (torch.rand(shape, generator=g) - 0.5).sign()

    fts = [{k: dense(v.shape) for k, v in base.items()} for _ in range(2)]
    layout = {"a": [(0, 1300), (1300, 3000)], "b": [(0, 2000), (0, 0)]}

    def rank(collectives):
        torch.set_num_threads(threads)
        shards = {key: ranges[collectives.rank] for key, ranges in layout.items()}
        sources = [OwnRangeOnly(sd, shards, f"m{i}") for i, sd in enumerate([base, *fts])]
        merger = TaskVectorMerger(sources[0], sources[1:], MergeSpec(k=0.3), collectives=collectives, shards=shards, chunk_size=400)
        merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512
        return dict(merger), merger.thresholds, merger.finder.sample_brackets(["a", "b"], 1500, gather=True)

    before = torch.get_num_threads()
    try:
        pieces = run_threads(2, rank)
    finally:
        torch.set_num_threads(before)
    expected = TaskVectorMerger(base, fts, MergeSpec(k=0.3))
    one = dict(expected)
    assert all(p[2][0] is not None for p in pieces)  # bracketed
    assert pieces[0][1] == pieces[1][1] == expected.thresholds
    for key, ranges in layout.items():
        for r, (start, stop) in enumerate(ranges):
            assert torch.equal(pieces[r][0][key].reshape(-1), one[key].reshape(-1)[start:stop]), (key, r)
