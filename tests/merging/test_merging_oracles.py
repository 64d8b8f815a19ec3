"""The engine against independent implementations: PEFT (per tensor) and the paper's flatten path.

The flatten reference below is written from the formulas (and the reference code's
``resolve_sign`` / ``resolve_zero_signs`` / ``disjoint_merge``), not from the engine: it stacks
the N flattened task vectors, keeps the ``int(k * n)`` largest magnitudes of each row with a
stable sort (ties: key order, then flat index), elects a sign per entry, and disjoint-merges.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft.utils import merge_utils as peft

from lightning_ties.merging import MergeSpec, TaskVectorMerger, merged_task_vector

SHAPES = {"emb": (37, 8), "layer.0.weight": (16, 16), "layer.0.bias": (16,), "head": (5, 16), "scale": ()}


def random_models(n_tasks: int, seed: int, bias: float = 0.0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    fts = [{k: (v.float() + bias + torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(n_tasks)]
    return base, fts


def flatten(base, fts, keys):
    """[N, P] task vectors over ``keys`` in order, float32 (the paper's flat model)."""
    return torch.stack([torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in keys]) for ft in fts])


def unflatten(flat: torch.Tensor, base, keys) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = flat[start : start + n].reshape(base[k].shape)
        start += n
    return out


def reference_trim(taus: torch.Tensor, k: float) -> torch.Tensor:
    m = int(k * taus.shape[1])
    out = torch.zeros_like(taus)
    for i, row in enumerate(taus):
        keep = torch.sort(-row.abs(), stable=True).indices[:m]
        out[i, keep] = row[keep]
    return out


def reference_sign(trimmed: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mass":
        gamma = trimmed.sum(0).sign()
    elif method == "count":
        gamma = trimmed.sign().sum(0).sign()
    else:
        norm_fracs = trimmed**2 / torch.norm(trimmed, dim=1, keepdim=True) ** 2
        if method == "normfrac":
            gamma = trimmed[norm_fracs.argmax(0), torch.arange(trimmed.shape[1])].sign()
        else:
            gamma = (trimmed.sign() * norm_fracs.abs()).sum(0).sign()
    majority = gamma.sum().sign()
    # the reference code leaves 0 when the majority itself is 0; we document +1 for that case
    gamma[gamma == 0] = majority if majority != 0 else 1.0
    return gamma


def reference_disjoint(trimmed: torch.Tensor, gamma: torch.Tensor, merge: str) -> torch.Tensor:
    selected = trimmed * torch.where(gamma > 0, trimmed > 0, trimmed < 0)
    if merge == "mean":
        return selected.sum(0) / (selected != 0).sum(0).float().clamp(min=1)
    if merge == "sum":
        return selected.sum(0)
    return selected.abs().max(0).values * gamma


def reference_ties(base, fts, keys, k=0.2, sign="mass", merge="mean"):
    trimmed = reference_trim(flatten(base, fts, keys), k)
    return unflatten(reference_disjoint(trimmed, reference_sign(trimmed, sign), merge), base, keys)


def float_keys(base) -> list[str]:
    return [k for k, v in base.items() if v.is_floating_point()]


@pytest.mark.parametrize("k", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
def test_global_scope_equals_the_flatten_and_sort_reference(k: float, merge: str) -> None:
    base, fts = random_models(4, seed=3)
    keys = float_keys(base)
    tau = merged_task_vector(base, fts, MergeSpec(k=k, scope="global", merge=merge))
    expected = reference_ties(base, fts, keys, k=k, merge=merge)
    for key in keys:
        assert torch.equal(tau[key], expected[key]), key


@pytest.mark.parametrize("sign", ["count", "normfrac", "normmass"])
def test_global_sign_methods_equal_the_reference_code(sign: str) -> None:
    base, fts = random_models(5, seed=4)
    keys = float_keys(base)
    tau = merged_task_vector(base, fts, MergeSpec(k=0.3, scope="global", sign=sign))
    expected = reference_ties(base, fts, keys, k=0.3, sign=sign)
    for key in keys:
        torch.testing.assert_close(tau[key], expected[key], rtol=1e-6, atol=0.0, msg=key)


def test_global_threshold_ties_spanning_two_tensors_follow_key_order() -> None:
    # given one task whose 6 entries hold 4 ties at |1| and k asking for 3 entries
    base = {"a": torch.zeros(3), "b": torch.zeros(3)}
    ft = {"a": torch.tensor([1.0, -1.0, 0.5]), "b": torch.tensor([1.0, 1.0, 2.0])}
    # then 2 is kept, and the first two ties in key order then flat index: a[0], a[1]
    tau = merged_task_vector(base, [ft], MergeSpec(k=0.5))
    assert tau["a"].tolist() == [1.0, -1.0, 0.0] and tau["b"].tolist() == [0.0, 0.0, 2.0]
    # and with base's key order reversed, b's ties come first
    tau = merged_task_vector({"b": base["b"], "a": base["a"]}, [ft], MergeSpec(k=0.5))
    assert tau["a"].tolist() == [0.0, 0.0, 0.0] and tau["b"].tolist() == [1.0, 1.0, 2.0]


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1 << 18])
def test_ties_at_the_threshold_do_not_depend_on_chunking(chunk_size: int) -> None:
    base = {"a": torch.zeros(7), "b": torch.zeros(2, 3)}
    ft = {"a": torch.tensor([1.0, -1.0, 3.0, 1.0, -1.0, 0.0, 1.0]), "b": torch.tensor([[1.0, 1.0, -1.0], [2.0, 0.0, 1.0]])}
    merger = TaskVectorMerger(base, [ft], MergeSpec(k=0.5), chunk_size=chunk_size)
    tau = dict(merger)
    # 13 entries, keep 6: 3 and 2, then the first four of the nine ties at |1|
    assert tau["a"].tolist() == [1.0, -1.0, 3.0, 1.0, -1.0, 0.0, 0.0]
    assert tau["b"].tolist() == [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]


