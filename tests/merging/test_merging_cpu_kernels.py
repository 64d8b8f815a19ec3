"""TIES's compiled CPU loops (numba) give the torch path's bits: the bracket pass's counts and the merge pass.

Given tie-heavy task vectors (exact ties, zeros of both signs, denormals, one key whose sums over tasks round)
over several keys, sampled into a bracket on a small model, when the compiled loops count and merge (forced on:
they normally wait for 2^28 entries) on 1, 2 or 3 worker threads, for 1 to 4 tasks, global and per-tensor trims,
then the thresholds and tau_m equal the torch path's (numba off) bit for bit, the chunks the merge loop hands
back (threshold ties a task keeps in part, contested entries) included; a NaN or Inf is refused with the torch
path's message; other recipes (sign "count", merge "max") and dtypes (bf16 checkpoints) keep the torch ops; and
``LIGHTNING_TIES_NUMBA=0`` or a merge too small to repay loading them leaves them unused.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from lightning_ties.merging import MergeSpec, TaskVectorMerger, cpu_kernels, thresholds, ties_pass  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _unloaded_afterwards():
    """Leave the process as if the loops were never loaded: later tests' merges keep the torch ops."""
    yield
    cpu_kernels._count_loop.cache_clear()
    cpu_kernels._merge_loop.cache_clear()


def _merge(base, fts, compiled: bool, monkeypatch: pytest.MonkeyPatch, threads: int = 1, **spec):
    """tau_m and thresholds of a bracketed merge, counted and merged by the compiled loops or by torch's ops;
    whether the compiled count ran, and how many chunks the compiled merge merged and handed back."""
    for name in ("MIN_ENTRIES", "MIN_LOADED_ENTRIES"):
        monkeypatch.setattr(cpu_kernels, name, 0 if compiled else 1 << 62)
    used, merged = [], {"compiled": 0, "handed back": 0}
    original = thresholds._BracketCounts._count_compiled
    monkeypatch.setattr(thresholds._BracketCounts, "_count_compiled",
                        lambda self, *a: used.append(1) or original(self, *a))
    original_merge = cpu_kernels.ties_merger

    def counting_merger(*args, **kwargs):
        merge = original_merge(*args, **kwargs)
        if merge is None:
            return None

        def counted(*a):
            result = merge(*a)
            merged["handed back" if result[1] else "compiled"] += 1
            return result

        return counted

    monkeypatch.setattr(ties_pass, "ties_merger", counting_merger)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merger = TaskVectorMerger(base, fts, MergeSpec(**{"k": 0.3, **spec}), chunk_size=100)
        merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512  # a sampled bracket on a small model
        return dict(merger), merger.thresholds, bool(used), merged
    finally:
        torch.set_num_threads(before)


