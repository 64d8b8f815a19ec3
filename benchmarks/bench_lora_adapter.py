"""A merged LoRA adapter: how far the re-factored ``lam * tau_m`` is from the full merge, and the SVD's cost.

Part 1 builds a BERT from a config (``--hidden``, ``--layers``; random weights, no download),
saves ``--tasks`` PEFT LoRA adapters of rank ``--r`` on ``query`` and ``value`` with random A
and B (``init_lora_weights=False``), and runs :func:`lightning_ties.io.merge_lora_adapters` for
task arithmetic (stacked factors, exact) and TIES at several ranks, printing the overall and
worst relative error ``||lam*tau_m - B A||_F / ||lam*tau_m||_F`` and the wall time. Random
updates are a stand-in for trained ones: the figures say how much TIES' trim and sign election
raise the rank of a merge of low-rank updates, not how a trained model's accuracy moves.

Part 2 times the truncated SVD of one TIES-merged ``--svd-size`` square update (``--tasks``
rank-``--r`` updates, 20% of the entries kept) exactly (LAPACK) and by the randomized range
finder that ``factorization="svd"`` uses where the rank is small, with both errors.

Run (about two minutes on one core; ``--svd-size 1024`` for a quick look)::

    .venv/bin/python benchmarks/bench_lora_adapter.py --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from lightning_ties.io import merge_lora_adapters
from lightning_ties.io.lora_adapter import _truncated_svd


def bert(hidden: int, layers: int) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden, vocab_size=1000
    )
    return BertModel(config)


def error_vs_rank(args: argparse.Namespace, root: Path) -> None:
    base = {k: v.clone() for k, v in bert(args.hidden, args.layers).state_dict().items()}
    folders = []
    for seed in range(1, args.tasks + 1):
        model = bert(args.hidden, args.layers)
        torch.manual_seed(seed)  # after bert(), which seeds itself: each adapter gets its own factors
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["query", "value"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / f"task{seed}")
        folders.append(root / f"task{seed}")
    print(f"BERT hidden {args.hidden}, {args.layers} layers; {args.tasks} adapters of rank {args.r} on query, value")
    runs = [("task_arithmetic", {}, None)] + [("ties", {"k": 0.2}, r) for r in (args.r, None, 64, 128, args.hidden)]
    runs += [("ties", {"k": 1.0}, None), ("tsv", {}, None)]
    for i, (method, params, rank) in enumerate(runs):
        start = time.perf_counter()
        report = merge_lora_adapters(root / f"out{i}", base, folders, method, lam=1.0, rank=rank, progress=False, **params)
        seconds = time.perf_counter() - start
        asked = "default" if rank is None else str(rank)
        print(
            f"  {method:15s} {str(params):11s} rank={asked:7s} -> {report.factorization:9s} r={report.rank:4d} "
            f"error {report.error:.3g} (worst module {max(report.errors.values()):.3g})  {seconds:.2f} s"
        )


def svd_cost(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    n = args.svd_size
    update = sum(torch.randn(n, args.r) @ torch.randn(args.r, n) for _ in range(args.tasks))
    update = update * (update.abs() > update.abs().flatten().kthvalue(int(0.8 * n * n)).values)
    print(f"truncated SVD of a TIES-merged {n} x {n} update ({args.tasks} rank-{args.r} updates, 20% kept)")
    for r in (args.tasks * args.r, 64):
        for exact in (False, True):
            start = time.perf_counter()
            u, s, vh = _truncated_svd(update, r, exact)
            seconds = time.perf_counter() - start
            error = ((update - (u * s) @ vh).norm() / update.norm()).item()
            print(f"  r={r:3d} {'exact' if exact else 'randomized':10s} error {error:.4f}  {seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--svd-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        error_vs_rank(args, Path(root))
    svd_cost(args)


if __name__ == "__main__":
    main()
