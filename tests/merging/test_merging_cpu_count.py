"""The CPU bracket pass's compiled count (numba) gives the torch path's counts, hence the same merge, bit for bit.

Given tie-heavy task vectors (exact ties, zeros of both signs, denormals) over several keys, sampled into a
bracket on a small model, when the bracket pass counts with the compiled loop (forced on: it normally waits for
2^27 entries) on 1, 2 or 3 worker threads, then the thresholds and tau_m equal the torch path's (numba off) bit
for bit; a NaN or Inf is refused naming the task and key as before; keys that are not float32 (bf16 checkpoints)
are counted by the torch path in the same pass; and ``LIGHTNING_TIES_NUMBA=0`` or a small pass leaves it unused.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from lightning_ties.merging import MergeSpec, TaskVectorMerger, cpu_count, thresholds  # noqa: E402


def _merge(base, fts, compiled: bool, monkeypatch: pytest.MonkeyPatch, threads: int = 1, **spec):
    """tau_m and thresholds of a bracketed merge, counted by the compiled loop or by torch's ops."""
    for name in ("MIN_ENTRIES", "MIN_LOADED_ENTRIES"):
        monkeypatch.setattr(cpu_count, name, 0 if compiled else 1 << 62)
    used = []
    original = thresholds._BracketCounts._count_compiled
    monkeypatch.setattr(thresholds._BracketCounts, "_count_compiled",
                        lambda self, *a: used.append(1) or original(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        merger = TaskVectorMerger(base, fts, MergeSpec(**{"k": 0.3, **spec}), chunk_size=700)
        merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512  # a sampled bracket on a small model
        return dict(merger), merger.thresholds, bool(used)
    finally:
        torch.set_num_threads(before)


def _tasks(n_tasks: int = 3, seed: int = 0):
    """Task vectors whose magnitudes are a few thousand bit patterns around 0.01 (a bracket the histogram
    holds), with many exact ties, both signs, exact zeros and -0.0, and denormals (key ``b``, over a zero base)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps
    base = {"w": torch.randn(40, 100, generator=g), "b": torch.zeros(2500), "s": torch.randn(1, generator=g)}

    def dense(shape):
        magnitude = 0.01 * (1 + torch.randint(0, 300, shape, generator=g) * 4 * eps)
        return magnitude * (torch.rand(shape, generator=g) - 0.5).sign()

    fts = []
    for _ in range(n_tasks):
        ft = {k: v + dense(v.shape) for k, v in base.items()}
        b = ft["b"]
        b[torch.rand(b.shape, generator=g) < 0.2] = 0.0
        b[torch.rand(b.shape, generator=g) < 0.1] = -0.0
        b[:50] = torch.finfo(torch.float32).tiny / 2 ** torch.randint(1, 20, (50,), generator=g)  # denormals
        fts.append(ft)
    return base, fts


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_compiled_count_merges_as_the_torch_path_bit_for_bit(threads, seed, monkeypatch) -> None:
    base, fts = _tasks(seed=seed)
    expected, expected_thresholds, used = _merge(base, fts, False, monkeypatch, threads)
    assert not used
    got, got_thresholds, used = _merge(base, fts, True, monkeypatch, threads)
    assert used  # the compiled loop counted
    assert got_thresholds == expected_thresholds
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


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
    expected, expected_thresholds, _ = _merge(base, fts, False, monkeypatch)
    got, got_thresholds, used = _merge(base, fts, True, monkeypatch)
    assert used and got_thresholds == expected_thresholds
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_the_compiled_count_waits_for_a_pass_that_repays_loading_it_and_can_be_turned_off(monkeypatch) -> None:
    cpu_count._compiled.cache_clear()  # a fresh process: not loaded yet
    assert cpu_count.bracket_counter(cpu_count.MIN_ENTRIES - 1) is None  # too small to repay loading it
    assert cpu_count.bracket_counter(cpu_count.MIN_ENTRIES) is not None
    # once loaded, smaller passes use it too
    assert cpu_count.bracket_counter(cpu_count.MIN_LOADED_ENTRIES) is not None
    assert cpu_count.bracket_counter(cpu_count.MIN_LOADED_ENTRIES - 1) is None
    monkeypatch.setenv("LIGHTNING_TIES_NUMBA", "0")
    assert cpu_count.bracket_counter(cpu_count.MIN_ENTRIES, force=True) is None


def test_the_counter_counts_below_inside_above_and_nonfinite_by_hand() -> None:
    count = cpu_count.bracket_counter(force=True)
    bits = lambda v: int(torch.tensor(v, dtype=torch.float32).view(torch.int32))  # noqa: E731
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    ft = torch.tensor([1.25, 0.0, 3.0, 1.5, -1.0, 1.0, float("inf"), float("nan")])  # |tau|: .25 1 2 .5 2 0 inf nan
    hist, counts = torch.zeros(bits(1.0) - bits(0.5) + 1, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    count(base, ft, bits(0.5), bits(1.0), hist, counts)
    assert counts.tolist() == [2, 4, 2]  # below 0.5: .25, 0; above 1.0: 2, 2, inf, nan; nonfinite: inf, nan
    assert int(hist.sum()) == 2 and int(hist[0]) == 1 and int(hist[-1]) == 1  # 0.5 and 1.0, the bracket's ends
