"""The fused Triton kernels (``merging/kernels.py``) give the eager engine's bits, and stay optional.

The kernels run on CUDA only; here they are pinned on the CPU in Triton's interpreter
(``TRITON_INTERPRET=1``, which must be set before Triton builds a kernel): each ``interp_*``
check runs in a subprocess (this file run as a script), so the pytest process keeps the real
kernels for the ``cuda`` tests. The fallbacks (no Triton, a kernel failing, the switch
``LIGHTNING_TIES_KERNELS=0``) are tested in-process, with or without Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys

if __name__ == "__main__":  # the interpreter checks: set before anything imports Triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from lightning_ties.merging import MergeSpec, TaskVectorMerger, kernels, steps, thresholds
from lightning_ties.merging.contested import Contested
from lightning_ties.merging.fused import FusedPaths
from lightning_ties.merging.select import MagnitudeSelector, MagnitudeThreshold, top_magnitude_threshold

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MERGES = ("mean", "sum", "max", "task_mean")


def grid_models(n_tasks: int, n: int, seed: int, dtype: torch.dtype = torch.float32):
    """Base on integers, task vectors on a grid of quarters: exact ties at thresholds, exact sign
    ties (+q and -q in one column), zeros (entries left unchanged)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 8, (n,), generator=g).to(dtype)
    fts = []
    for _ in range(n_tasks):
        step = torch.randint(-4, 5, (n,), generator=g).float() / 4  # -1 .. 1 in quarters, ~1/9 zeros
        fts.append((base.float() + step).to(dtype))
    return base, fts


def eager_chunk(base, fts, thresholds, sign, merge):
    """``steps.ties_chunk_`` on the whole tensor, as the engine runs it (float32 task vectors)."""
    taus = torch.stack([ft.float() - base.float() for ft in fts])
    trim_step = steps.ThresholdTrim(thresholds, torch.float32)
    out, trimmed = torch.empty(taus.shape[1]), torch.empty_like(taus)
    signs, cols = steps.ties_chunk_(taus, trim_step, out, trimmed, sign, merge)
    return out, int(signs), cols is not None, trim_step


def trimmed_of(base, fts, trim_step, sign):
    """The trimmed task vectors (``mass``) or their signs (``count``): the terms of the score."""
    trimmed = steps.ThresholdTrim(trim_step.thresholds, torch.float32)(torch.stack([ft.float() - base.float() for ft in fts]))
    return trimmed if sign == "mass" else trimmed.sign()


def all_ties_kept(values: list[float]) -> list[MagnitudeThreshold]:
    # keeps every tie (no tie budget): the case the fused kernel runs
    return [MagnitudeThreshold(v, kept=10, n_greater=5, n_equal=5) for v in values]


