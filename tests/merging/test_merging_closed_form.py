"""WUDI and ACE on one tensor, against dense references written from the papers, and in the registry.

The references take another numerical route than the library: WUDI's normal equations are
written out over the vectorised weight with Kronecker products and solved with numpy (plus the
paper's own loss, differentiated by autograd, must vanish at the solution); ACE is the authors'
code transcribed line by line into numpy with an explicit inverse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ties import merge
from lightning_ties.merging import METHODS, StateDictSource, TaskVectorMerger, get_method
from lightning_ties.merging.closed_form import ace, check_ridge, wudi, wudi_components
from lightning_ties.merging.methods import AUTO_METHOD, resolve_method

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _deltas(n: int = 3, m: int = 7, k: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, k, generator=g, dtype=torch.float64).to(dtype)


# ---- dense references ----------------------------------------------------------------------------
def _ref_wudi(d: np.ndarray, ridge: float) -> np.ndarray:
    """Minimise sum_t ||(X - T_t) T_t^T||^2 / ||T_t||^2 + mu ||X - sum_t T_t||^2 over vec(X) (row-major)."""
    n, m, k = d.shape
    hess = np.zeros((m * k, m * k))
    grad = np.zeros(m * k)
    for t in range(n):
        # ||(X - T) T^T||^2 = sum_i (x_i - t_i)^T (T^T T) (x_i - t_i): the rows decouple
        block = np.kron(np.eye(m), d[t].T @ d[t]) / np.sum(d[t] ** 2)
        hess += block
        grad += block @ d[t].reshape(-1)
    mu = ridge * np.trace(hess) / (m * k)  # mean eigenvalue of sum_t C_t (each block repeats it m times)
    hess += mu * np.eye(m * k)
    grad += mu * d.sum(0).reshape(-1)
    return np.linalg.lstsq(hess, grad, rcond=None)[0].reshape(m, k)


def _paper_loss(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """WUDI's objective as its code writes it (disturbance times the task's own update)."""
    norms = d.reshape(d.shape[0], -1).norm(dim=-1).square()
    product = (x.unsqueeze(0) - d) @ d.transpose(1, 2)
    return (product.square() / norms[:, None, None]).sum()


def _ref_ace(d: np.ndarray, eps: float = 1e-2, k_frac: float = 0.3, threshold: float = 0.3) -> np.ndarray:
    """ACE-Merging's ``ace_merging`` (unravel-xu/ACE-Merging, src/merge/strategy.py), line by line."""
    n, _, k_in = d.shape
    traces = np.array([np.trace(w.T @ w) for w in d])
    log_traces = np.log(traces + 1e-12)
    gamma = np.var(log_traces, ddof=1) / (np.mean(log_traces) ** 2 + 1e-12) if n > 1 else 0.0
    flag = gamma > threshold
    avg_trace = traces.mean()
    sigmas, w_sigma_sum, sigma_sum = [], np.zeros_like(d[0]), np.zeros((k_in, k_in))
    for w in d:
        w = w - w.mean(axis=0, keepdims=True)
        sigma_raw = w.T @ w
        tr = np.trace(sigma_raw) + 1e-12
        sigma, eps_t = (sigma_raw / tr, eps / tr) if flag else (sigma_raw, eps)
        sigmas.append(sigma)
        sigma = sigma + eps_t * np.eye(k_in)
        w_sigma_sum += w @ sigma
        sigma_sum += sigma
    c_agg = np.mean(sum(sigmas), axis=0, keepdims=True)
    if flag:
        c_agg = c_agg / (avg_trace + 1e-12)
    w0 = w_sigma_sum @ np.linalg.inv(sigma_sum + c_agg)
    if not flag:
        return w0
    sigma_mean = sigma_sum / n
    delta_res = sum(w @ (s - sigma_mean) for w, s in zip(d, sigmas))
    u, s, vh = np.linalg.svd(delta_res + w0, full_matrices=False)
    k = max(1, int(s.size * k_frac))
    return w0 + s[:k].mean() * (u[:, :k] @ vh[:k])


# ---- WUDI: by hand and against the references ------------------------------------------------------
def test_wudi_by_hand_tasks_on_orthogonal_inputs_keep_their_own_updates():
    # given task 1 moves only input 0 and task 2 only input 1
    d = torch.stack([torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, -1.0]])])
    # then neither disturbs the other: the merge is their sum, whatever the ridge
    for ridge in (0.0, 0.01, 10.0):
        assert torch.allclose(wudi(d, ridge=ridge), d.sum(0), atol=1e-6), ridge


