"""RegMean (Jin et al., ICLR 2023) against its definition, and the Gram collector against X^T X.

The reference solves RegMean's defining problem directly: the W minimising
sum_t ||X_t W^T - X_t W_t^T||^2 is the least-squares solution over all tasks' inputs stacked,
which never forms a Gram matrix, so it checks the closed form and its orientation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ties.merging.regmean import (
    GramCollector,
    collect_grams,
    regmean,
    regmean_state_dict,
    shrink_off_diagonal,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _task(n_rows: int, d_in: int, d_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return x, w


def test_by_hand_each_task_owns_one_input():
    # task 1 only ever sees input 0, task 2 only input 1: each keeps its own column
    w = torch.tensor([[[1.0, 9.0]], [[7.0, 3.0]]])
    g = torch.stack([torch.diag(torch.tensor([2.0, 0.0])), torch.diag(torch.tensor([0.0, 5.0]))])
    assert torch.allclose(regmean(w, g, alpha=0.9), torch.tensor([[1.0, 3.0]]))


def test_alpha_one_solves_the_stacked_least_squares_problem():
    tasks = [_task(40, 6, 3, seed) for seed in range(3)]
    xs = [x for x, _ in tasks]
    ws = torch.stack([w for _, w in tasks])
    grams = torch.stack([x.T @ x for x in xs])
    # reference: argmin_W sum_t ||X_t W^T - X_t W_t^T||^2 by least squares on the stacked inputs
    a = torch.cat(xs).numpy()
    b = torch.cat([x @ w.T for x, (_, w) in zip(xs, tasks)]).numpy()
    ref = np.linalg.lstsq(a, b, rcond=None)[0].T
    assert np.allclose(regmean(ws, grams, alpha=1.0).numpy(), ref, atol=1e-10)


def test_alpha_shrinks_off_diagonals_as_the_paper():
    tasks = [_task(30, 5, 4, seed) for seed in range(2)]
    ws = torch.stack([w for _, w in tasks])
    grams = torch.stack([x.T @ x for x, _ in tasks])
    alpha = 0.9
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    ref = sum(w @ g for w, g in zip(ws, shrunk)) @ torch.linalg.inv(sum(shrunk))
    assert torch.allclose(regmean(ws, grams, alpha), ref, atol=1e-10)
    # and the regularisation changes the answer (alpha is not ignored)
    assert not torch.allclose(regmean(ws, grams, 1.0), ref, atol=1e-6)


def test_equal_grams_reduce_to_averaging():
    tasks = [_task(30, 5, 4, seed) for seed in range(3)]
    ws = torch.stack([w for _, w in tasks])
    g = tasks[0][0].T @ tasks[0][0]
    assert torch.allclose(regmean(ws, torch.stack([g] * 3)), ws.mean(0), atol=1e-10)


def test_one_task_returns_that_task():
    x, w = _task(20, 5, 3, seed=4)
    assert torch.allclose(regmean(w[None], (x.T @ x)[None]), w, atol=1e-10)


def test_deltas_give_the_merged_delta():
    tasks = [_task(30, 5, 4, seed) for seed in range(3)]
    ws = torch.stack([w for _, w in tasks])
    grams = torch.stack([x.T @ x for x, _ in tasks])
    w0 = torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(regmean(ws - w0, grams) + w0, regmean(ws, grams), atol=1e-10)


def test_float32_weights_are_solved_in_float64_and_returned_in_float32(monkeypatch):
    tasks = [_task(30, 5, 4, seed) for seed in range(2)]
    ws = torch.stack([w for _, w in tasks])
    grams = torch.stack([x.T @ x for x, _ in tasks])
    real_solve = torch.linalg.solve
    solved: list[torch.dtype] = []

    def spy(a, b):
        solved.append(a.dtype)
        return real_solve(a, b)

    monkeypatch.setattr(torch.linalg, "solve", spy)
    out = regmean(ws.float(), grams.float())
    assert solved == [torch.float64]
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), regmean(ws, grams), atol=1e-5)
    assert regmean(ws.bfloat16(), grams.float()).dtype == torch.float32


def test_singular_gram_falls_back_to_the_pseudo_inverse():
    # input 2 is never active for any task
    w = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 2.0, 5.0]]])
    g = torch.diag(torch.tensor([1.0, 1.0, 0.0])).expand(2, 3, 3)
    out = regmean(w, g)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, :2], torch.tensor([[2.0, 2.0]]))


def test_shapes_and_alpha_are_checked():
    with pytest.raises(ValueError, match=r"grams must be \[N=2, in=3, in=3\]"):
        regmean(torch.ones(2, 4, 3), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="weights \\[N, out, in\\]"):
        regmean(torch.ones(4, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="alpha"):
        shrink_off_diagonal(torch.eye(2), 1.5)


def test_state_dict_merges_linear_weights_and_averages_the_rest():
    sds = [
        {"fc.weight": torch.tensor([[1.0, 9.0]]), "fc.bias": torch.tensor([1.0]), "steps": torch.tensor(3)},
        {"fc.weight": torch.tensor([[7.0, 3.0]]), "fc.bias": torch.tensor([3.0]), "steps": torch.tensor(5)},
    ]
    grams = [{"fc.weight": torch.diag(torch.tensor([1.0, 0.0]))}, {"fc.weight": torch.diag(torch.tensor([0.0, 1.0]))}]
    out = regmean_state_dict(sds, grams)
    assert torch.allclose(out["fc.weight"], torch.tensor([[1.0, 3.0]]))
    assert torch.equal(out["fc.bias"], torch.tensor([2.0]))
    assert torch.equal(out["steps"], torch.tensor(3))  # integers: the first model's
    with pytest.raises(ValueError, match="one Gram dict per model"):
        regmean_state_dict(sds, grams[:1])


# ---- the Gram collector --------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_collector_accumulates_x_transpose_x_over_batches_and_sequence_positions():
    torch.manual_seed(0)
    net = _Net()
    b1, b2 = torch.randn(5, 3), torch.randn(2, 7, 3)  # a plain batch, then a [batch, seq, in] one
    with GramCollector(net) as gc:
        net(b1)
        net(b2)
    x = torch.cat([b1, b2.reshape(-1, 3)]).double()
    grams = gc.grams()
    assert set(grams) == {"encoder.0.weight", "head.weight"}  # the state-dict keys of the weights
    assert torch.allclose(grams["encoder.0.weight"], x.T @ x / 19)
    hidden = net.encoder(torch.cat([b1, b2.reshape(-1, 3)])).double()
    assert torch.allclose(grams["head.weight"], hidden.T @ hidden / 19, atol=1e-6)
    # hooks are gone after the with block
    net(b1)
    assert gc.rows["head.weight"] == 19


def test_collect_grams_runs_eval_no_grad_and_stops_at_max_examples():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.9))
    net.train()
    batches = [(torch.randn(4, 3), torch.zeros(4)) for _ in range(5)]
    grams, seen = collect_grams(net, batches, max_examples=8)
    assert seen == 8 and net.training  # two whole batches, training mode restored
    x = torch.cat([b[0] for b in batches[:2]]).double()
    assert torch.allclose(grams["0.weight"], x.T @ x / 8)
    dict_grams, _ = collect_grams(net, [{"input": torch.ones(2, 3)}], forward=lambda m, b: m(b["input"]))
    assert torch.allclose(dict_grams["0.weight"], torch.ones(3, 3, dtype=torch.float64))


def test_row_mask_leaves_padding_positions_out():
    layer = nn.Linear(2, 1)
    x = torch.tensor([[[1.0, 2.0], [9.0, 9.0]], [[3.0, 0.0], [0.0, 1.0]]])  # [batch 2, seq 2, in 2]
    mask = torch.tensor([[1, 0], [1, 1]])  # position (0, 1) is padding
    grams, seen = collect_grams(layer, [(x, mask)], forward=lambda m, b: m(b[0]), row_mask=lambda b: b[1])
    kept = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert seen == 2
    assert torch.allclose(grams["weight"], kept.T @ kept / 3)


def test_collector_errors_name_the_problem():
    with pytest.raises(ValueError, match="no nn.Linear"):
        GramCollector(nn.ReLU())
    with pytest.raises(ValueError, match="no batches"):
        collect_grams(nn.Linear(2, 2), [])


def test_regmean_of_collected_grams_recovers_each_tasks_function_on_disjoint_inputs():
    # two "tasks" whose data live on disjoint inputs: the merged layer computes both functions
    torch.manual_seed(1)
    a, b = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
    xa = torch.cat([torch.randn(16, 2), torch.zeros(16, 2)], 1)
    xb = torch.cat([torch.zeros(16, 2), torch.randn(16, 2)], 1)
    ga, _ = collect_grams(a, [xa])
    gb, _ = collect_grams(b, [xb])
    merged = regmean(torch.stack([a.weight, b.weight]).detach(), torch.stack([ga["weight"], gb["weight"]]), alpha=1.0)
    assert torch.allclose(xa @ merged.T, a(xa), atol=1e-5)
    assert torch.allclose(xb @ merged.T, b(xb), atol=1e-5)


@pytest.mark.cuda
@cuda
def test_cuda_matches_cpu():
    tasks = [_task(30, 5, 4, seed) for seed in range(3)]
    ws = torch.stack([w for _, w in tasks]).float()
    grams = torch.stack([x.T @ x for x, _ in tasks]).float()
    out = regmean(ws.cuda(), grams.cuda())
    assert out.is_cuda and out.dtype == torch.float32
    assert torch.allclose(out.cpu(), regmean(ws, grams), atol=1e-4)
    net = nn.Linear(5, 2).cuda()
    g, _ = collect_grams(net, [tasks[0][0].float().cuda()])
    assert g["weight"].is_cuda
    assert torch.allclose(g["weight"].cpu(), (tasks[0][0].T @ tasks[0][0]) / 30, atol=1e-3)