def same_bits(a: torch.Tensor, b: torch.Tensor, merge: str) -> bool:
    if merge == "max":  # the CPU's amax gives -0.0 or +0.0 by column position: equal values
        return torch.equal(a, b) and torch.equal(a.view(torch.int32)[a != 0], b.view(torch.int32)[b != 0])
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---- interpreter checks (run in a subprocess by the tests below) --------------------------------
def interp_merge() -> None:
    cases = 0
    for n_tasks in (1, 2, 3, 8):
        for n in (1, 7, 1000, 2049):
            for sign in ("mass", "count"):
                for merge in MERGES:
                    base, fts = grid_models(n_tasks, n, seed=n_tasks * 7919 + n)
                    # thresholds on the grid (ties at the cut), 0 (keep the non-zeros), inf (keep none)
                    values = [(0.5, 0.25, 0.0, float("inf"))[i % 4] for i in range(n_tasks)]
                    ths = all_ties_kept(values)
                    expected, signs, contested, trim_step = eager_chunk(base, fts, ths, sign, merge)
                    out = torch.full((n,), float("nan"))
                    cuts = torch.tensor(trim_step.cuts, dtype=torch.float32)
                    got_signs, got_contested = kernels.fused_ties_merge(base, fts, cuts, out, sign, merge)
                    where = f"N={n_tasks} n={n} {sign}/{merge}"
                    assert same_bits(out, expected, merge), where
                    assert int(got_signs) == signs, where
                    assert bool(got_contested.any()) == contested, where
                    # the per-block flags name exactly the blocks holding a contested entry
                    score = steps.sum_tasks(trimmed_of(base, fts, trim_step, sign))
                    mags = torch.stack([ft.float() - base.float() for ft in fts])
                    kept = steps.ThresholdTrim(ths, torch.float32)(mags).count_nonzero(0) > 0
                    flat = torch.zeros(got_contested.numel() * kernels.MERGE_BLOCK, dtype=torch.bool)
                    flat[:n] = (score == 0) & kept
                    assert torch.equal(got_contested.bool(), flat.view(-1, kernels.MERGE_BLOCK).any(1)), where
                    cases += contested
    assert cases > 10  # the grid does produce exact sign ties
    # bf16 and fp16 inputs are upcast before the subtraction, as the engine does
    for dtype in (torch.bfloat16, torch.float16):
        base, fts = grid_models(3, 999, seed=5, dtype=dtype)
        base = base + torch.randn(999).to(dtype)  # non-integer base: rounding in the stored dtype
        ths = all_ties_kept([0.25, 0.5, 0.75])
        expected, signs, _, trim_step = eager_chunk(base, fts, ths, "mass", "mean")
        out = torch.empty(999)
        got, _ = kernels.fused_ties_merge(base, fts, torch.tensor(trim_step.cuts), out, "mass", "mean")
        assert same_bits(out, expected, "mean") and int(got) == signs, dtype


def interp_bracket() -> None:
    g = torch.Generator().manual_seed(3)
    n_tasks, sizes = 3, (5000, 1, 777)
    bases = [torch.randn(s, generator=g) for s in sizes]
    fts = [[b + 0.01 * torch.randn(b.shape, generator=g) for b in bases] for _ in range(n_tasks)]
    mags = [torch.cat([(ft[j] - bases[j]).abs() for j in range(len(sizes))]) for ft in fts]
    m = keep = int(0.2 * sum(sizes))
    brackets = [(float(t.kthvalue(t.numel() - keep - 40).values), float(t.kthvalue(t.numel() - keep + 40).values)) for t in mags]
    brackets[1] = (float(mags[1].max()) / 2, float(mags[1].max()) / 2)  # this one misses: radix passes follow
    selectors = [MagnitudeSelector(m, torch.float32, b) for b in brackets]
    bits = [s.bracket_bits for s in selectors]
    lo = torch.tensor([b[0] for b in bits], dtype=torch.int32)
    hi = torch.tensor([b[1] for b in bits], dtype=torch.int32)
    hist = torch.zeros(n_tasks, max(h - l + 1 for l, h in bits), dtype=torch.int64)
    above = torch.zeros(n_tasks, dtype=torch.int64)
    flags = torch.zeros(n_tasks, len(sizes), dtype=torch.int32)
    for j in range(len(sizes)):
        kernels.bracket_counts(bases[j], [ft[j] for ft in fts], lo, hi, hist, above, flags, j)
    for i, t in enumerate(mags):
        b = t.view(torch.int32)
        l, h = bits[i]
        inside = b[(b >= l) & (b <= h)] - l
        assert torch.equal(hist[i, : h - l + 1], torch.bincount(inside, minlength=h - l + 1)), i
        assert int(above[i]) == int((b > h).sum()), i
    assert not flags.any()
    # fed to the selectors, the counts give the exact thresholds (a miss goes on to the radix passes)
    for sel, (l, h), inside, count in zip(selectors, bits, hist, above):
        sel.add_bracket_counts(inside[: h - l + 1], count, sum(sizes))
        sel.next_pass()
    for i, (sel, t) in enumerate(zip(selectors, mags)):
        while not sel.done:
            sel.observe(t)
            sel.next_pass()
        assert sel.result() == top_magnitude_threshold(t, 0.2), i
        assert sel.used_bracket == (i != 1), i
    # a NaN or an Inf is flagged for its task and tensor
    fts[2][1] = torch.tensor([float("inf")])
    flags.zero_()
    kernels.bracket_counts(bases[1], [ft[1] for ft in fts], lo, hi, hist, above, flags, 1)
    assert flags.nonzero().tolist() == [[2, 1]]