@pytest.mark.parametrize("ridge", [0.0, 0.01, 1.0, 10.0])
@pytest.mark.parametrize(("n", "shape"), [(3, (7, 5)), (2, (4, 9)), (4, (6, 6))])
def test_wudi_matches_the_dense_normal_equations(n, shape, ridge):
    d = _deltas(n, *shape, seed=1)
    ref = _ref_wudi(d.numpy(), ridge)
    assert np.allclose(wudi(d, ridge=ridge).numpy(), ref, atol=1e-9)


def test_wudi_without_ridge_zeroes_the_gradient_of_the_papers_loss():
    d = _deltas(3, 8, 6, seed=2)
    x = wudi(d, ridge=0.0).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_paper_loss(x, d), x)
    assert grad.abs().max() < 1e-10
    # and it is a minimum: the task sum (the paper's starting point) has a larger loss
    assert _paper_loss(x, d) < _paper_loss(d.sum(0), d)


def test_wudi_ridge_pulls_toward_the_task_sum():
    d = _deltas(3, 6, 10, seed=3)
    exact, sum_ = wudi(d, ridge=0.0), d.sum(0)
    gaps = [(wudi(d, ridge=r) - sum_).norm() for r in (0.0, 0.1, 1.0, 100.0)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.05 * (exact - sum_).norm()


# ---- WUDI: invariants --------------------------------------------------------------------------------
def test_wudi_one_task_returns_itself_for_every_ridge():
    d = _deltas(1, 6, 4, seed=4)
    for ridge in (0.0, 0.01, 3.0):
        assert torch.allclose(wudi(d, ridge=ridge), d[0], atol=1e-10), ridge
    wide = _deltas(1, 3, 8, seed=5)  # rank-deficient C: the minimum-norm solve still gives the task
    assert torch.allclose(wudi(wide, ridge=0.0), wide[0], atol=1e-10)


def test_wudi_identical_tasks_give_that_task_without_ridge():
    d = _deltas(1, 5, 7, seed=6).expand(4, 5, 7)
    assert torch.allclose(wudi(d, ridge=0.0), d[0], atol=1e-9)


def test_wudi_tasks_on_orthogonal_input_subspaces_recover_their_own_updates():
    # given three tasks whose rows live in mutually orthogonal 3-D subspaces of a 9-D input
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    bases = [q[:, 3 * t : 3 * t + 3] for t in range(3)]
    d = torch.stack([torch.randn(5, 3, dtype=torch.float64) @ b.T for b in bases])
    for ridge in (0.0, 0.5):
        tau = wudi(d, ridge=ridge)
        for t, b in enumerate(bases):  # seen through task t's inputs, the merge is task t's update
            assert torch.allclose(tau @ b, d[t] @ b, atol=1e-9), (ridge, t)


def test_wudi_ignores_tasks_that_did_not_move_the_tensor():
    d = _deltas(2, 5, 4, seed=8)
    with_zero = torch.cat([d, torch.zeros(1, 5, 4, dtype=torch.float64)])
    assert torch.allclose(wudi(with_zero, ridge=0.0), wudi(d, ridge=0.0), atol=1e-10)
    assert torch.equal(wudi(torch.zeros(3, 4, 2)), torch.zeros(4, 2))


def test_wudi_components_sum_to_the_merge_and_non_matrices_are_averaged():
    d = _deltas(3, 6, 5, seed=9)
    parts = wudi_components(d)
    assert parts.shape == d.shape and torch.allclose(parts.sum(0), wudi(d), atol=1e-10)
    bias = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    assert torch.equal(wudi(bias), torch.tensor([2.0, 0.0])) and torch.equal(wudi_components(bias), bias / 2)
    assert torch.equal(ace(bias), torch.tensor([2.0, 0.0]))


# ---- ACE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "shape", "scales"),
    [
        (3, (7, 5), (1.0, 1.0, 1.0)),  # homogeneous: closed form with the prior only
        (3, (7, 5), (1.0, 30.0, 0.02)),  # heterogeneous energies: normalisation + spectral refinement
        (4, (6, 12), (1.0, 1.0, 1e3, 1e-3)),
        (2, (12, 6), (0.1, 0.1)),  # small updates: the ridge dominates
    ],
)
def test_ace_matches_the_authors_code_line_by_line(n, shape, scales):
    d = _deltas(n, *shape, seed=10) * torch.tensor(scales, dtype=torch.float64).view(-1, 1, 1)
    assert np.allclose(ace(d).numpy(), _ref_ace(d.numpy()), rtol=1e-8, atol=1e-10)


