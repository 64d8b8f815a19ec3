"""Data-free closed-form merges that read each task's input statistics off its own update: WUDI, ACE.

A linear layer ``y = W x`` (weight ``[out, in]``) merged for tasks whose inputs have covariance
``C_t`` is best merged (least squares on every task's outputs, as RegMean) by::

    tau_m = (sum_t tau_t C_t) (sum_t C_t)^-1

Without data ``C_t`` is unknown; both methods below estimate it from the task vector itself: a
gradient step moves each row of ``W`` along the inputs the layer saw, so the rows of ``tau_t``
span (approximately) task t's input subspace and ``tau_t^T tau_t`` is an estimate of ``C_t`` up
to scale. Like :mod:`~lightning_ties.merging.subspace`, every function takes the N task vectors
of ONE tensor stacked on dimension 0 (``deltas``: ``[N, *shape]``) and returns tau_m of that
tensor, so the engine streams them key by key. The solves run in float64 on the deltas'
device; the result comes back in float32 (float64 for float64 input).

- **WUDI** (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
  Data-Free Model Merging via Task Vectors"): ``C_t = tau_t^T tau_t / ||tau_t||_F^2``. The paper
  minimises ``sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2`` with Adam (300 steps from
  the task sum); this is the same quadratic solved exactly, with a ridge (see :func:`wudi`).
- **ACE** (Xu et al., CVPR 2026, "ACE-Merging: Data-Free Model Merging with Adaptive Covariance
  Estimation"): ``C_t`` from the row-centred update, trace-normalised when the tasks' update
  magnitudes are heterogeneous, a shared prior added to the system and, for heterogeneous
  layers, a flat-spectrum refinement (see :func:`ace`, which follows the authors' code).

Tensors that are not 2-D (biases, norms) are averaged, as both papers' code does. Every 2-D
tensor is treated as a linear layer ``[out, in]``: an embedding table is not one (its input is a
one-hot token), so leave embeddings out with ``exclude=`` (WUDI's own ViT script merges only the
attention and MLP matrices).
"""

from __future__ import annotations

import math

import torch

from .subspace import check_deltas, compute_dtype, mean_of_tasks  # the per-tensor methods' shared input rules

__all__ = [
    "ACE_EPS",
    "ACE_HETEROGENEITY",
    "ACE_RANK_FRACTION",
    "WUDI_RIDGE",
    "ace",
    "check_ace_parameters",
    "check_ridge",
    "wudi",
    "wudi_components",
]

#: WUDI's ridge, relative to the mean eigenvalue of ``sum_t C_t`` (see :func:`wudi`): chosen by
#: ``benchmarks/bench_methods.py`` at lam = 1 among 0.01, 1, 10 (and 100 on digits): digits
#: 71.7 / 88.3 / 89.1 / 87.0, MiniLM 80.8 / 84.9 / 84.8 (mean test accuracy, %).
WUDI_RIDGE = 10.0
#: ACE's defaults, as the authors' code: absolute ridge, refined rank fraction, heterogeneity threshold.
ACE_EPS = 1e-2
ACE_RANK_FRACTION = 0.3
ACE_HETEROGENEITY = 0.3


def check_ridge(ridge: float, name: str = "ridge") -> float:
    """``ridge`` must be a finite number >= 0; returns it as a float."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _solve_right(rhs: torch.Tensor, a: torch.Tensor, ridged: bool) -> torch.Tensor:
    """``rhs @ a^-1`` for a symmetric positive semi-definite ``a`` (float64).

    With a ridge ``a`` is positive definite: a Cholesky solve. Without one it may be singular
    (fewer task rows than inputs): the minimum-norm solution ``rhs @ pinv(a)``, so directions no
    task constrains get no update rather than an arbitrary one.
    """
    if ridged:
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(a, hermitian=True)


# ---- WUDI ---------------------------------------------------------------------------------------------
def _wudi_system(d: torch.Tensor, ridge: float) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
    """Each task's right-hand side ``tau_t C_t + mu tau_t``, the matrix ``sum_t C_t + mu I`` (float64), mu > 0."""
    n_tasks, _, n_in = d.shape
    a = torch.zeros(n_in, n_in, dtype=torch.float64, device=d.device)
    rhs = []
    for t in range(n_tasks):
        norm_sq = d[t].square().sum()
        if norm_sq == 0:  # a task that did not move this layer has no interference term
            rhs.append(torch.zeros_like(d[t]))
            continue
        c_t = (d[t].T @ d[t]) / norm_sq  # trace 1
        a += c_t
        rhs.append(d[t] @ c_t)
    # the ridge is relative to the mean eigenvalue of sum_t C_t (its trace over n_in)
    mu = ridge * float(a.diagonal().sum()) / n_in
    if mu > 0:
        a.diagonal().add_(mu)
        rhs = [r + mu * d[t] for t, r in enumerate(rhs)]
    return rhs, a, mu > 0