def interp_engine() -> None:
    """The engine's hooks, forced on in the interpreter: the merge equals the eager one."""
    calls = {"merge": 0, "bracket": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    thresholds._MIN_BRACKETED, thresholds._SAMPLE = 1 << 12, 1 << 10  # bracket small models too
    kernels.fused_ties_merge = counting("merge", kernels.fused_ties_merge)
    kernels.bracket_counts = counting("bracket", kernels.bracket_counts)
    g = torch.Generator().manual_seed(11)
    base = {"a": torch.randn(3000, generator=g), "b": torch.randn(30, 70, generator=g), "c": torch.randn(5, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    grid_base, grid_fts = grid_models(3, 4000, seed=2)  # exact ties: tie budgets, contested entries
    # |tau| in [1, 1 + 2**-6): few enough bit patterns for a sampled bracket on a small model
    narrow_base = {"x": torch.randn(6000, generator=g), "y": torch.randn(40, 50, generator=g)}
    narrow_fts = [
        {k: v + torch.randn(v.shape, generator=g).sign() * (1 + torch.rand(v.shape, generator=g) / 64)
         for k, v in narrow_base.items()}
        for _ in range(3)
    ]
    models = [(base, fts), ({"g": grid_base}, [{"g": f} for f in grid_fts]), (narrow_base, narrow_fts)]
    for b, fs in models:
        for spec in (
            MergeSpec(k=0.2),
            MergeSpec(k=0.3, scope="per_tensor"),
            MergeSpec(k=0.2, sign="count", merge="max"),
            MergeSpec(k=0.5, merge="task_mean"),
            MergeSpec(k=0.1, merge="sum", scope="per_tensor"),
        ):
            expected = dict(TaskVectorMerger(b, fs, spec))
            fused = TaskVectorMerger(b, fs, spec)
            fused.fused.active = lambda: True
            got = dict(fused)
            for key in expected:
                assert same_bits(got[key], expected[key], spec.merge), (spec, key)
    assert calls["merge"] > 0 and calls["bracket"] > 0, calls
    assert kernels._failed is None


def tie_models(n_tasks: int, sizes: tuple[int, ...], seed: int, signed: bool):
    """Task vectors on quarters 0.25..1 (and zeros): the top 20% ends inside the 1.0 entries, so each
    task keeps only some of its threshold ties, spread over keys. ``signed=False``: all positive,
    no sign is contested, and every key runs the fused merge."""
    g = torch.Generator().manual_seed(seed)
    base = {f"k{j}": torch.randint(-8, 8, (s,), generator=g).float() for j, s in enumerate(sizes)}
    fts = []
    for _ in range(n_tasks):
        ft = {}
        for key, b in base.items():
            step = torch.randint(0, 5, b.shape, generator=g).float() / 4
            if signed:
                step = step * (torch.randint(0, 2, b.shape, generator=g) * 2 - 1)
            ft[key] = b + step
        fts.append(ft)
    return base, fts


def interp_tie_patch() -> None:
    """The fused merge with tie budgets (strict kernel + patched tie columns) equals the eager engine."""
    patched = {"runs": 0}
    original = FusedPaths._patch_ties

    def counting(self, base, fts, trim_step, *args):
        before = list(trim_step.tie_budget)
        result = original(self, base, fts, trim_step, *args)
        if result is not None and trim_step.tie_budget != before:
            patched["runs"] += 1
        return result

    FusedPaths._patch_ties = counting
    for n_tasks, signed, sizes in ((3, False, (3000, 2000, 1000)), (2, True, (2500, 1500)), (1, False, (4000,))):
        base, fts = tie_models(n_tasks, sizes, seed=n_tasks, signed=signed)
        for spec in (
            MergeSpec(k=0.2),
            MergeSpec(k=0.2, sign="count", merge="max"),
            MergeSpec(k=0.2, merge="sum"),
            MergeSpec(k=0.3, merge="task_mean", scope="per_tensor"),
        ):
            expected_merger = TaskVectorMerger(base, fts, spec)
            expected = dict(expected_merger)
            fused = TaskVectorMerger(base, fts, spec)
            fused.fused.active = lambda: True
            got = dict(fused)
            for key in expected:
                assert same_bits(got[key], expected[key], spec.merge), (n_tasks, signed, spec, key)
            # the budgets were spent exactly as the eager path spends them
            assert [t.ties_to_keep for t in fused.thresholds or []] == [t.ties_to_keep for t in expected_merger.thresholds or []]
            if spec.scope == "global":
                assert all(0 < t.ties_to_keep < t.n_equal for t in expected_merger.thresholds), spec
    assert patched["runs"] >= 6, patched
    assert kernels._failed is None


def contested_models(n_tasks: int, sizes: tuple[int, ...], seed: int):
    """Task vectors on quarters -1..1, -1 three times as likely as 1: many columns sum to exactly 0
    (+1 and -1 above the cut, or +q and -q at it), threshold ties at the cut (0.75 for k=0.45),
    and a negative overall majority."""
    g = torch.Generator().manual_seed(seed)
    base = {f"k{j}": torch.randint(-8, 8, (s,), generator=g).float() for j, s in enumerate(sizes)}
    fts = [
        {k: b + (torch.randint(-6, 5, b.shape, generator=g).float() / 4).clamp(-1, 1) for k, b in base.items()}
        for _ in range(n_tasks)
    ]
    return base, fts


CONTESTED_SPECS = (
    MergeSpec(k=0.45),
    MergeSpec(k=0.45, sign="count"),
    MergeSpec(k=0.45, merge="sum"),
    MergeSpec(k=0.45, scope="per_tensor"),
    MergeSpec(k=0.45, sign="count", scope="per_tensor"),
    MergeSpec(k=0.45, merge="sum", scope="per_tensor"),
)


def check_contested_fused(base, fts, spec, to=lambda sd: sd, chunk_size=None) -> dict[str, int]:
    """Fused vs eager engine on one model: the same bits, every key fused (no eager redo), and the
    majority fallback flipped contested entries recorded by the fused path."""
    seen = {"fused": 0, "eager": 0, "flipped": 0, "tie_runs": 0}
    fused_merge, resolve = FusedPaths.merge, Contested.resolve

    def counting_merge(self, key, trim_step, *args):
        before = list(trim_step.tie_budget)
        result = fused_merge(self, key, trim_step, *args)
        seen["fused" if result is not None else "eager"] += 1
        seen["tie_runs"] += trim_step.tie_budget != before
        return result

    def counting_resolve(self, flat_out, sign_total):
        seen["flipped"] += bool(self) and float(sign_total) < 0
        return resolve(self, flat_out, sign_total)

    expected = dict(TaskVectorMerger(base, fts, spec))
    FusedPaths.merge, Contested.resolve = counting_merge, counting_resolve
    try:
        fused = TaskVectorMerger(to(base), [to(ft) for ft in fts], spec, chunk_size=chunk_size)
        fused.fused.active = lambda: True
        got = dict(fused)
    finally:
        FusedPaths.merge, Contested.resolve = fused_merge, resolve
    for key in expected:
        assert same_bits(got[key].cpu(), expected[key], spec.merge), (len(fts), spec, key)
    assert seen["eager"] == 0 and seen["fused"] == len(expected), (spec, seen)
    assert seen["flipped"] > 0, (len(fts), spec, seen)
    return seen


def interp_contested() -> None:
    """Contested entries (zero score) no longer send a key back to the eager path: same bits."""
    tie_runs = 0
    for n_tasks in (2, 3, 4):
        base, fts = contested_models(n_tasks, (3000, 1100, 700), seed=n_tasks)
        for spec in CONTESTED_SPECS:
            # a small chunk size: the patched columns are merged over several chunks
            tie_runs += check_contested_fused(base, fts, spec, chunk_size=500)["tie_runs"]
    assert tie_runs > 0  # threshold ties were patched in the same runs
    assert kernels._failed is None


def run_interpreted(check: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith(f"{check} ok"), done.stdout + done.stderr


def test_fused_merge_equals_ties_chunk_bit_for_bit() -> None:
    run_interpreted("interp_merge")


def test_fused_bracket_pass_counts_equal_the_histogram() -> None:
    run_interpreted("interp_bracket")


def test_engine_with_the_kernels_merges_as_without() -> None:
    run_interpreted("interp_engine")


def test_fused_merge_places_threshold_ties_as_the_eager_engine() -> None:
    run_interpreted("interp_tie_patch")


# ---- in-process: the kernels stay optional -------------------------------------------------------
def test_fused_merge_with_contested_entries_equals_the_eager_engine() -> None:
    run_interpreted("interp_contested")


def test_kernels_run_only_on_cuda_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not kernels.available("cpu")
    assert not kernels.available("cuda", torch.float64)
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    assert not kernels.available("cuda")
    assert not kernels.enabled()
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    assert kernels.enabled() == (kernels._failed is None)


def test_without_triton_the_package_imports_and_merges() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch\n"
        "from lightning_ties import ties_merge\n"
        "from lightning_ties.merging import kernels\n"
        "assert kernels.triton is None and not kernels.available('cuda')\n"
        "r = ties_merge({'w': torch.zeros(4)}, [{'w': torch.arange(4.0)}], k=0.5)\n"
        "print(r['w'].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0.0, 0.0, 2.0, 3.0]"


def test_a_failing_kernel_falls_back_to_the_eager_path_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "fused_ties_merge", broken)
    monkeypatch.setattr(kernels, "bracket_counts", broken)
    monkeypatch.setattr(thresholds, "_MIN_BRACKETED", 1 << 10)
    monkeypatch.setattr(thresholds, "_SAMPLE", 1 << 8)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(2000, generator=g), "v": torch.randn(50, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    expected = dict(TaskVectorMerger(base, fts, MergeSpec(k=0.2)))
    merger = TaskVectorMerger(base, fts, MergeSpec(k=0.2))
    monkeypatch.setattr(merger.fused, "active", lambda: kernels.enabled())
    with pytest.warns(RuntimeWarning, match="simulated compile failure") as record:
        got = dict(merger)
    assert len([w for w in record if "Triton kernels failed" in str(w.message)]) == 1
    assert kernels._failed is not None and not kernels.enabled()
    for key in expected:
        assert torch.equal(got[key].view(torch.int32), expected[key].view(torch.int32)), key


# ---- CUDA: the real kernels against the CPU engine ----------------------------------------------
def _cuda_models(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(3_000_000, generator=g), "b": torch.randn(1500, 1000, generator=g), "c": torch.randn(7, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    return base, fts


def _on(sd, device):
    return {k: v.to(device) for k, v in sd.items()}


@cuda
@needs_cuda
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize(("sign", "merge"), [("mass", "mean"), ("count", "max"), ("mass", "task_mean")])
def test_cuda_kernels_give_the_cpu_merge(scope: str, sign: str, merge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_ties import ties_merge

    pytest.importorskip("triton")
    assert kernels.available("cuda")
    calls = {"merge": 0, "bracket": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(kernels, "fused_ties_merge", counting("merge", kernels.fused_ties_merge))
    monkeypatch.setattr(kernels, "bracket_counts", counting("bracket", kernels.bracket_counts))
    base, fts = _cuda_models()
    expected = ties_merge(base, fts, k=0.2, scope=scope, sign=sign, merge=merge)
    result = ties_merge(_on(base, "cuda"), [_on(ft, "cuda") for ft in fts], k=0.2, scope=scope, sign=sign, merge=merge)
    assert calls["merge"] > 0 and (scope == "per_tensor" or calls["bracket"] > 0), calls
    assert kernels._failed is None, kernels._failed
    assert result.report.thresholds == expected.report.thresholds
    for key in expected:
        assert same_bits(result[key].cpu(), expected[key], merge), key
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    eager = ties_merge(_on(base, "cuda"), [_on(ft, "cuda") for ft in fts], k=0.2, scope=scope, sign=sign, merge=merge)
    for key in expected:
        assert torch.equal(eager[key].cpu(), expected[key]), key


@cuda
@needs_cuda
def test_cuda_kernels_merge_to_writes_the_cpu_result(tmp_path) -> None:
    from lightning_ties.io import merge_to, open_source

    pytest.importorskip("triton")
    base, fts = _cuda_models(seed=2)
    merge_to(tmp_path / "cpu.safetensors", base, fts, k=0.2, progress=False)
    merge_to(tmp_path / "gpu.safetensors", base, fts, k=0.2, progress=False, device="cuda")
    cpu, gpu = open_source(tmp_path / "cpu.safetensors"), open_source(tmp_path / "gpu.safetensors")
    for key in cpu.keys():
        assert torch.equal(cpu.get(key), gpu.get(key)), key
    assert kernels._failed is None, kernels._failed


@cuda
@needs_cuda
def test_cuda_fused_merge_equals_ties_chunk() -> None:
    pytest.importorskip("triton")
    for n_tasks in (1, 3, 8):
        for merge in MERGES:
            base, fts = grid_models(n_tasks, 100_003, seed=n_tasks)
            ths = all_ties_kept([(0.5, 0.25, 0.0)[i % 3] for i in range(n_tasks)])
            expected, signs, contested, trim_step = eager_chunk(base, fts, ths, "mass", merge)
            out = torch.empty(base.numel(), device="cuda")
            cuts = torch.tensor(trim_step.cuts, device="cuda")
            got, flag = kernels.fused_ties_merge(base.cuda(), [f.cuda() for f in fts], cuts, out, "mass", merge)
            assert same_bits(out.cpu(), expected, merge), (n_tasks, merge)
            assert int(got) == signs and bool(flag.any()) == contested


@cuda
@needs_cuda
@pytest.mark.parametrize(("sign", "merge"), [("mass", "mean"), ("count", "max"), ("mass", "sum")])
def test_cuda_fused_merge_places_threshold_ties_as_the_cpu(sign: str, merge: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    patched = {"runs": 0}
    original = FusedPaths._patch_ties

    def counting(self, *args):
        result = original(self, *args)
        patched["runs"] += result is not None
        return result

    monkeypatch.setattr(TaskVectorMerger, "_patch_ties", counting)
    base, fts = tie_models(3, (300_000, 200_001, 7), seed=4, signed=False)
    spec = MergeSpec(k=0.2, sign=sign, merge=merge)
    expected = dict(TaskVectorMerger(base, fts, spec))
    got = dict(TaskVectorMerger(_on(base, "cuda"), [_on(ft, "cuda") for ft in fts], spec))
    assert patched["runs"] > 0 and kernels._failed is None, (patched, kernels._failed)
    for key in expected:
        assert same_bits(got[key].cpu(), expected[key], merge), key


@cuda
@needs_cuda
@pytest.mark.parametrize("spec", CONTESTED_SPECS, ids=lambda s: f"{s.sign}-{s.merge}-{s.scope}")
@pytest.mark.parametrize("n_tasks", [2, 3, 4])
def test_cuda_fused_merge_with_contested_entries_equals_the_cpu(n_tasks: int, spec: MergeSpec) -> None:
    pytest.importorskip("triton")
    base, fts = contested_models(n_tasks, (300_000, 200_001, 7), seed=n_tasks)
    check_contested_fused(base, fts, spec, to=lambda sd: _on(sd, "cuda"))
    assert kernels._failed is None, kernels._failed


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    print(f"{sys.argv[1]} ok")
