"""RegMean: closed-form merging of linear layers from their input Gram matrices.

Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models".
For a linear layer ``y = W x`` (torch's ``W``: ``[out, in]``) fine-tuned into W_1..W_N, with
each task's inputs ``X_t`` (``[n_t, in]``) and Gram matrix ``G_t = X_t^T X_t``, the merged
weight minimising ``sum_t ||X_t W^T - X_t W_t^T||^2`` is::

    W = (sum_t W_t G_t) (sum_t G_t)^{-1}

The paper regularises it by shrinking the off-diagonal entries of every Gram matrix,
``G~_t = alpha G_t + (1 - alpha) diag(G_t)`` (alpha = 0.9 by default; alpha = 1 is the
unregularised solution; alpha = 0 weights each input column by its variance alone). Every
other parameter (biases, norms, embeddings) is averaged.

It needs data: the Gram matrices come from running each fine-tuned model over a few hundred
examples of its own task, which :class:`GramCollector` / :func:`collect_grams` do with forward
hooks. Nothing here reads files or imports Lightning; the Lightning layer drives the collector
with a task's dataloader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["GramCollector", "collect_grams", "regmean", "regmean_state_dict", "shrink_off_diagonal"]


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: RegMean's regularised Gram matrix.

    Example:
        >>> shrink_off_diagonal(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), 0.5)
        tensor([[2.0000, 0.5000],
                [0.5000, 4.0000]])
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (RegMean's off-diagonal scale) must be in [0, 1], got {alpha!r}")
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def regmean(weights: torch.Tensor, grams: torch.Tensor, alpha: float = 0.9) -> torch.Tensor:
    """Merge one linear layer: ``W = (sum_t W_t G~_t) (sum_t G~_t)^{-1}`` (Jin et al., 2023, Eq. 2).

    Solved in float64 as the linear system ``(sum_t G~_t) W^T = (sum_t W_t G~_t)^T`` (no
    explicit inverse). Where ``sum_t G~_t`` is singular (an input feature no task ever used),
    the pseudo-inverse gives the least-norm solution.

    The formula is linear in the weights, so task vectors work as well: passing
    ``deltas[t] = W_t - W_0`` returns the merged task vector (``W - W_0``).

    Args:
        weights: ``[N, out, in]``, the N tasks' weights (or task vectors) of one ``nn.Linear``.
        grams: ``[N, in, in]``, each task's input Gram matrix ``X_t^T X_t`` (any positive
            scaling per task, e.g. divided by its example count, as the paper's code).
        alpha: off-diagonal scale in [0, 1] (paper: 0.9).

    Returns:
        ``[out, in]`` in the weights' dtype (float32 for lower precisions), on their device.

    Example:
        >>> w = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])        # two tasks, out=1, in=2
        >>> g = torch.stack([torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))])
        >>> regmean(w, g)                                          # each task owns its input
        tensor([[1., 1.]])
    """
    if weights.dim() != 3 or grams.dim() != 3:
        raise ValueError(
            f"regmean needs weights [N, out, in] and grams [N, in, in]; got {tuple(weights.shape)} and {tuple(grams.shape)}"
        )
    n, _, d_in = weights.shape
    if grams.shape != (n, d_in, d_in):
        raise ValueError(
            f"grams must be [N={n}, in={d_in}, in={d_in}] to match weights {tuple(weights.shape)}, "
            f"got {tuple(grams.shape)}; collect them on the inputs of the same nn.Linear"
        )
    out_dtype = torch.float64 if weights.dtype == torch.float64 else torch.float32
    g = shrink_off_diagonal(grams.to(weights.device, torch.float64), alpha)
    w = weights.to(torch.float64)
    lhs = g.sum(0)  # sum_t G~_t, symmetric
    rhs = torch.einsum("toi,tij->oj", w, g)  # sum_t W_t G~_t, [out, in]
    try:
        merged_t = torch.linalg.solve(lhs, rhs.T)
    except torch.linalg.LinAlgError:  # singular: some input feature is zero for every task
        merged_t = torch.linalg.pinv(lhs, hermitian=True) @ rhs.T
    return merged_t.T.to(out_dtype)


def regmean_state_dict(
    state_dicts: list[Mapping[str, torch.Tensor]], grams: list[Mapping[str, torch.Tensor]], alpha: float = 0.9
) -> dict[str, torch.Tensor]:
    """RegMean over whole (small) state dicts: linear weights with a Gram matrix by
    :func:`regmean`, every other floating-point entry averaged, others from the first model.

    ``grams[t]`` maps a linear layer's weight key (``"encoder.fc.weight"``, as
    :meth:`GramCollector.grams` returns) to task t's Gram matrix. Holds every model in
    memory: for large models let the engine stream :func:`regmean` key by key.

    Example:
        >>> sds = [{"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[0.0, 1.0]])}]
        >>> gs = [{"w": torch.diag(torch.tensor([1.0, 0.0]))}, {"w": torch.diag(torch.tensor([0.0, 1.0]))}]
        >>> regmean_state_dict(sds, gs)["w"]
        tensor([[1., 1.]])
    """
    if not state_dicts or len(grams) != len(state_dicts):
        raise ValueError(
            f"regmean needs one Gram dict per model: got {len(state_dicts)} models and {len(grams)} Gram dicts; "
            "collect them with GramCollector on each fine-tuned model and its task's data"
        )
    merged: dict[str, torch.Tensor] = {}
    for key, first in state_dicts[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        stacked = torch.stack([sd[key] for sd in state_dicts])
        if all(key in g for g in grams):
            merged[key] = regmean(stacked, torch.stack([g[key] for g in grams]), alpha).to(first.dtype)
        else:
            merged[key] = stacked.to(torch.float32 if first.dtype != torch.float64 else first.dtype).mean(0).to(first.dtype)
    return merged


class GramCollector:
    """Accumulate ``X^T X`` of the inputs of every ``nn.Linear`` in a module, with forward hooks.

    Inputs of any leading shape (``[batch, in]``, ``[batch, seq, in]``) count each row as one
    input vector. Set :attr:`row_mask` (a boolean ``[batch, seq]`` tensor, e.g. a transformer's
    attention mask) before a forward pass to count only the rows it marks: padding positions
    are not data. Sums are kept in float64 on the layer's device; :meth:`grams` returns them
    divided by the number of rows seen (the paper's code averages the same way), keyed by the
    layer's weight key in ``module.state_dict()``.

    Example:
        >>> layer = nn.Sequential(nn.Linear(2, 1))
        >>> with GramCollector(layer) as gc:
        ...     _ = layer(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> gc.grams()["0.weight"]
        tensor([[5., 1.],
                [1., 2.]], dtype=torch.float64)
    """

    def __init__(self, module: nn.Module, include: Callable[[str, nn.Linear], bool] | None = None) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.row_mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear) and (include is None or include(name, sub)):
                key = f"{name}.weight" if name else "weight"
                self._handles.append(sub.register_forward_hook(self._hook(key)))
        if not self._handles:
            raise ValueError(f"{type(module).__name__} has no nn.Linear layer to collect Gram matrices for")

    def _hook(self, key: str) -> Callable[..., None]:
        def hook(layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0].detach()
            mask = self.row_mask
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                x = x[mask.to(device=x.device, dtype=torch.bool)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = x.T @ x
            if key in self.sums:
                self.sums[key] += gram
            else:
                self.sums[key] = gram
            self.rows[key] = self.rows.get(key, 0) + x.shape[0]

        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        """Mean Gram matrix per linear weight key (``sum X^T X / rows``), float64."""
        return {key: s / self.rows[key] for key, s in self.sums.items()}

    def remove(self) -> None:
        """Remove the hooks (the sums are kept)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> GramCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}; pass forward= to feed it")


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_examples: int | None = None,
    include: Callable[[str, nn.Linear], bool] | None = None,
    row_mask: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Run ``model`` (in eval mode, no grad) over ``batches`` and return its Gram matrices.

    Args:
        model: one fine-tuned model.
        batches: its own task's data (a dataloader), batches as ``forward`` expects them.
        forward: ``forward(model, batch)``; default: ``model(batch[0])`` for tuples/lists,
            ``model(**batch)`` for dicts, ``model(batch)`` for tensors.
        max_examples: stop once this many examples were seen (whole batches; the paper uses a few hundred to 1000).
        include: which linear layers to hook (``include(name, layer)``), default all.
        row_mask: ``row_mask(batch)`` -> boolean ``[batch, seq]`` of the positions that count
            (e.g. ``lambda b: b[0]["attention_mask"]``); layers whose inputs have another
            leading shape count every row.

    Returns:
        ``(grams, examples)``: mean Gram matrix per linear weight key, and the examples seen.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 1))
        >>> grams, n = collect_grams(net, [torch.ones(4, 2)])
        >>> n, grams["0.weight"].tolist()
        (4, [[1.0, 1.0], [1.0, 1.0]])
    """
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with GramCollector(model, include) as gc:
            for batch in batches:
                if max_examples is not None and seen >= max_examples:
                    break
                gc.row_mask = row_mask(batch) if row_mask is not None else None
                if forward is not None:
                    forward(model, batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (list, tuple)):
                    model(batch[0])
                else:
                    model(batch)
                seen += _batch_size(batch)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batches to collect Gram matrices from: pass the task's (validation) dataloader")
    return gc.grams(), seen