def peft_ties(base, fts, k: float, method: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in float_keys(base):
        taus = [ft[key].float() - base[key].float() for ft in fts]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
            out[key] = peft.ties(taus, torch.ones(len(taus)), density=k, majority_sign_method=method)
    return out


@pytest.mark.parametrize("k", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n_tasks", [1, 2, 5])
def test_per_tensor_scope_equals_peft_ties_total(k: float, n_tasks: int) -> None:
    base, fts = random_models(n_tasks, seed=10 + n_tasks)
    tau = merged_task_vector(base, fts, MergeSpec(k=k, scope="per_tensor"))
    expected = peft_ties(base, fts, k, "total")
    for key, value in expected.items():
        torch.testing.assert_close(tau[key], value, rtol=1e-6, atol=0.0, msg=key)


@pytest.mark.parametrize("k", [0.2, 0.6])
def test_per_tensor_count_equals_peft_frequency(k: float) -> None:
    # PEFT elects +1 on a tied vote; we fall back to the tensor's majority sign. A positive
    # bias makes every tensor's majority positive, so the many tied votes of 4 tasks agree.
    base, fts = random_models(4, seed=21, bias=0.4)
    tau = merged_task_vector(base, fts, MergeSpec(k=k, scope="per_tensor", sign="count"))
    expected = peft_ties(base, fts, k, "frequency")
    assert any(bool((tau[key] != 0).any()) for key in expected)
    for key, value in expected.items():
        torch.testing.assert_close(tau[key], value, rtol=1e-6, atol=0.0, msg=key)


def exact_cancellation_models():
    """Tensor "a" holds an exact cancellation (+1 vs -1); tensor "b" votes negative three times."""
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    ft1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([-1.0, -1.0, -1.0])}
    ft2 = {"a": torch.tensor([-1.0, 0.5]), "b": torch.tensor([-2.0, -2.0, -2.0])}
    return base, [ft1, ft2]


def test_zero_sign_falls_back_to_the_global_majority_when_it_is_negative() -> None:
    base, fts = exact_cancellation_models()
    # a[0] scores 0; the whole model's signs sum to +1 - 3 < 0, so a[0] elects -1 and keeps -1.0
    tau = merged_task_vector(base, fts, MergeSpec(k=1.0, scope="global"))
    assert tau["a"].tolist() == [-1.0, 1.25]
    assert tau["b"].tolist() == [-1.5, -1.5, -1.5]
    expected = reference_ties(base, fts, ["a", "b"], k=1.0)
    assert torch.equal(tau["a"], expected["a"]) and torch.equal(tau["b"], expected["b"])


def test_zero_sign_falls_back_to_the_tensor_majority_in_per_tensor_scope() -> None:
    base, fts = exact_cancellation_models()
    # tensor a alone: signs [0, +] -> majority +, so a[0] keeps +1.0
    tau = merged_task_vector(base, fts, MergeSpec(k=1.0, scope="per_tensor"))
    assert tau["a"].tolist() == [1.0, 1.25]


def test_zero_sign_fallback_components_follow_the_same_sign() -> None:
    base, fts = exact_cancellation_models()
    merger = TaskVectorMerger(base, fts, MergeSpec(k=1.0, scope="global"))
    deltas = dict(merger.components())
    assert deltas["a"].tolist() == [[0.0, 1.0], [-1.0, 0.25]]
    assert torch.equal(deltas["b"].sum(0), torch.tensor([-1.5, -1.5, -1.5]))


def test_sampled_brackets_change_no_global_threshold(monkeypatch) -> None:
    # given task vectors whose magnitudes lie a few bit patterns apart (so a sampled bracket
    # fits the one-pass histogram), with ties, and limits lowered so that the engine samples
    from lightning_ties.merging import MagnitudeSelector, thresholds

    g = torch.Generator().manual_seed(30)
    eps = torch.finfo(torch.float32).eps
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}

    def dense(shape):
        signs = (torch.rand(shape, generator=g) - 0.5).sign()
        return (1 + torch.randint(0, 3000, shape, generator=g) * 4 * eps) * signs

    fts = [{k: dense(v.shape) for k, v in base.items()} for _ in range(4)]
    expected = TaskVectorMerger(base, fts, MergeSpec(k=0.3))
    tau_expected = dict(expected)
    monkeypatch.setattr(thresholds, "_MIN_BRACKETED", 100)
    monkeypatch.setattr(thresholds, "_SAMPLE", 300)
    selectors: list[MagnitudeSelector] = []

    class RecordingSelector(MagnitudeSelector):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            selectors.append(self)

    monkeypatch.setattr(thresholds, "MagnitudeSelector", RecordingSelector)
    bracketed = TaskVectorMerger(base, fts, MergeSpec(k=0.3))
    tau = dict(bracketed)
    # then every task's threshold came from its bracket, equal to the radix passes' result
    assert len(selectors) == 4 and all(s.used_bracket for s in selectors)
    assert bracketed.thresholds == expected.thresholds
    assert all(torch.equal(tau[key], tau_expected[key]) for key in tau_expected)