def test_ace_parameters_reach_the_equations():
    d = _deltas(3, 7, 5, seed=11) * torch.tensor([1.0, 30.0, 0.02], dtype=torch.float64).view(-1, 1, 1)
    got = ace(d, eps=0.5, rank_fraction=0.6, heterogeneity_threshold=0.1)
    assert np.allclose(got.numpy(), _ref_ace(d.numpy(), eps=0.5, k_frac=0.6, threshold=0.1), rtol=1e-8, atol=1e-10)
    # a threshold above the spread switches the refinement off
    assert np.allclose(ace(d, heterogeneity_threshold=1e9).numpy(), _ref_ace(d.numpy(), threshold=1e9), atol=1e-10)


def test_ace_identical_tasks_give_what_one_task_gives():
    d = _deltas(1, 6, 5, seed=12)
    assert torch.allclose(ace(d.expand(4, 6, 5)), ace(d), atol=1e-10)


def test_ace_one_task_keeps_its_centred_update_up_to_the_prior_and_ridge():
    # the authors' estimate works on row-centred updates, so one task comes back centred (the
    # mean row is dropped) and shrunk by the prior and the ridge, not as itself
    d = _deltas(1, 40, 4, seed=13)
    centred = d[0] - d[0].mean(0, keepdim=True)
    out = ace(d, eps=0.0)
    assert torch.allclose(out.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-10)
    assert (out - centred).norm() < 0.5 * centred.norm()
    assert not torch.allclose(out, d[0], atol=1e-3)


def test_ace_does_not_depend_on_task_order():
    d = _deltas(4, 6, 5, seed=14) * torch.tensor([1.0, 30.0, 0.02, 3.0], dtype=torch.float64).view(-1, 1, 1)
    assert torch.allclose(ace(d), ace(d.flip(0)), atol=1e-9)


