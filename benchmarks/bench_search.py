"""Cost of a lam/k search with MultiTaskMergeModule: where the time goes, and smart strategy vs full grid.

Setup: a 3-layer MLP (hidden 1024, ~1.1M parameters) fine-tuned (Adam, 60 steps) on 3 tasks whose
labels are the arg-max of a random linear teacher per task; validation data pre-batched (data
loading is not what is measured).
Both searches run in one process on the same Trainer, one after the other, with the same
tasks, k grid [0.1, 0.2, 0.3] and the paper's TIES lam grid (0.8..2.5).

Printed, side by side for the grid and coarse-to-fine searches:
- the share of search time outside the model's forward passes in validation (target < 5%),
  split into Lightning's validation-loop overhead (per batch and per ``trainer.validate``) and
  the search machinery itself (tau_m once per k, in-place lam application, bookkeeping);
- evaluations used, the chosen (k, lam) and the gap to the grid's best objective.

Run: ``python benchmarks/bench_search.py [--hidden 1024] [--batches 6] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_ties import MultiTaskMergeModule


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def teacher_batches(teacher: torch.Tensor, batches: int, batch_size: int, seed: int) -> list:
    """Inputs labelled by a task's random linear teacher (the arg-max of x @ teacher)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(batch_size, 64, generator=g)
        out.append((x, (x @ teacher).argmax(-1)))
    return out


def fine_tune(base: nn.Module, hidden: int, batches: list, steps: int) -> dict[str, torch.Tensor]:
    """A copy of base trained with Adam on the task's batches (plain torch: setup, not measured)."""
    model = mlp(hidden)
    model.load_state_dict(base.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Timer:
    """Accumulates the wall time of wrapped calls."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0

        return timed


def run(module: MultiTaskMergeModule, trainer: pl.Trainer, loaders: dict, strategy: str) -> dict:
    forward, validate, tau = Timer(), Timer(), Timer()
    model_forward = module.model.forward
    module.model.forward = forward.wrap(model_forward)
    module.validate = validate.wrap(module.validate)
    module.task_vector = tau.wrap(module.task_vector)
    module.search_result, module._tau = None, None  # a fresh search, tau_m recomputed
    t0 = time.perf_counter()
    result = module.search(trainer, loaders, k=[0.1, 0.2, 0.3], lam="paper", strategy=strategy, normalize=False)
    total = time.perf_counter() - t0
    module.model.forward = model_forward
    del module.validate, module.task_vector  # back to the class methods
    return {"result": result, "total": total, "forward": forward.total, "validate": validate.total, "tau": tau.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=6, help="validation batches per task")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task (setup)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = mlp(args.hidden)
    teachers = {f"t{i}": torch.randn(64, 10, generator=torch.Generator().manual_seed(100 + i)) for i in range(3)}
    train = {t: teacher_batches(w, 8, 256, seed=i) for i, (t, w) in enumerate(teachers.items())}
    tasks = {t: fine_tune(base, args.hidden, train[t], args.steps) for t in teachers}
    loaders = {t: DataLoader(teacher_batches(w, args.batches, args.batch_size, seed=50 + i), batch_size=None)
               for i, (t, w) in enumerate(teachers.items())}
    module = MultiTaskMergeModule(base, tasks)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    params = sum(p.numel() for p in base.parameters())
    print(f"MLP hidden={args.hidden} ({params / 1e6:.2f}M params), 3 tasks x {args.batches} batches x "
          f"{args.batch_size}, threads={args.threads}, k=[0.1, 0.2, 0.3], lam=paper grid (18 values)\n")
    runs = {s: run(module, trainer, loaders, s) for s in ("grid", "coarse_to_fine")}
    grid_best = runs["grid"]["result"].best
    header = f"{'':<44}{'grid':>14}{'coarse_to_fine':>16}{'ratio':>8}"
    print(header)
    print("-" * len(header))

    def row(label, values, fmt="{:.3f}", ratio=True):
        g, c = values
        r = f"{c / g:8.2f}" if ratio and g else ""
        print(f"{label:<44}{fmt.format(g):>14}{fmt.format(c):>16}{r}")

    def both(fn):
        return [fn(runs[s]) for s in ("grid", "coarse_to_fine")]

    row("evaluations (validation passes)", both(lambda r: len(r["result"].candidates)), "{:d}")
    row("search wall time (s)", both(lambda r: r["total"]))
    row("  model forward in validation (s)", both(lambda r: r["forward"]))
    row("  Lightning loop outside forward (s)", both(lambda r: r["validate"] - r["forward"]))
    row("  search machinery: tau_m, apply, rest (s)", both(lambda r: r["total"] - r["validate"]))
    row("    of which tau_m, once per k (s)", both(lambda r: r["tau"]))
    row("share outside forward passes", both(lambda r: 1 - r["forward"] / r["total"]), "{:.1%}", ratio=False)
    row("share in search machinery", both(lambda r: (r["total"] - r["validate"]) / r["total"]), "{:.1%}", ratio=False)
    row("chosen k", both(lambda r: r["result"].k), "{}", ratio=False)
    row("chosen lam", both(lambda r: r["result"].lam), "{}", ratio=False)
    row("best objective (mean accuracy)", both(lambda r: r["result"].best.objective), "{:.4f}", ratio=False)
    row("gap to the grid's best", both(lambda r: grid_best.objective - r["result"].best.objective), "{:.4f}",
        ratio=False)


if __name__ == "__main__":
    main()
