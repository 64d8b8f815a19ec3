"""Data-free subspace merges, one weight tensor at a time: TSV-M, Iso-C and Iso-CTS.

Every function here takes the N task vectors of ONE tensor stacked on dimension 0
(``deltas``: ``[N, *shape]``, ``deltas[t] = theta_t - theta_base``) and returns the merged
task vector tau_m of that tensor (``shape``), before the scale lam (the papers' alpha):
``theta = theta_base + alpha * tau_m``. Because they need nothing beyond one tensor's task
vectors, the engine streams them key by key like TIES, never holding the whole model.

- **TSV-M** (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
  Model Merging"): keep each task's top ``min(m, n) / T`` singular triplets, concatenate them,
  orthogonalise the concatenated U and V, recombine with the kept singular values.
- **Iso-C** (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
  Common and Task-Specific Subspaces"): SVD of the summed task matrices, every singular value
  replaced by their mean (a flat, isotropic spectrum).
- **Iso-CTS** (same paper): Iso-C's common subspace (the sum's top directions) completed with
  each task's own directions outside it, orthogonalised, with a flat spectrum.

The SVDs run in float32 (float64 when the deltas are float64) on the deltas' device; where
float32 fails to converge (sparse embedding deltas, large vocabularies) they are redone in
float64. Tensors that are not 2-D (biases, norms, conv kernels) are averaged, as in the papers'
code. The results do not depend on the signs an SVD routine picks for its singular vectors
(each formula only uses products ``u_i v_i^T``), so CPU and GPU agree up to rounding.
"""

from __future__ import annotations

import torch

__all__ = [
    "iso_c",
    "iso_cts",
    "iso_cts_ranks",
    "orthogonalize",
    "svd",
    "tsv_m",
    "tsv_m_components",
    "tsv_rank",
]


def check_deltas(deltas: torch.Tensor) -> None:
    if not isinstance(deltas, torch.Tensor) or deltas.dim() < 1 or deltas.shape[0] < 1:
        raise ValueError(
            "deltas must be a tensor [N, *shape] holding the N task vectors of one tensor "
            f"(N >= 1), got {type(deltas).__name__} of shape {tuple(getattr(deltas, 'shape', ()))}"
        )
    if not deltas.is_floating_point():
        raise ValueError(f"deltas must be floating point, got {deltas.dtype}; cast the task vectors first")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, float32) computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``matrix = U diag(S) Vh`` in float32, redone in float64 if float32 fails.

    LAPACK / cuSOLVER can fail to converge in float32 on badly conditioned matrices (task
    vectors of embeddings where most rows never moved); float64 converges there. The factors
    come back in the matrix's compute dtype (float32, or float64 for float64 input), on its
    device.

    Example:
        >>> U, S, Vh = svd(torch.diag(torch.tensor([3.0, 1.0])))
        >>> S
        tensor([3., 1.])
    """
    dtype = compute_dtype(matrix)
    a = matrix.to(dtype)
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:  # no convergence (not out-of-memory: that would only get worse)
        if dtype == torch.float64:
            raise
    u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    return u.to(dtype), s.to(dtype), vh.to(dtype)


def orthogonalize(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``a`` (Procrustes / polar factor): ``P Q^T`` of ``a = P S Q^T``.

    For a tall ``a`` ([m, k], k <= m) the result has orthonormal columns; for a wide one,
    orthonormal rows.

    Example:
        >>> orthogonalize(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        tensor([[1., 0.],
                [0., 1.]])
    """
    p, _, qh = svd(a)
    return p @ qh


def mean_of_tasks(deltas: torch.Tensor) -> torch.Tensor:
    return deltas.to(compute_dtype(deltas)).mean(0)


def _is_matrix(deltas: torch.Tensor) -> bool:
    return deltas.dim() == 3