def wudi(deltas: torch.Tensor, ridge: float = WUDI_RIDGE) -> torch.Tensor:
    """WUDI merging: the merged update that least disturbs each task along its own update.

    For a 2-D weight ``[out, in]`` (Cheng et al., ICML 2025, Eq. 9 and its code)::

        L(X) = sum_t ||(X - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2
             = sum_t tr((X - tau_t) C_t (X - tau_t)^T),    C_t = tau_t^T tau_t / ||tau_t||_F^2
        dL/dX = 0  =>  X sum_t C_t = sum_t tau_t C_t

    The paper runs Adam on ``L`` (lr 1e-5, 300 steps) from ``X = sum_t tau_t``. Here the
    quadratic is solved exactly in float64, with a ridge ``mu ||X - sum_t tau_t||^2`` toward
    that same starting point::

        tau_m = (sum_t tau_t C_t + mu sum_t tau_t) (sum_t C_t + mu I)^-1,
        mu = ridge * tr(sum_t C_t) / in

    Why a ridge: ``sum_t C_t`` has a fast-decaying spectrum (task vectors are nearly low-rank),
    so the exact solution divides by tiny eigenvalues along directions no task really used; a
    finite number of Adam steps from the task sum leaves those directions near the sum, and the
    ridge does the same, smoothly (``ridge=0``: the exact minimiser, minimum-norm where
    ``sum_t C_t`` is singular). Measured, the near-exact solution is poor (ridge 0.01: 71.7% on
    the digits suite, below the pretrained model's 85.2; 80.8% on MiniLM, below TIES's 83.8) and
    the default ridge 10 is the best of those tried (89.1 and 84.8; see :data:`WUDI_RIDGE`). One task returns itself for every ridge; with ``ridge=0``,
    identical tasks return that task and tasks on orthogonal input subspaces keep their own
    updates. Tasks with an all-zero update of this tensor carry no term. Other tensors: the
    mean of the task vectors (as the FusionBench port; the paper's ViT script leaves them at
    the pretrained values). Applied with lam = 1 (the paper has no scaling coefficient).

    Args:
        deltas: ``[N, *shape]``, the N task vectors of one tensor.
        ridge: the ridge relative to the mean eigenvalue of ``sum_t C_t`` (>= 0).

    Returns:
        tau_m of shape ``shape`` (float32, or float64 for float64 input), on the deltas' device.

    Example:
        >>> d = torch.stack([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])])
        >>> wudi(d, ridge=0.0)  # inputs on orthogonal axes: each task keeps its own update
        tensor([[2., 3.]])
    """
    check_deltas(deltas)
    ridge = check_ridge(ridge)
    if deltas.dim() != 3:
        return mean_of_tasks(deltas)
    rhs, a, ridged = _wudi_system(deltas.to(torch.float64), ridge)
    return _solve_right(torch.stack(rhs).sum(0), a, ridged).to(compute_dtype(deltas))


def wudi_components(deltas: torch.Tensor, ridge: float = WUDI_RIDGE) -> torch.Tensor:
    """WUDI's per-task shares: ``[N, *shape]`` whose sum over tasks is :func:`wudi`.

    Task t's share is ``(tau_t C_t + mu tau_t)(sum_s C_s + mu I)^-1`` (the solve is linear in
    the right-hand side); other tensors share the mean equally (``deltas[t] / N``). Learned
    merging coefficients scale each share.

    Example:
        >>> d = torch.stack([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])])
        >>> wudi_components(d, ridge=0.0)[1]
        tensor([[0., 3.]])
    """
    check_deltas(deltas)
    ridge = check_ridge(ridge)
    if deltas.dim() != 3:
        return deltas.to(compute_dtype(deltas)) / deltas.shape[0]
    rhs, a, ridged = _wudi_system(deltas.to(torch.float64), ridge)
    n_tasks, n_out, n_in = deltas.shape
    # one solve for every task's share: stack the right-hand sides along the rows
    shares = _solve_right(torch.cat(rhs, dim=0), a, ridged).view(n_tasks, n_out, n_in)
    return shares.to(compute_dtype(deltas))


# ---- ACE ----------------------------------------------------------------------------------------------
def _heterogeneous(traces: torch.Tensor, threshold: float) -> bool:
    """ACE's switch: the spread of the tasks' log update energies, ``var(log tr) / mean(log tr)^2``."""
    if traces.numel() < 2:  # one task: no spread (the authors' unbiased variance would be NaN)
        return False
    log_tr = torch.log(traces + 1e-12)
    gamma = torch.var(log_tr) / (log_tr.mean().square() + 1e-12)
    return bool(gamma > threshold)


