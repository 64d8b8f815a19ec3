"""The engine merges on one device: the inputs' (or ``device=``), with results equal to the CPU path.

CPU tests check the plumbing (``device=`` on every entry point, bf16/fp16 inputs, the GPU
selection strategy run on the CPU); the ``cuda`` tests (skipped without a GPU, run with
``-m cuda``) check that CUDA inputs give CUDA outputs bit-identical to the CPU merge.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ties import average_merge, merge, merge_to, task_arithmetic, ties_merge
from lightning_ties.io import open_source
from lightning_ties.merging import steps
from lightning_ties.merging import (
    METHODS,
    MagnitudeSelector,
    MergeSpec,
    StateDictSource,
    TaskVectorMerger,
    apply_task_vector,
    merged_task_vector,
    method_task_vector,
    top_magnitude_threshold,
)

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_models(n_tasks: int = 3, seed: int = 0, rows: int = 40, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(rows, 20, generator=g),
        "b": torch.randn(7, generator=g),
        "steps": torch.tensor(3),  # an integer buffer: copied from base, never merged
    }
    fts = [
        {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in base.items()}
        for _ in range(n_tasks)
    ]
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(ft) for ft in fts]


def method_cases() -> list[tuple[str, dict]]:
    """Every registry method, with each scope where the method has one; DARE with a fixed seed."""
    cases = []
    for name, method in METHODS.items():
        if method.needs_data:  # RegMean runs from the Lightning layer, on each task's data
            continue
        if method.build_spec().tensor_fn is not None:
            # SVD-based (TSV-M, Iso-C): LAPACK and cuSOLVER round differently, so these agree within
            # tolerance only (tests/merging/test_merging_subspace.py::test_registry_merge_on_cuda_matches_cpu)
            continue
        params = method.parameters()
        scopes = ("global", "per_tensor") if "scope" in params else (None,)
        for scope in scopes:
            kw = {"scope": scope} if scope else {}
            if "seed" in params:
                kw["seed"] = 7
            cases.append((name, kw))
    return cases


def on(sd: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in sd.items()}


def assert_same(result: dict, expected: dict) -> None:
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key].dtype == expected[key].dtype, key
        assert torch.equal(result[key].cpu(), expected[key].cpu()), key


# ---- CPU: plumbing -------------------------------------------------------------------------
def test_device_cpu_is_accepted_everywhere_and_changes_nothing() -> None:
    base, fts = random_models()
    expected = ties_merge(base, fts, k=0.3)
    assert_same(ties_merge(base, fts, k=0.3, device="cpu"), expected)
    assert_same(ties_merge(base, fts, k=0.3, device=torch.device("cpu")), expected)
    assert_same(merge(base, fts, "ties", k=0.3, device="cpu"), expected)
    assert_same(task_arithmetic(base, fts, device="cpu"), task_arithmetic(base, fts))
    assert_same(average_merge(fts, device="cpu"), average_merge(fts))
    tau = method_task_vector(base, fts, "ties", k=0.3, device="cpu")
    assert all(t.device.type == "cpu" for t in tau.values())
    assert_same(tau.apply(base, 1.0, device="cpu"), expected)
    spec = MergeSpec(k=0.3)
    assert_same(dict(merged_task_vector(base, fts, spec, device="cpu")), dict(merged_task_vector(base, fts, spec)))


def test_merger_device_defaults_to_the_base_tensors_device() -> None:
    base, fts = random_models()
    assert StateDictSource(base).device == torch.device("cpu")
    merger = TaskVectorMerger(base, fts)
    assert merger.device == torch.device("cpu")
    assert TaskVectorMerger(base, fts, device="cpu").device == torch.device("cpu")


def test_merge_to_takes_device(tmp_path: Path) -> None:
    base, fts = random_models()
    out = tmp_path / "m.safetensors"
    merge_to(out, base, fts, k=0.3, progress=False, device="cpu")
    expected = ties_merge(base, fts, k=0.3)
    src = open_source(out)
    for key in expected:
        assert torch.equal(src.get(key), expected[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_half_precision_inputs_merge_in_float32_and_keep_their_dtype(dtype: torch.dtype, scope: str) -> None:
    # Given bf16/fp16 models, when merged, then the arithmetic is the float32 merge of the same
    # values (every bf16/fp16 value is exact in float32), written back in the base's dtype.
    base, fts = random_models(dtype=dtype)
    result = ties_merge(base, fts, k=0.3, lam=0.7, scope=scope)
    up = lambda sd: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    reference = ties_merge(up(base), [up(ft) for ft in fts], k=0.3, lam=0.7, scope=scope)
    for key, value in result.items():
        assert value.dtype == base[key].dtype, key
        assert torch.equal(value, reference[key].to(base[key].dtype)), key
    # tau_m itself stays float32: the task vectors are differences taken in float32
    tau = method_task_vector(base, fts, "task_arithmetic")
    assert tau["w"].dtype == torch.float32
    assert torch.equal(tau["w"], torch.stack([ft["w"].float() - base["w"].float() for ft in fts]).sum(0))


@pytest.mark.parametrize("with_bracket", [False, True])
def test_gather_selection_equals_the_histogram_of_every_entry(with_bracket: bool) -> None:
    # The GPU strategy (histogram only the candidates) gives the very threshold of the CPU one,
    # with ties at the threshold counted alike; checked on the CPU by forcing it.
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(50_000, generator=g).round(decimals=2), torch.randn(30_000, generator=g)]
    m = 16_000
    expected = top_magnitude_threshold(tensors, m / 80_000)
    bracket = (expected.value * 0.99, expected.value * 1.01) if with_bracket else None
    for gather in (False, True):
        sel = MagnitudeSelector(m, torch.float32, bracket=bracket, gather=gather)
        while not sel.done:
            for t in tensors:
                sel.observe(t)
            sel.next_pass()
        assert sel.result() == expected, gather
        assert sel.used_bracket == with_bracket


def test_gather_selection_falls_back_when_the_bracket_misses() -> None:
    x = torch.linspace(-1, 1, 10_001)
    expected = top_magnitude_threshold(x, 0.2)
    sel = MagnitudeSelector(expected.kept, torch.float32, bracket=(0.001, 0.002), gather=True)
    while not sel.done:
        sel.observe(x)
        sel.next_pass()
    assert sel.result() == expected and not sel.used_bracket


@pytest.mark.parametrize("bracket", [(0.4, 1.5), None])
def test_gather_selection_refuses_nan_naming_the_tensor_when_the_pass_closes(bracket) -> None:
    # the gather strategy does not wait for the device per tensor: the check is read once per pass
    clean, bad = torch.tensor([0.5, 1.0]), torch.tensor([0.5, float("nan"), 1.0, 2.0])
    sel = MagnitudeSelector(2, torch.float32, bracket=bracket, gather=True)
    sel.observe(clean, name="task vector of ft at 'a'")
    sel.observe(bad, name="task vector of ft at 'w'")
    with pytest.raises(ValueError, match="task vector of ft at 'w' holds NaN or Inf"):
        sel.next_pass()


@pytest.mark.parametrize("bracket", [(0.5, 0.5), (0.25, 3.0), None])
def test_gather_selection_counts_ties_and_empty_tensors_like_the_histogram_of_every_entry(bracket) -> None:
    # many equal magnitudes at the threshold, an empty tensor, entries on both bracket edges
    tensors = [torch.tensor([0.5, -0.5, 0.25, 3.0, 4.0]), torch.empty(0), torch.tensor([-0.5, 0.5, 0.0, 3.0])]
    for m in (1, 3, 4, 6, 9):
        expected = top_magnitude_threshold(tensors, m / 9)
        sel = MagnitudeSelector(m, torch.float32, bracket=bracket, gather=True)
        while not sel.done:
            for t in tensors:
                sel.observe(t)
            sel.next_pass()
        assert sel.result() == expected, m


# ---- CUDA: same results on the GPU ----------------------------------------------------------
@cuda
@needs_cuda
@pytest.mark.parametrize(("method", "params"), method_cases())
def test_cuda_inputs_give_cuda_outputs_equal_to_the_cpu_merge(method: str, params: dict) -> None:
    base, fts = random_models(n_tasks=4)
    expected = merge(base, fts, method, **params)
    result = merge(on(base, "cuda"), [on(ft, "cuda") for ft in fts], method, **params)
    assert all(v.device.type == "cuda" for v in result.values())
    assert_same(result, expected)


@cuda
@needs_cuda
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_cuda_large_global_threshold_equals_cpu(scope: str) -> None:
    # Above 4M merged entries the global trim starts from a sampled bracket (the gather path on
    # the GPU); per_tensor goes through the radix select on one large tensor.
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(3_000_000, generator=g), "b": torch.randn(1500, 1000, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    expected = ties_merge(base, fts, k=0.2, scope=scope)
    result = ties_merge(on(base, "cuda"), [on(ft, "cuda") for ft in fts], k=0.2, scope=scope)
    assert result.report.thresholds == expected.report.thresholds
    assert_same(result, expected)


@cuda
@needs_cuda
def test_cuda_device_argument_merges_files_on_the_gpu(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base, fts = random_models()
    paths = []
    for i, sd in enumerate([base, *fts]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    expected = ties_merge(base, fts, k=0.3)
    result = ties_merge(str(paths[0]), [str(p) for p in paths[1:]], k=0.3, device="cuda")
    assert all(v.device.type == "cuda" for v in result.values())
    assert_same(result, expected)
    tau = method_task_vector(str(paths[0]), [str(p) for p in paths[1:]], "ties", k=0.3, device="cuda")
    assert all(v.device.type == "cuda" for v in tau.values())


@cuda
@needs_cuda
def test_cuda_merge_to_writes_the_cpu_result(tmp_path: Path) -> None:
    base, fts = random_models()
    merge_to(tmp_path / "cpu.safetensors", base, fts, k=0.3, progress=False)
    merge_to(tmp_path / "gpu.safetensors", base, fts, k=0.3, progress=False, device="cuda")
    cpu, gpu = open_source(tmp_path / "cpu.safetensors"), open_source(tmp_path / "gpu.safetensors")
    for key in cpu.keys():
        assert torch.equal(cpu.get(key), gpu.get(key)), key


@cuda
@needs_cuda
def test_cuda_bf16_merges_in_float32_and_keeps_bf16() -> None:
    base, fts = random_models(dtype=torch.bfloat16)
    expected = ties_merge(base, fts, k=0.3)
    result = ties_merge(on(base, "cuda"), [on(ft, "cuda") for ft in fts], k=0.3)
    assert result["w"].dtype == torch.bfloat16 and result["w"].device.type == "cuda"
    assert_same(result, expected)


@cuda
@needs_cuda
@pytest.mark.parametrize(("base_device", "module_device"), [("cpu", "cuda"), ("cuda", "cpu")])
def test_cuda_apply_into_a_module_on_another_device(base_device: str, module_device: str) -> None:
    module = nn.Linear(20, 5)
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    tau = method_task_vector(base, fts, "ties", k=0.5)
    expected = tau.apply(base, 1.2)
    module.to(module_device)
    tau_dev = {k: v.to(base_device) for k, v in tau.items()}
    apply_task_vector(on(base, base_device), tau_dev, 1.2, out=module)
    for key, value in module.state_dict().items():
        assert value.device.type == module_device
        assert torch.equal(value.cpu(), expected[key]), key


# ---- one summation order on every device ----------------------------------------------------
def mixed_magnitudes(n_tasks: int, columns: int, seed: int = 0) -> torch.Tensor:
    # values spread over ~20 binades: any other order of addition rounds differently somewhere
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tasks, columns, generator=g) * torch.exp(6 * torch.randn(n_tasks, columns, generator=g))


def sequential_sum(x: torch.Tensor) -> torch.Tensor:
    total = x[0].clone()
    for row in x[1:]:
        total = total + row
    return total


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 8, 11, 20])
def test_sum_tasks_adds_rows_in_task_order_bit_for_bit(n_tasks: int) -> None:
    from lightning_ties.merging.steps import sum_tasks

    x = mixed_magnitudes(n_tasks, 70_001)
    expected = sequential_sum(x)
    assert torch.equal(sum_tasks(x).view(torch.int32), expected.view(torch.int32))
    out = torch.empty(70_001)
    assert sum_tasks(x, out=out) is out and torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(sum_tasks(x[:, 5:900]), sequential_sum(x[:, 5:900]))  # strided rows of a chunk


def test_merges_sum_tasks_in_task_order_not_in_the_order_of_torch_sum() -> None:
    # Data where torch's own x.sum(0) rounds differently from the sequential order (guarded
    # below): every method's sums must follow the sequential order, the one CUDA also follows.
    x = mixed_magnitudes(8, 2000, seed=1)
    assert not torch.equal(x.sum(0), sequential_sum(x))  # guard: the orders differ on this data
    base = {"w": torch.zeros(2000)}
    fts = [{"w": row.clone()} for row in x]
    assert torch.equal(task_arithmetic(base, fts, lam=1.0)["w"], sequential_sum(x))
    # TIES without trim, with the "sum" merge: elect by the sequential mass, sum the agreeing values
    gamma = torch.where(sequential_sum(x) >= 0, 1.0, -1.0)
    agreeing = (x * gamma).clamp(min=0)
    assert torch.equal(ties_merge(base, fts, k=1.0, merge="sum", lam=1.0)["w"], sequential_sum(agreeing) * gamma)
    assert torch.equal(merge(base, fts, "dare", p=0.0, lam=1.0)["w"], sequential_sum(x))


def test_engine_through_the_gpu_selection_strategy_equals_the_cpu_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU's sync-free selection (gather), forced on the CPU through the whole engine, with
    # sampled brackets on a small model: same thresholds, same merge.
    import functools

    from lightning_ties.merging import thresholds

    g = torch.Generator().manual_seed(5)
    base = {f"t{i}": torch.randn(300 + 17 * i, generator=g) for i in range(12)}
    fts = [{k: v + torch.randn(v.shape, generator=g).round(decimals=1) for k, v in base.items()} for _ in range(3)]
    monkeypatch.setattr(thresholds, "_MIN_BRACKETED", 1000)
    monkeypatch.setattr(thresholds, "_SAMPLE", 1 << 10)
    for scope in ("global", "per_tensor"):
        expected = ties_merge(base, fts, k=0.2, scope=scope)
        with monkeypatch.context() as m:
            m.setattr(thresholds, "MagnitudeSelector", functools.partial(MagnitudeSelector, gather=True))
            m.setattr(thresholds, "_SMALL_TENSOR", 100)  # per_tensor: the selector, not kthvalue
            result = ties_merge(base, fts, k=0.2, scope=scope)
        assert result.report.thresholds == expected.report.thresholds
        assert_same(result, expected)


@cuda
@needs_cuda
@pytest.mark.parametrize("n_tasks", [2, 8, 20])
def test_cuda_sum_tasks_equals_the_sequential_cpu_sum(n_tasks: int) -> None:
    from lightning_ties.merging.steps import sum_tasks

    x = mixed_magnitudes(n_tasks, 1_000_003)
    assert torch.equal(sum_tasks(x.cuda()).cpu().view(torch.int32), sequential_sum(x).view(torch.int32))


def test_division_by_a_number_is_a_true_division() -> None:
    # CUDA divides by a Python number through its reciprocal; divide_ divides by a 0-d tensor,
    # which both devices round exactly: on the CPU it equals x / d bit for bit
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(3)) * 1e3
    for d in (3, 7.0, 0.1, 1 - 0.9):
        assert torch.equal(steps.divide_(x.clone(), d), x / d)


@cuda
@needs_cuda
def test_cuda_division_by_a_number_equals_the_cpu_division() -> None:
    x = torch.randn(100_003, generator=torch.Generator().manual_seed(3)) * 1e3
    for d in (3, 7.0, 0.1, 1 - 0.9):
        assert torch.equal(steps.divide_(x.cuda(), d).cpu(), x / d)


def test_zero_signs_do_not_depend_on_the_device(monkeypatch) -> None:
    # CUDA's clamp turns -0.0 into +0.0 where the CPU's keeps it: a device-dependent sign bit on
    # equal values. The engine writes +0.0 for every zero, so bits agree wherever values do.
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(4000)}
    fts = [{"w": torch.randint(-4, 5, (4000,), generator=g).float() / 4} for _ in range(3)]
    spec = MergeSpec(k=0.45)
    expected = merged_task_vector(base, fts, spec)["w"]
    clamp_ = torch.Tensor.clamp_

    def cuda_like_clamp_(self, *args, **kwargs):
        out = clamp_(self, *args, **kwargs)
        return out.add_(0.0) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "clamp_", cuda_like_clamp_)
    got = merged_task_vector(base, fts, spec)["w"]
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert not bool(torch.signbit(expected[expected == 0]).any())