def iso_c(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C: the summed task matrix with a flat (isotropic) spectrum.

    For a 2-D weight (Marczak et al., 2025, Eq. 6-7)::

        Delta = sum_t Delta_t = U S V^T                (thin SVD, r = min(m, n) values)
        tau_m = sigma_bar U V^T,   sigma_bar = (1/r) sum_i sigma_i

    so every singular direction of the sum gets the same weight and no task's directions are
    drowned by another's. Other tensors: the mean of the task vectors (as the paper's code).
    The paper scales the result by alpha (its code searches 0.1..3.0 on validation data):
    that is lam here.

    Args:
        deltas: ``[N, *shape]``, the N task vectors of one tensor.

    Returns:
        tau_m of shape ``shape`` (float32, or float64 for float64 input).

    Example:
        >>> d = torch.stack([torch.diag(torch.tensor([4.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
        >>> iso_c(d)
        tensor([[3., 0.],
                [0., 3.]])
    """
    check_deltas(deltas)
    if not _is_matrix(deltas):
        return mean_of_tasks(deltas)
    u, s, vh = svd(deltas.to(compute_dtype(deltas)).sum(0))
    return s.mean() * (u @ vh)


def iso_cts_ranks(shape: tuple[int, ...] | torch.Size, n_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """Iso-CTS's split of the rank ``r = min(m, n)``: (common rank, rank per task).

    As the paper's code: the common subspace takes ``int(r * common_fraction)`` directions,
    then gives back or takes a few so that the remainder divides evenly among the N tasks
    (``common + N * per_task == r``).

    Example:
        >>> iso_cts_ranks((10, 12), n_tasks=3)
        (7, 1)
    """
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction!r}")
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    r = min(shape)
    common = int(r * common_fraction)
    # Python's round, as the paper's code; capped so that the common rank never goes negative
    per_task = min(round((r - common) / n_tasks), r // n_tasks)
    return r - n_tasks * per_task, per_task


def iso_cts(deltas: torch.Tensor, common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS: common subspace plus each task's own subspace, orthogonalised, flat spectrum.

    For a 2-D weight (Marczak et al., 2025, Sec. 4.2), with ``r = min(m, n)`` split as
    :func:`iso_cts_ranks` (k common directions, s per task, k + N s = r)::

        sum_t Delta_t = U S V^T                         common subspace: U_c = U[:, :k], V_c = V[:, :k]
        Delta_t' = Delta_t - U_c U_c^T Delta_t = U_t S_t V_t^T    task t outside the common subspace
        U_cat = [U_1[:, :s], ..., U_N[:, :s], U_c]      (same for V and the singular values S_cat)
        U_o = P_U Q_U^T  (U_cat = P_U S Q_U^T),  V_o likewise     (orthogonalisation)
        tau_m = mean(S_cat) U_o V_o^T                   (flat spectrum)

    Other tensors: the mean of the task vectors (as the paper's code). ``common_fraction=1``
    keeps the common subspace only (the full rank of the sum, as Iso-C).

    Example:
        >>> d = torch.stack([torch.diag(torch.tensor([4.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
        >>> iso_cts(d, common_fraction=0.5)
        tensor([[3., 0.],
                [0., 3.]])
    """
    check_deltas(deltas)
    if not _is_matrix(deltas):
        return mean_of_tasks(deltas)
    d = deltas.to(compute_dtype(deltas))
    n_tasks = d.shape[0]
    common, per_task = iso_cts_ranks(tuple(d.shape[1:]), n_tasks, common_fraction)
    u, s, vh = svd(d.sum(0))
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    if per_task > 0:
        for t in range(n_tasks):
            # task t's part outside the common subspace (projected out on the left, as the paper)
            residual = d[t] - u_c @ (u_c.T @ d[t])
            ut, st, vht = svd(residual)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    u_cat = torch.cat([*us, u_c], dim=1)
    s_cat = torch.cat([*ss, s_c])
    vh_cat = torch.cat([*vhs, vh_c], dim=0)
    return s_cat.mean() * (orthogonalize(u_cat) @ orthogonalize(vh_cat))


def tsv_rank(shape: tuple[int, ...] | torch.Size, n_tasks: int) -> int:
    """Singular triplets TSV-M keeps per task: ``min(m, n) // N``, at least 1.

    The paper keeps ``r / T``; where a matrix has fewer than T singular values (tiny matrices,
    many tasks) its code would keep none and drop the whole weight: we keep one per task.

    Example:
        >>> tsv_rank((768, 3072), n_tasks=8)
        96
    """
    return max(1, min(shape) // n_tasks)


def _tsv_factors(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """TSV-M's orthogonalised U [m, N k], kept singular values [N k] and orthogonalised V^T [N k, n]."""
    d = deltas.to(compute_dtype(deltas))
    n_tasks = d.shape[0]
    k = tsv_rank(tuple(d.shape[1:]), n_tasks)
    us, ss, vhs = [], [], []
    for t in range(n_tasks):
        ut, st, vht = svd(d[t])
        us.append(ut[:, :k])
        ss.append(st[:k])
        vhs.append(vht[:k])
    u_o = orthogonalize(torch.cat(us, dim=1))
    vh_o = orthogonalize(torch.cat(vhs, dim=0))
    return u_o, torch.cat(ss), vh_o, k


def tsv_m(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-M: each task's top singular triplets, decorrelated across tasks, recombined.

    For a 2-D weight (Gargiulo et al., CVPR 2025, Sec. 5, "TSV-Merge"), with
    ``k = min(m, n) // T`` (:func:`tsv_rank`)::

        Delta_t = U_t S_t V_t^T                          (thin SVD of each task matrix)
        U_cat = [U_1[:, :k], ..., U_T[:, :k]]            S_cat = diag(S_1[:k], ..., S_T[:k])
        V_cat = [V_1[:, :k], ..., V_T[:, :k]]
        U_o = P_U Q_U^T  where U_cat = P_U Sigma Q_U^T   (closest orthonormal matrix, Procrustes)
        V_o = P_V Q_V^T  where V_cat = P_V Sigma Q_V^T
        tau_m = U_o S_cat V_o^T

    Other tensors: the mean of the task vectors (as the paper's code). The paper applies
    ``theta = theta_0 + alpha * tau_m`` with alpha = 1.0 as its data-free default.

    Example:
        >>> d = torch.stack([torch.diag(torch.tensor([4.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
        >>> tsv_m(d)
        tensor([[4., 0.],
                [0., 2.]])
    """
    check_deltas(deltas)
    if not _is_matrix(deltas):
        return mean_of_tasks(deltas)
    u_o, s_cat, vh_o, _ = _tsv_factors(deltas)
    return (u_o * s_cat) @ vh_o


def tsv_m_components(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-M's per-task shares: ``[N, *shape]`` whose sum over tasks is :func:`tsv_m`.

    Task t's share is ``U_o[:, cols_t] S_t V_o[:, cols_t]^T`` (its own k columns of the
    orthogonalised factors); other tensors share the mean equally (``deltas[t] / N``).
    Learned merging coefficients and continual merging scale or replace each share.

    Example:
        >>> d = torch.stack([torch.diag(torch.tensor([4.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
        >>> tsv_m_components(d)[1]
        tensor([[0., 0.],
                [0., 2.]])
    """
    check_deltas(deltas)
    d = deltas.to(compute_dtype(deltas))
    if not _is_matrix(deltas):
        return d / d.shape[0]
    u_o, s_cat, vh_o, k = _tsv_factors(d)
    parts = [(u_o[:, t * k : (t + 1) * k] * s_cat[t * k : (t + 1) * k]) @ vh_o[t * k : (t + 1) * k] for t in range(d.shape[0])]
    return torch.stack(parts)