def check_ace_parameters(eps: float, rank_fraction: float, heterogeneity_threshold: float) -> float:
    """Refuse ACE parameters out of range (naming the value); returns ``eps`` as a float."""
    eps = check_ridge(eps, "eps")
    if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float)) or not 0.0 < rank_fraction <= 1.0:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
    if (
        isinstance(heterogeneity_threshold, bool)
        or not isinstance(heterogeneity_threshold, (int, float))
        or not heterogeneity_threshold >= 0
    ):
        raise ValueError(f"heterogeneity_threshold must be a number >= 0, got {heterogeneity_threshold!r}")
    return eps


def ace(
    deltas: torch.Tensor,
    eps: float = ACE_EPS,
    rank_fraction: float = ACE_RANK_FRACTION,
    heterogeneity_threshold: float = ACE_HETEROGENEITY,
) -> torch.Tensor:
    """ACE-Merging: covariances estimated from the updates, a shared prior, spectral refinement.

    For a 2-D weight ``[out, in]``, step by step as the authors' code (``ace_merging`` in
    ``unravel-xu/ACE-Merging``, ``src/merge/strategy.py``), every matrix in float64::

        h    = var(log e) / mean(log e)^2 > heterogeneity_threshold,  e_t = ||tau_t||_F^2
               (unbiased variance over tasks: heterogeneous update magnitudes)
        W_t  = tau_t - mean_rows(tau_t)                 rows centred: the rows are the samples
        S_t  = W_t^T W_t,  r_t = tr(S_t)                covariance estimate of task t
        h:     S_t <- S_t / r_t,  eps_t = eps / r_t     adaptive normalisation
        else:  eps_t = eps
        A    = sum_t (S_t + eps_t I) + p,   p = colmean(sum_t S_t) [/ mean_t e_t when h]
        B    = sum_t W_t (S_t + eps_t I)
        W_0  = B A^-1                                   closed form with the shared prior p
        h:     R = sum_t tau_t (S_t - (1/T) sum_s (S_s + eps_s I)) + W_0 = U diag(s) V^T
               tau_m = W_0 + mean(s[:k]) U[:, :k] V[:, :k]^T,   k = int(rank_fraction * rank)
        else:  tau_m = W_0

    Where this may differ from the paper's text (which could not be read here; the code is
    what produced its tables): the prior ``p`` is the column mean of the summed covariances, a
    row vector added to every row of ``A`` (the code's ``mean(dim=0, keepdim=True)``), not a
    full matrix; ``B`` uses the centred updates, so without refinement the merged rows have
    zero mean; the ridge ``eps`` is absolute, so how strongly it pulls toward the plain mean of
    the centred updates depends on the updates' scale. ``k`` is at least 1 (the code's mean of
    zero values is NaN for rank < 4). Other tensors: the mean of the task vectors (as the code).
    Applied with lam = 1 (the code's scaling coefficient).

    Example:
        >>> d = torch.stack([torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, -2.0]])])
        >>> ace(d).shape
        torch.Size([2, 2])
    """
    check_deltas(deltas)
    eps = check_ace_parameters(eps, rank_fraction, heterogeneity_threshold)
    if deltas.dim() != 3:
        return mean_of_tasks(deltas)
    d = deltas.to(torch.float64)
    n_tasks, _, n_in = d.shape
    energies = d.flatten(1).square().sum(1)
    hetero = _heterogeneous(energies, heterogeneity_threshold)
    eye = torch.eye(n_in, dtype=torch.float64, device=d.device)
    covs, ridged_sum, numerator = [], torch.zeros_like(eye), torch.zeros_like(d[0])
    for t in range(n_tasks):
        centred = d[t] - d[t].mean(0, keepdim=True)
        cov = centred.T @ centred
        trace = cov.diagonal().sum() + 1e-12
        eps_t = eps / trace if hetero else eps
        if hetero:
            cov = cov / trace
        covs.append(cov)
        ridged = cov + eps_t * eye
        ridged_sum += ridged
        numerator += centred @ ridged
    prior = torch.stack(covs).sum(0).mean(0, keepdim=True)  # [1, in]: broadcast over the rows of A
    if hetero:
        prior = prior / (energies.mean() + 1e-12)
    a = ridged_sum + prior  # not symmetric: X A = B is solved as A^T X^T = B^T
    try:
        merged = torch.linalg.solve(a.T, numerator.T).T
    except torch.linalg.LinAlgError:  # singular (eps=0, rank-deficient updates): pinv, as the code's fallback
        merged = numerator @ torch.linalg.pinv(a)
    if hetero:
        mean_cov = ridged_sum / n_tasks
        fused = merged + sum(d[t] @ (covs[t] - mean_cov) for t in range(n_tasks))
        u, s, vh = torch.linalg.svd(fused, full_matrices=False)
        k = max(1, int(s.numel() * rank_fraction))
        merged = merged + s[:k].mean() * (u[:, :k] @ vh[:k])
    return merged.to(compute_dtype(deltas))
