"""Merging past one process: the callback's fit-end merge under ModelParallelStrategy (``--case callback``).

(The ``--case merge_to`` part of this script, ``merge_to`` on 1 vs W processes, is written beside
this one; the two cases share nothing but the file.)

``--case callback``: a LightningModule holding an MLP of ``--layers`` square ``--width`` layers
(float32; 16 x 2048 = 67M parameters by default) fits one SGD step, then ``TiesMerging`` merges it
with two task checkpoints (safetensors, base + noise) at fit end, with a fixed k=0.2, lam=1.0:

- once in one process (``strategy="auto"``, the unsharded callback),
- once under ``ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1)`` with
  ``fully_shard`` in ``configure_model``, on W processes (each rank merges its own shards).

A thread samples each process's RSS every 5 ms (glibc's mmap threshold fixed at 1 MB in both runs, so
that RSS follows live memory rather than the heap's high-water mark). Printed per rank: peak RSS over the whole run,
RSS when the merge starts, peak RSS during the merge and its increase, and the merge's seconds;
then the ratios W-rank / one-process of the peak RSS and of the merge's increase (target <= 0.6 at W=2).
Every process runs on one thread.

    python benchmarks/bench_distributed.py --case callback            # 16 x 2048, W=2
    python benchmarks/bench_distributed.py --case callback --small    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# ---- --case callback ------------------------------------------------------------------------------
CALLBACK_K, CALLBACK_LAM = 0.2, 1.0


class RssSampler:
    """Peak resident memory of this process, sampled every ``interval`` seconds from /proc (MB)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0.0
        self._page = os.sysconf("SC_PAGE_SIZE") / 2**20
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def reset(self) -> None:
        self.peak = self.now()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def build_callback_inputs(root: Path, layers: int, width: int) -> list[str]:
    """Two task checkpoints (base + noise) with the LightningModule's keys; returns their paths."""
    import torch

    from lightning_ties.io import save_safetensors

    base = callback_net(layers, width).state_dict()
    paths = []
    for t in range(2):
        g = torch.Generator().manual_seed(100 + t)
        path = root / f"task{t}.safetensors"
        save_safetensors({f"model.{k}": v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, path)
        paths.append(str(path))
    return paths


def callback_net(layers: int, width: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def run_callback(world: int, layers: int, width: int, tasks: list[str], record: str) -> None:
    """One process's part (Lightning launches the other ranks by running this script again)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_ties import TiesMerging

    torch.set_num_threads(1)
    sampler = RssSampler().start()
    marks: dict[str, float] = {}

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = callback_net(layers, width)

        def configure_model(self) -> None:
            if isinstance(self.trainer.strategy, ModelParallelStrategy):
                from torch.distributed.fsdp import fully_shard

                for layer in self.model:
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
                fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class MergeStart(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            marks["before_merge_mb"] = sampler.now()
            marks["start"] = time.perf_counter()
            sampler.reset()

    class MergeEnd(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            marks["merge_s"] = time.perf_counter() - marks.pop("start")
            marks["merge_peak_mb"] = sampler.peak

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, width)), batch_size=4)
    merging = TiesMerging(tasks={f"t{i}": p for i, p in enumerate(tasks)}, task="mine", k=CALLBACK_K, lam=CALLBACK_LAM)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[MergeStart(), merging, MergeEnd()])
    trainer.fit(Net(), data)
    sampler.stop()
    rank = trainer.global_rank
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row = {"rank": rank, "peak_rss_mb": usage.ru_maxrss / 1024, **marks}
    Path(f"{record}.rank{rank}.json").write_text(json.dumps(row))


def measure_callback(world: int, layers: int, width: int, tasks: list[str], root: Path) -> dict:
    name = f"callback_w{world}"
    cmd = [sys.executable, os.path.abspath(__file__), "--run-callback", str(world), "--layers", str(layers),
           "--width", str(width), "--record", str(root / name), "--inputs", *tasks]
    # glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which freed
    # tensors stay in the heap and RSS stops following live memory; a fixed 1 MB threshold keeps the two
    # runs comparable (both get it).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((root / f"{name}.rank{r}.json").read_text()) for r in range(world)]
    for r in ranks:
        r["merge_increase_mb"] = r["merge_peak_mb"] - r["before_merge_mb"]
        print(f"  W={world} rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MB; merge: starts at "
              f"{r['before_merge_mb']:.0f} MB, peaks at {r['merge_peak_mb']:.0f} MB (+{r['merge_increase_mb']:.0f} MB), "
              f"{r['merge_s']:.2f} s")
    return {"world": world, "ranks": ranks}


def main_callback(args: argparse.Namespace) -> None:
    import torch

    layers, width = (4, 512) if args.small else (args.layers, args.width)
    params = layers * (width * width + width)
    print(f"callback merge: {layers} x {width} MLP ({params / 1e6:.1f}M float32 parameters, "
          f"{params * 4 / 2**20:.0f} MB), 2 tasks + this run, k={CALLBACK_K}, lam={CALLBACK_LAM}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per process")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        tasks = build_callback_inputs(root, layers, width)
        one = measure_callback(1, layers, width, tasks, root)
        many = measure_callback(args.world, layers, width, tasks, root)
    single = one["ranks"][0]
    worst_peak = max(r["peak_rss_mb"] for r in many["ranks"])
    worst_increase = max(r["merge_increase_mb"] for r in many["ranks"])
    print(f"peak RSS per rank, W={args.world} / one process: {worst_peak / single['peak_rss_mb']:.2f}x "
          f"(worst rank {worst_peak:.0f} MB vs {single['peak_rss_mb']:.0f} MB)")
    print(f"merge's memory increase per rank, W={args.world} / one process: "
          f"{worst_increase / max(single['merge_increase_mb'], 1e-9):.2f}x "
          f"({worst_increase:.0f} MB vs {single['merge_increase_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["callback"], default="callback")
    parser.add_argument("--small", action="store_true", help="a tiny model, for a quick check")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--workdir", default=None, help="where the temporary inputs go")
    parser.add_argument("--run-callback", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_callback is not None:
        run_callback(args.run_callback, args.layers, args.width, args.inputs, args.record)
        return
    main_callback(args)


if __name__ == "__main__":
    main()