# ---- numerics, dtypes, devices -----------------------------------------------------------------------
@pytest.mark.parametrize("fn", [wudi, ace, wudi_components])
@pytest.mark.parametrize(("dtype", "out"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_dtype_is_preserved_and_the_solve_runs_in_float64(fn, dtype, out, monkeypatch):
    d = _deltas(3, 6, 5, seed=15, dtype=dtype)
    seen: list[torch.dtype] = []
    for name in ("cholesky_ex", "solve"):
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda a, *args, _real=real, **kw: (seen.append(a.dtype), _real(a, *args, **kw))[1])
    result = fn(d)
    assert result.dtype == out and result.device == d.device
    assert seen and set(seen) == {torch.float64}
    assert torch.allclose(result.double(), fn(d.double()), atol=1e-5 if dtype == torch.float32 else 1e-1)


def test_float32_input_gets_the_float64_answer_on_an_ill_conditioned_layer():
    # the inputs' scales span 1e-3..1: float32 normal equations would lose several digits
    d = _deltas(3, 10, 6, seed=16) * torch.logspace(-3, 0, 6, dtype=torch.float64)
    assert torch.allclose(wudi(d.float(), ridge=0.0).double(), wudi(d, ridge=0.0), rtol=1e-4, atol=1e-6)


def test_bad_input_and_parameters_are_refused_with_their_values():
    with pytest.raises(ValueError, match="deltas must be a tensor"):
        wudi(torch.tensor(1.0))
    with pytest.raises(ValueError, match="floating point"):
        ace(torch.ones(2, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ridge must be a finite number >= 0, got -1"):
        wudi(_deltas(), ridge=-1)
    with pytest.raises(ValueError, match="ridge"):
        check_ridge(float("nan"))
    with pytest.raises(ValueError, match=r"rank_fraction must be in \(0, 1\], got 0"):
        ace(_deltas(), rank_fraction=0)
    with pytest.raises(ValueError, match="eps must be"):
        ace(_deltas(), eps=-0.1)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fn", [wudi, wudi_components, ace])
def test_cuda_matches_cpu(fn):
    d = _deltas(3, 24, 16, seed=17, dtype=torch.float32) * torch.tensor([1.0, 30.0, 0.02]).view(-1, 1, 1)
    out = fn(d.cuda())
    assert out.is_cuda and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), fn(d), rtol=1e-4, atol=1e-5)


# ---- in the registry: streamed per tensor by the engine ------------------------------------------------
def _models(n: int = 3, seed: int = 20) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(8, 6, generator=g), "a.bias": torch.randn(8, generator=g), "b.weight": torch.randn(5, 8, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize(("method", "fn"), [("wudi", wudi), ("ace", ace)])
def test_registry_merge_is_base_plus_lam_times_the_per_tensor_function(method, fn):
    base, models = _models()
    merged = merge(base, models, method=method)
    assert merged.report.lam == 1.0  # the papers apply their closed form as it is
    for key in base:
        deltas = torch.stack([m[key] - base[key] for m in models])
        assert torch.allclose(merged[key], base[key] + fn(deltas), atol=1e-5), key
    half = merge(base, models, method=method, lam=0.5)["b.weight"]
    assert torch.allclose(half, base["b.weight"] + 0.5 * fn(torch.stack([m["b.weight"] - base["b.weight"] for m in models])), atol=1e-5)


def test_registry_parameters_reach_the_functions_and_are_checked_up_front():
    base, models = _models()
    deltas = torch.stack([m["a.weight"] - base["a.weight"] for m in models])
    assert torch.allclose(merge(base, models, method="wudi", ridge=0.0)["a.weight"], base["a.weight"] + wudi(deltas, ridge=0.0), atol=1e-5)
    assert torch.allclose(merge(base, models, method="ace", eps=0.5)["a.weight"], base["a.weight"] + ace(deltas, eps=0.5), atol=1e-5)
    assert get_method("wudi").parameters() == {"ridge": 10.0}
    assert get_method("ace").parameters() == {"eps": 0.01, "rank_fraction": 0.3, "heterogeneity_threshold": 0.3}
    with pytest.raises(ValueError, match="ridge"):
        get_method("wudi").build_spec(ridge=-1.0)
    with pytest.raises(ValueError, match="rank_fraction"):
        get_method("ace").build_spec(rank_fraction=2.0)


def test_wudi_decomposes_into_shares_and_ace_does_not():
    base, models = _models()
    assert get_method("wudi").decomposes and not get_method("ace").decomposes
    tau = dict(TaskVectorMerger(base, models, get_method("wudi").build_spec()))
    parts = dict(TaskVectorMerger(base, models, get_method("wudi").build_spec()).components())
    for key in tau:
        assert parts[key].shape == (3, *tau[key].shape)
        assert torch.allclose(parts[key].sum(0), tau[key], atol=1e-5)
    with pytest.raises(ValueError, match="does not decompose"):
        list(TaskVectorMerger(base, models, get_method("ace").build_spec()).components())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("method", ["wudi", "ace"])
def test_registry_merge_on_cuda_matches_cpu(method):
    base, models = _models()
    on_gpu = merge({k: v.cuda() for k, v in base.items()}, [{k: v.cuda() for k, v in m.items()} for m in models], method=method)
    on_cpu = merge(base, models, method=method)
    for key, value in on_cpu.items():
        assert on_gpu[key].is_cuda and on_gpu[key].dtype == value.dtype
        assert torch.allclose(on_gpu[key].cpu(), value, rtol=1e-4, atol=1e-5), key


class _LoggingSource(StateDictSource):
    def __init__(self, state_dict, label, log):
        super().__init__(state_dict, label)
        self.log = log

    def get(self, key):
        self.log.append((self.label, key))
        return super().get(key)


@pytest.mark.parametrize("method", ["wudi", "ace"])
def test_streamed_key_by_key(method):
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
    assert [first, *(k for k, _ in keys)] == ["a.weight", "a.bias", "b.weight"]


# ---- method="auto" without data -------------------------------------------------------------------------
def test_auto_resolves_to_the_best_data_free_method_on_record():
    assert resolve_method("auto") == AUTO_METHOD
    m = get_method(AUTO_METHOD)
    assert AUTO_METHOD in METHODS and not m.needs_data and m.searchable
    assert resolve_method("ties") == "ties"  # any registry name is itself
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        resolve_method("nope")
