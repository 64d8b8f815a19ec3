"""TSV-M, Iso-C and Iso-CTS on one tensor, against dense float64 references written from the papers.

The references below take another numerical route than the library (numpy float64, and the
polar factor ``A (A^T A)^{-1/2}`` from an eigendecomposition instead of an SVD), so a shared
mistake would have to be made twice in two different ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ties import merge
from lightning_ties.merging import METHODS, MergeSpec, StateDictSource, TaskVectorMerger, get_method, subspace
from lightning_ties.merging.subspace import (
    iso_c,
    iso_cts,
    iso_cts_ranks,
    orthogonalize,
    svd,
    tsv_m,
    tsv_m_components,
    tsv_rank,
)

# float32 SVDs of 16x16 random matrices agree with float64 to a few 1e-5
F32 = 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _deltas(n: int = 3, m: int = 12, k: int = 9, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, k, generator=g, dtype=torch.float64).to(dtype)


# ---- dense references, from the papers' equations -------------------------------------------
def _polar(a: np.ndarray) -> np.ndarray:
    """Closest matrix with orthonormal columns (tall a): a (a^T a)^{-1/2}."""
    w, q = np.linalg.eigh(a.T @ a)
    return a @ (q @ np.diag(w**-0.5) @ q.T)


def _ref_iso_c(d: np.ndarray) -> np.ndarray:
    total = d.sum(0)
    r = min(total.shape)
    sigma_bar = np.linalg.norm(total, ord="nuc") / r  # mean singular value
    tall = total if total.shape[0] >= total.shape[1] else total.T
    polar = _polar(tall)  # U V^T
    return sigma_bar * (polar if total.shape[0] >= total.shape[1] else polar.T)


def _ref_tsv_m(d: np.ndarray) -> np.ndarray:
    n = d.shape[0]
    k = min(d.shape[1:]) // n
    us, ss, vs = [], [], []
    for t in range(n):
        u, s, vh = np.linalg.svd(d[t], full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_o = _polar(np.concatenate(us, 1))
    v_o = _polar(np.concatenate(vs, 1))
    return u_o @ np.diag(np.concatenate(ss)) @ v_o.T


def _ref_iso_cts(d: np.ndarray, fraction: float) -> np.ndarray:
    n = d.shape[0]
    r = min(d.shape[1:])
    common = int(r * fraction)
    common = r - round((r - common) / n) * n
    per = (r - common) // n
    u, s, vh = np.linalg.svd(d.sum(0), full_matrices=False)
    u_c, s_c, v_c = u[:, :common], s[:common], vh[:common].T
    us, ss, vs = [], [], []
    for t in range(n):
        resid = (np.eye(d.shape[1]) - u_c @ u_c.T) @ d[t]
        ut, st, vht = np.linalg.svd(resid, full_matrices=False)
        us.append(ut[:, :per])
        ss.append(st[:per])
        vs.append(vht[:per].T)
    u_cat = np.concatenate([*us, u_c], 1)
    v_cat = np.concatenate([*vs, v_c], 1)
    s_bar = np.concatenate([*ss, s_c]).mean()
    return s_bar * _polar(u_cat) @ _polar(v_cat).T


# ---- hand-checkable cases ---------------------------------------------------------------------
def test_iso_c_by_hand_two_orthogonal_tasks_get_the_mean_singular_value():
    # given task 1 = diag(4, 0) and task 2 = diag(0, 2): the sum diag(4, 2) has S = (4, 2)
    d = torch.stack([torch.diag(torch.tensor([4.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
    # then every direction gets mean(S) = 3
    assert torch.allclose(iso_c(d), 3.0 * torch.eye(2))


def test_tsv_m_by_hand_keeps_each_tasks_top_direction():
    # given two rank-1 tasks along different axes of a 2x3 matrix: k = min(2, 3) // 2 = 1 each
    a = torch.zeros(2, 3)
    a[0, 0] = 5.0
    b = torch.zeros(2, 3)
    b[1, 2] = -2.0
    tau = tsv_m(torch.stack([a, b]))
    # then both directions survive with their own singular values (no averaging, no 1/N)
    assert torch.allclose(tau, a + b, atol=1e-6)


def test_tsv_m_one_task_returns_it():
    d = _deltas(n=1, m=7, k=5)
    assert torch.allclose(tsv_m(d), d[0], atol=1e-5)


def test_non_matrices_are_averaged():
    d = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -3.0]])  # two biases
    for fn in (iso_c, tsv_m, iso_cts):
        assert torch.equal(fn(d), torch.tensor([2.0, 1.0, 0.0])), fn.__name__
    conv = _deltas(n=2, m=4, k=6).reshape(2, 2, 2, 2, 3)  # 4-D kernel: not a matrix either
    assert torch.allclose(iso_c(conv), conv.mean(0))
    # TSV-M's per-task shares of a non-matrix are deltas / N
    assert torch.allclose(tsv_m_components(d), d / 2)


# ---- against the dense references -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (10, 10)])
def test_iso_c_matches_dense_reference(shape):
    d = _deltas(3, *shape, seed=1)
    ref = _ref_iso_c(d.double().numpy())
    assert np.allclose(iso_c(d).numpy(), ref, atol=F32)


@pytest.mark.parametrize(("n", "shape"), [(3, (12, 9)), (2, (9, 12)), (4, (16, 16))])
def test_tsv_m_matches_dense_reference(n, shape):
    d = _deltas(n, *shape, seed=2)
    ref = _ref_tsv_m(d.double().numpy())
    assert np.allclose(tsv_m(d).numpy(), ref, atol=F32)


@pytest.mark.parametrize(("n", "shape", "fraction"), [(3, (12, 9), 0.8), (2, (10, 14), 0.5), (4, (16, 16), 0.8)])
def test_iso_cts_matches_dense_reference(n, shape, fraction):
    d = _deltas(n, *shape, seed=3)
    ref = _ref_iso_cts(d.double().numpy(), fraction)
    assert np.allclose(iso_cts(d, common_fraction=fraction).numpy(), ref, atol=F32)


def test_float64_input_computes_in_float64():
    d = _deltas(3, 12, 9, seed=4, dtype=torch.float64)
    out = tsv_m(d)
    assert out.dtype == torch.float64
    assert np.allclose(out.numpy(), _ref_tsv_m(d.numpy()), atol=1e-12)


def test_half_precision_input_computes_in_float32():
    d = _deltas(3, 12, 9, seed=5).to(torch.bfloat16)
    assert iso_c(d).dtype == torch.float32
    assert np.allclose(iso_c(d).numpy(), _ref_iso_c(d.double().numpy()), atol=1e-4)


# ---- invariants --------------------------------------------------------------------------------
def test_iso_c_spectrum_is_flat():
    tau = iso_c(_deltas(4, 15, 11, seed=6))
    s = torch.linalg.svdvals(tau.double())
    assert s.min() > 0
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-5)


def test_iso_cts_spectrum_is_flat_and_full_fraction_is_iso_c():
    d = _deltas(3, 14, 10, seed=7)
    s = torch.linalg.svdvals(iso_cts(d).double())
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-5)
    assert torch.allclose(iso_cts(d, common_fraction=1.0), iso_c(d), atol=1e-5)


def test_iso_cts_ranks_split_the_rank_evenly():
    for shape, n in [((10, 12), 3), ((768, 3072), 8), ((5, 5), 7), ((2, 9), 1)]:
        common, per = iso_cts_ranks(shape, n)
        assert common + n * per == min(shape) and common >= 0 and per >= 0
    assert iso_cts_ranks((10, 12), 3) == (7, 1)  # int(8) common, round(2/3) = 1 per task -> 7 common
    assert iso_cts_ranks((100, 100), 4, 0.8) == (80, 5)
    with pytest.raises(ValueError, match="common_fraction"):
        iso_cts_ranks((4, 4), 2, 1.5)


def test_tsv_m_factors_are_orthonormal_and_components_sum_to_the_merge():
    d = _deltas(3, 15, 12, seed=8)
    u_o, s_cat, vh_o, k = subspace._tsv_factors(d)
    assert k == 4 and u_o.shape == (15, 12) and vh_o.shape == (12, 12)
    eye = torch.eye(12)
    assert torch.allclose(u_o.T @ u_o, eye, atol=1e-5)
    assert torch.allclose(vh_o @ vh_o.T, eye, atol=1e-5)
    parts = tsv_m_components(d)
    assert parts.shape == d.shape
    assert torch.allclose(parts.sum(0), tsv_m(d), atol=1e-5)


def test_tsv_rank_keeps_at_least_one_triplet_per_task():
    assert tsv_rank((768, 3072), 8) == 96
    assert tsv_rank((3, 10), 5) == 1
    # a 3-row matrix merged from 5 tasks keeps one direction of each (the paper's code would keep none)
    out = tsv_m(_deltas(5, 3, 10, seed=9))
    assert out.shape == (3, 10) and out.abs().sum() > 0


def test_results_do_not_depend_on_singular_vector_signs():
    d = _deltas(3, 10, 8, seed=10)
    real_svd = torch.linalg.svd

    def flipped(a, full_matrices=True):  # same factorisation, every other sign flipped
        u, s, vh = real_svd(a, full_matrices=full_matrices)
        sign = torch.ones(s.shape[-1], dtype=a.dtype)
        sign[::2] = -1
        return u * sign, s, vh * sign[:, None]

    expected = {fn.__name__: fn(d) for fn in (iso_c, iso_cts, tsv_m)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "svd", flipped)
        for fn in (iso_c, iso_cts, tsv_m):
            assert torch.allclose(fn(d), expected[fn.__name__], atol=1e-5), fn.__name__


def test_deterministic():
    d = _deltas(3, 12, 9, seed=11)
    for fn in (iso_c, iso_cts, tsv_m):
        assert torch.equal(fn(d), fn(d))


# ---- numerics: float64 fallback -----------------------------------------------------------------
def test_svd_falls_back_to_float64_when_float32_does_not_converge(monkeypatch):
    real_svd = torch.linalg.svd
    calls: list[torch.dtype] = []

    def flaky(a, full_matrices=True):
        calls.append(a.dtype)
        if a.dtype == torch.float32 and calls.count(torch.float32) == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    d = _deltas(2, 8, 6, seed=12)
    expected = iso_c(d)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    out = iso_c(d)
    assert calls == [torch.float32, torch.float64]
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)


def test_svd_float64_failure_is_not_hidden(monkeypatch):
    def broken(a, full_matrices=True):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(torch.linalg.LinAlgError):
        svd(torch.eye(3))


def test_orthogonalize_returns_the_polar_factor():
    a = _deltas(1, 9, 4, seed=13)[0]
    q = orthogonalize(a)
    assert np.allclose(q.numpy(), _polar(a.double().numpy()), atol=1e-5)


def test_bad_input_is_refused_with_its_shape():
    with pytest.raises(ValueError, match="deltas must be a tensor"):
        iso_c(torch.tensor(1.0))
    with pytest.raises(ValueError, match="floating point"):
        tsv_m(torch.ones(2, 3, 3, dtype=torch.int64))


# ---- devices ---------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fn", [iso_c, iso_cts, tsv_m, tsv_m_components])
def test_cuda_matches_cpu(fn):
    d = _deltas(3, 24, 16, seed=14)
    out = fn(d.cuda())
    assert out.is_cuda
    assert torch.allclose(out.cpu(), fn(d), atol=1e-4)


@pytest.mark.cuda
@cuda
def test_cuda_float64_fallback(monkeypatch):
    real_svd = torch.linalg.svd
    calls: list[torch.dtype] = []

    def flaky(a, full_matrices=True):
        calls.append(a.dtype)
        if a.dtype == torch.float32 and len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    d = _deltas(2, 8, 6, seed=15)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    out = iso_c(d.cuda())
    assert calls[:2] == [torch.float32, torch.float64] and out.is_cuda and out.dtype == torch.float32
    monkeypatch.setattr(torch.linalg, "svd", real_svd)
    assert torch.allclose(out.cpu(), iso_c(d), atol=1e-4)


# ---- in the registry: streamed per tensor by the engine ------------------------------------------


def _models(n: int = 3, seed: int = 20) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "a.weight": torch.randn(8, 6, generator=g),
        "a.bias": torch.randn(8, generator=g),
        "b.weight": torch.randn(5, 8, generator=g),
        "steps": torch.tensor(7),
    }
    models = [
        {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


@pytest.mark.parametrize(("method", "fn", "lam"), [("tsv", tsv_m, 1.0), ("iso_c", iso_c, 1.3), ("iso_cts", iso_cts, 1.3)])
def test_registry_merge_is_base_plus_lam_times_the_per_tensor_function(method, fn, lam):
    base, models = _models()
    merged = merge(base, models, method=method)
    assert merged.report.lam == lam  # the method's own default scale
    for key in ("a.weight", "a.bias", "b.weight"):
        deltas = torch.stack([m[key] - base[key] for m in models])
        assert torch.allclose(merged[key], base[key] + lam * fn(deltas), atol=1e-5), key
    assert torch.equal(merged["steps"], base["steps"])  # integer buffers come from base
    assert torch.allclose(merge(base, models, method=method, lam=0.5)["a.weight"], base["a.weight"] + 0.5 * fn(
        torch.stack([m["a.weight"] - base["a.weight"] for m in models])), atol=1e-5)


def test_registry_declares_defaults_grids_and_decomposition():
    for name in ("tsv", "iso_c", "iso_cts"):
        m = get_method(name)
        assert m.searchable and max(m.lam_grid) == 3.0 and min(m.lam_grid) == 0.1 and len(m.lam_grid) == 30
    assert get_method("tsv").lam == 1.0
    assert get_method("iso_cts").parameters() == {"common_fraction": 0.8}
    assert get_method("tsv").decomposes and get_method("ties").decomposes and get_method("task_arithmetic").decomposes
    assert not get_method("iso_c").decomposes and not get_method("iso_cts").decomposes
    assert {"tsv", "iso_c", "iso_cts"} <= set(METHODS)


def test_iso_cts_parameter_reaches_the_function_and_is_checked_up_front():
    base, models = _models()
    full = merge(base, models, method="iso_cts", common_fraction=1.0)
    assert torch.allclose(full["a.weight"], merge(base, models, method="iso_c")["a.weight"], atol=1e-5)
    with pytest.raises(ValueError, match="common_fraction"):
        merge(base, models, method="iso_cts", common_fraction=2.0)


def test_tsv_components_sum_to_its_merge_and_iso_c_refuses_components():
    base, models = _models()
    tau = dict(TaskVectorMerger(base, models, get_method("tsv").build_spec()))
    parts = dict(TaskVectorMerger(base, models, get_method("tsv").build_spec()).components())
    for key in tau:
        assert parts[key].shape == (3, *tau[key].shape)
        assert torch.allclose(parts[key].sum(0), tau[key], atol=1e-5)
    with pytest.raises(ValueError, match="does not decompose into per-task components"):
        list(TaskVectorMerger(base, models, get_method("iso_c").build_spec()).components())


class _LoggingSource(StateDictSource):
    def __init__(self, state_dict, label, log):
        super().__init__(state_dict, label)
        self.log = log

    def get(self, key):
        self.log.append((self.label, key))
        return super().get(key)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_per_tensor_methods_stream_key_by_key(method):
    base, models = _models()
    log: list[tuple[str, str]] = []
    merger = TaskVectorMerger(
        _LoggingSource(base, "base", log),
        [_LoggingSource(m, f"m{i}", log) for i, m in enumerate(models)],
        get_method(method).build_spec(),
    )
    keys = iter(merger)
    first, _ = next(keys)
    assert {k for _, k in log} == {first}  # only the first tensor was read when it came out
    rest = [k for k, _ in keys]
    assert [first, *rest] == ["a.weight", "a.bias", "b.weight"]


def test_per_tensor_merge_in_float64_and_bad_specs():
    base, models = _models()
    out = merge(base, models, method="tsv", compute_dtype=torch.float64)
    deltas = torch.stack([m["b.weight"].double() - base["b.weight"].double() for m in models])
    assert torch.allclose(out["b.weight"].double(), base["b.weight"].double() + tsv_m(deltas), atol=1e-6)
    with pytest.raises(ValueError, match="tensor_fn"):
        MergeSpec("magnitude", tensor_fn=iso_c)


def test_non_finite_task_vectors_are_named():
    base, models = _models()
    models[1]["b.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\[1\].*'b.weight'"):
        merge(base, models, method="tsv")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_registry_merge_on_cuda_matches_cpu(method):
    base, models = _models()
    on_gpu = merge(base, models, method=method, device="cuda")
    on_cpu = merge(base, models, method=method)
    for key in on_cpu:
        assert on_gpu[key].is_cuda
        assert torch.allclose(on_gpu[key].cpu(), on_cpu[key], atol=1e-4), key