def _tasks(n_tasks: int = 3, seed: int = 0):
    """Task vectors whose magnitudes are mostly a few thousand bit patterns around 0.01 (a bracket the histogram
    holds), with many exact ties, both signs, exact zeros and -0.0, denormals (key ``b``, over a zero base), and
    one key (``r``) whose magnitudes spread over decades, so that sums over tasks round."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps
    base = {"w": torch.randn(40, 100, generator=g), "b": torch.zeros(2500), "s": torch.randn(1, generator=g),
            "r": torch.randn(2000, generator=g)}

    def dense(shape):
        magnitude = 0.01 * (1 + torch.randint(0, 300, shape, generator=g) * 4 * eps)
        return magnitude * (torch.rand(shape, generator=g) - 0.5).sign()

    fts = []
    for _ in range(n_tasks):
        ft = {k: v + dense(v.shape) for k, v in base.items()}
        # key r: magnitudes spread over decades, whose sums over tasks round (their order shows)
        ft["r"] = base["r"] + torch.randn(2000, generator=g) * 10 ** torch.empty(2000).uniform_(-3, -1, generator=g)
        b = ft["b"]
        b[torch.rand(b.shape, generator=g) < 0.2] = 0.0
        b[torch.rand(b.shape, generator=g) < 0.1] = -0.0
        b[:50] = torch.finfo(torch.float32).tiny / 2 ** torch.randint(1, 20, (50,), generator=g)  # denormals
        fts.append(ft)
    return base, fts


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("seed", "n_tasks", "scope"), [(0, 3, "global"), (1, 2, "global"), (2, 1, "global"),
                                                        (3, 4, "global"), (4, 3, "per_tensor")])
def test_the_compiled_loops_merge_as_the_torch_path_bit_for_bit(threads, seed, n_tasks, scope, monkeypatch) -> None:
    base, fts = _tasks(n_tasks, seed=seed)
    expected, expected_thresholds, used, merged = _merge(base, fts, False, monkeypatch, threads, scope=scope)
    assert not used and merged == {"compiled": 0, "handed back": 0}
    got, got_thresholds, used, merged = _merge(base, fts, True, monkeypatch, threads, scope=scope)
    assert used == (scope == "global")  # the compiled count (the per-tensor thresholds are too small to bracket)
    assert merged["compiled"] > 0  # chunks the compiled merge merged ...
    if n_tasks > 1:
        assert merged["handed back"] > 0  # ... and chunks it handed back (threshold ties, contested entries)
    assert got_thresholds == expected_thresholds
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
        assert not torch.signbit(got[key][got[key] == 0]).any()  # every zero +0.0, as the torch path writes


def test_other_recipes_and_dtypes_keep_the_torch_merge(monkeypatch) -> None:
    base, fts = _tasks()
    for spec in ({"sign": "count"}, {"merge": "max"}):
        _, _, _, merged = _merge(base, fts, True, monkeypatch, **spec)
        assert merged == {"compiled": 0, "handed back": 0}, spec
    bf16 = [{k: v.to(torch.bfloat16) for k, v in ft.items()} for ft in fts]
    expected, *_ = _merge(base, bf16, False, monkeypatch)
    got, _, _, merged = _merge(base, bf16, True, monkeypatch)
    assert merged == {"compiled": 0, "handed back": 0}
    assert all(torch.equal(got[key], expected[key]) for key in expected)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_inf_is_refused_naming_the_task_and_key(value, monkeypatch) -> None:
    base, fts = _tasks()
    fts[1]["b"][17] = value
    with pytest.raises(ValueError) as torch_path:
        _merge(base, fts, False, monkeypatch)
    with pytest.raises(ValueError) as compiled:
        _merge(base, fts, True, monkeypatch)
    assert str(compiled.value) == str(torch_path.value)
    assert "at 'b' holds NaN or Inf" in str(compiled.value)


def test_keys_of_other_dtypes_are_counted_by_torch_in_the_same_pass(monkeypatch) -> None:
    base, fts = _tasks()
    fts = [{k: (v.to(torch.bfloat16) if k == "b" else v) for k, v in ft.items()} for ft in fts]  # one bf16 key
    expected, expected_thresholds, _, _ = _merge(base, fts, False, monkeypatch)
    got, got_thresholds, used, _ = _merge(base, fts, True, monkeypatch)
    assert used and got_thresholds == expected_thresholds
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_the_compiled_count_waits_for_a_pass_that_repays_loading_it_and_can_be_turned_off(monkeypatch) -> None:
    cpu_kernels._count_loop.cache_clear()  # a fresh process: not loaded yet
    assert cpu_kernels.bracket_counter(cpu_kernels.MIN_ENTRIES - 1) is None  # too small to repay loading it
    assert cpu_kernels.bracket_counter(cpu_kernels.MIN_ENTRIES) is not None
    # once loaded, smaller passes use it too
    assert cpu_kernels.bracket_counter(cpu_kernels.MIN_LOADED_ENTRIES) is not None
    assert cpu_kernels.bracket_counter(cpu_kernels.MIN_LOADED_ENTRIES - 1) is None
    cpu_kernels._merge_loop.cache_clear()
    assert cpu_kernels.ties_merger(cpu_kernels.MIN_ENTRIES - 1) is None
    assert cpu_kernels.ties_merger(cpu_kernels.MIN_ENTRIES) is not None
    monkeypatch.setenv("LIGHTNING_TIES_NUMBA", "0")
    assert cpu_kernels.bracket_counter(cpu_kernels.MIN_ENTRIES, force=True) is None
    assert cpu_kernels.ties_merger(cpu_kernels.MIN_ENTRIES, force=True) is None


def test_the_counter_counts_below_inside_above_and_nonfinite_by_hand() -> None:
    count = cpu_kernels.bracket_counter(force=True)
    bits = lambda v: int(torch.tensor(v, dtype=torch.float32).view(torch.int32))  # noqa: E731
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    ft = torch.tensor([1.25, 0.0, 3.0, 1.5, -1.0, 1.0, float("inf"), float("nan")])  # |tau|: .25 1 2 .5 2 0 inf nan
    hist, counts = torch.zeros(bits(1.0) - bits(0.5) + 1, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    count(base, ft, bits(0.5), bits(1.0), hist, counts)
    assert counts.tolist() == [2, 4, 2]  # below 0.5: .25, 0; above 1.0: 2, 2, inf, nan; nonfinite: inf, nan
    assert int(hist.sum()) == 2 and int(hist[0]) == 1 and int(hist[-1]) == 1  # 0.5 and 1.0, the bracket's ends
