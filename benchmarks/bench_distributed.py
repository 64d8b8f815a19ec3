"""Merging past one process, two cases side by side in one script.

``--case merge_to``: TIES (global trim, k=0.2) of N synthetic Llama-shaped checkpoints (base +
small noise, float32 safetensors folders, built as ``bench_files.py`` builds them: 4 x 168M by
default) into a folder, once by ``merge_to`` in one process and once under
``torchrun --nproc_per_node=W``, every process on one thread. Prints the time of the
``merge_to`` call (rank 0's, which returns once every rank is done and the output is
published), the wall time of the whole command (interpreter and launcher start included),
the CPU seconds of each rank's ``merge_to`` (all its threads: the inputs' sha256 runs beside
the merge; the kernel's share apart, with the minor page faults: fresh memory and page-cache
pages are costly on some VMs) and its peak RSS, the speed-ups, a CPU-bound estimate of the speed-up on idle
cores (the measured one depends on what else runs), and whether the two outputs are
identical file for file.

    python benchmarks/bench_distributed.py --case merge_to            # 4 x 168M, W=2
    python benchmarks/bench_distributed.py --case merge_to --small    # a quick check

Each run hashes its sources (``LIGHTNING_TIES_DIGEST_CACHE=off``); ``--warm-digests`` measures a
repeated merge instead (the digests in a cache warmed first), ``--no-hash`` one without digests.

The inputs are built in a temporary folder and deleted afterwards (``--workdir`` keeps them).

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

``--case module``: ``MultiTaskMergeModule`` over the same MLP (its layers in an ``nn.ModuleList``), the base
and two task checkpoints as safetensors files, ``evaluate`` at k=0.2, lam=1.0 on a few batches per task: in one
process, then under ``ModelParallelStrategy`` on W processes (the module shards its model block by block in
``configure_model`` and merges on each rank's rows). Printed per rank as for the callback: peak RSS, RSS when
the evaluation starts (the model built whole, then sharded), and the evaluation's peak, increase and seconds;
then the same W ranks given ``model=`` as a factory (built on the meta device; each rank fills its own rows from
the base in ``configure_model``, so no rank builds it whole).

    python benchmarks/bench_distributed.py --case module              # 16 x 2048, W=2
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from bench_files import FULL, SMALL, build_checkpoints

DENSITY = 0.2


# ---- --case merge_to ------------------------------------------------------------------------------
def run_merge_to(out: str, inputs: list[str], record: str, hash_sources: bool) -> None:
    """One process's part (every rank runs this): merge, then record its time, CPU and peak RSS."""
    from lightning_ties import merge_to

    start, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    before = resource.getrusage(resource.RUSAGE_SELF)
    merge_to(out, inputs[0], inputs[1:], "ties", k=DENSITY, progress=False, hash_sources=hash_sources)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    rank = int(os.environ.get("RANK", 0))
    record_row = {
        "rank": rank, "merge_s": seconds,
        "cpu_s": time.process_time() - cpu,  # merge_to's CPU, all threads (the sha256 thread too)
        "main_thread_cpu_s": time.thread_time() - thread,
        # the kernel's share: copies from and into the page cache, and the faults of fresh memory
        "system_cpu_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(f"{record}.rank{rank}.json").write_text(json.dumps(record_row))


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``, MB). Not ``getrusage``'s ``ru_maxrss``: Linux carries that
    over ``execve`` from the process that forked this one, so a rank started by the benchmark (which built the
    checkpoints) would report the benchmark's own peak when its own is lower."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_merge_to(name: str, world: int, out: Path, inputs: list[str], root: Path, hash_sources: bool) -> dict:
    """Run the merge on ``world`` processes (one thread each); its times and each rank's peak RSS."""
    shutil.rmtree(out, ignore_errors=True)  # a kept --workdir's earlier run
    me = [os.path.abspath(__file__), "--run-merge-to", str(out), "--record", str(root / name), "--inputs", *inputs]
    me += [] if hash_sources else ["--no-hash"]
    if world == 1:
        cmd = [sys.executable, *me]
    else:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_free_port()}"]
        cmd = [sys.executable, *launcher, *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((root / f"{name}.rank{r}.json").read_text()) for r in range(world)]
    row = {
        "name": name, "world": world, "merge_s": ranks[0]["merge_s"], "wall_s": wall,
        "cpu_s": [r["cpu_s"] for r in ranks], "main_thread_cpu_s": [r["main_thread_cpu_s"] for r in ranks],
        "system_cpu_s": [r["system_cpu_s"] for r in ranks], "minor_faults": [r["minor_faults"] for r in ranks],
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
    }
    rss = " / ".join(f"{mb:.0f}" for mb in row["peak_rss_mb"])
    cpu = " / ".join(f"{s:.1f}" for s in row["cpu_s"])
    print(
        f"  {name:<14} merge_to {row['merge_s']:7.2f} s   wall {wall:7.2f} s   CPU per rank {cpu} s   "
        f"peak RSS per rank {rss} MB",
        flush=True,
    )
    return row


def warm_digest_cache(files: list[Path]) -> None:
    """Hash the inputs into the digest cache ($LIGHTNING_TIES_DIGEST_CACHE), once they count as settled."""
    from lightning_ties.io import digests

    newest = max(max(f.stat().st_mtime, f.stat().st_ctime) for f in files)
    time.sleep(max(0.0, newest + digests.SETTLED_S + 0.1 - time.time()))
    for f in files:
        digests.sha256_file(f)


def same_folders(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def case_merge_to(args: argparse.Namespace) -> None:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        base, models = build_checkpoints(root / "inputs", SMALL if args.small else FULL, args.n_models)
        inputs = [str(base), *map(str, models)]
        load = os.getloadavg()
        print(
            f"merge_to, TIES k={DENSITY} (global trim), {args.n_models} models, folder output "
            f"({'without' if args.no_hash else 'with'} the sources' sha256{', from the digest cache' if args.warm_digests else ''}), "
            "1 thread per process; "
            f"{os.cpu_count()} CPUs, load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        hashing = not args.no_hash
        # Cold by default: every merge hashes its sources. --warm-digests: both runs find them in a
        # digest cache warmed here (a repeated merge of the same sources).
        os.environ["LIGHTNING_TIES_DIGEST_CACHE"] = str(root / "sha256") if args.warm_digests else "off"
        if args.warm_digests:
            warm_digest_cache([Path(f) for folder in inputs for f in Path(folder).iterdir()])
        rows = [measure_merge_to("1 process", 1, root / "out-1", inputs, root, hashing)]
        rows.append(measure_merge_to(f"{args.world} processes", args.world, root / f"out-{args.world}", inputs, root, hashing))
        identical = same_folders(root / "out-1", root / f"out-{args.world}")
        for out in (root / "out-1", root / f"out-{args.world}"):
            shutil.rmtree(out)
        one, many = rows
        print(
            "\n| processes | merge_to (s) | wall (s) | CPU per rank (s) | main-thread CPU per rank (s) "
            "| system CPU per rank (s) | minor faults per rank (K) | peak RSS per rank (MB) | merge_to speed-up | wall speed-up |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            def per_rank(field: str, fmt: str, scale: float = 1.0) -> str:
                return " / ".join(format(v / scale, fmt) for v in r[field])

            print(
                f"| {r['world']} | {r['merge_s']:.2f} | {r['wall_s']:.2f} | {per_rank('cpu_s', '.1f')} | "
                f"{per_rank('main_thread_cpu_s', '.1f')} | {per_rank('system_cpu_s', '.1f')} | "
                f"{per_rank('minor_faults', '.0f', 1000)} | {per_rank('peak_rss_mb', '.0f')} | "
                f"{one['merge_s'] / r['merge_s']:.2f}x | {one['wall_s'] / r['wall_s']:.2f}x |"
            )
        # On W idle cores one process runs its main thread on one and hashes on another, while
        # W ranks fill every core with all their threads: the wall-time speed-up the CPU allows.
        bound = one["main_thread_cpu_s"][0] / max(many["cpu_s"])
        print(
            f"\nCPU-bound estimate on {args.world} idle cores: one process's main-thread CPU "
            f"{one['main_thread_cpu_s'][0]:.1f} s / the busiest rank's CPU {max(many['cpu_s']):.1f} s = {bound:.2f}x"
        )
        print(f"outputs identical file for file: {'yes' if identical else 'NO'}")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.json:
            Path(args.json).write_text(json.dumps({"case": "merge_to", "rows": rows, "identical": identical}, indent=2))
        if not identical:
            raise SystemExit("the W-process output differs from the one-process output")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


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
                         callbacks=[MergeStart(), merging, MergeEnd()],
                         default_root_dir=Path(record).parent)  # the callback's outputs go to the workdir, not here
    trainer.fit(Net(), data)
    sampler.stop()
    rank = trainer.global_rank
    row = {"rank": rank, "peak_rss_mb": peak_rss_mb(), **marks}
    Path(f"{record}.rank{rank}.json").write_text(json.dumps(row))


def measure_callback(world: int, layers: int, width: int, tasks: list[str], root: Path, case: str = "callback",
                     factory: bool = False) -> dict:
    name = f"{case}_w{world}{'_factory' if factory else ''}"
    cmd = [sys.executable, os.path.abspath(__file__), f"--run-{case}", str(world), "--layers", str(layers),
           "--width", str(width), "--record", str(root / name), "--inputs", *tasks, *(["--factory"] if factory else [])]
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
        print(f"  W={world}{' (model= a factory)' if factory else ''} rank {r['rank']}: peak RSS {r['peak_rss_mb']:.0f} MB; {'merge' if case == 'callback' else 'evaluate'}: starts at "
              f"{r['before_merge_mb']:.0f} MB, peaks at {r['merge_peak_mb']:.0f} MB (+{r['merge_increase_mb']:.0f} MB), "
              f"{r['merge_s']:.2f} s")
    return {"world": world, "ranks": ranks}


class _Blocks:
    """The benchmark's MLP as a module whose layers sit in an ``nn.ModuleList`` (the blocks ``shard_blocks`` shards)."""

    @staticmethod
    def build(layers: int, width: int):
        from torch import nn

        class Blocks(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.ModuleList(callback_net(layers, width))

            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return x

        return Blocks()


def build_module_inputs(root: Path, layers: int, width: int) -> list[str]:
    """The base and two task checkpoints (base + noise) with the module's keys; returns their paths, base first."""
    import torch

    from lightning_ties.io import save_safetensors

    base = _Blocks.build(layers, width).state_dict()
    save_safetensors(base, root / "base.safetensors")
    paths = [str(root / "base.safetensors")]
    for t in range(2):
        g = torch.Generator().manual_seed(100 + t)
        save_safetensors({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                         root / f"task{t}.safetensors")
        paths.append(str(root / f"task{t}.safetensors"))
    return paths


def run_module(world: int, layers: int, width: int, inputs: list[str], record: str, factory: bool = False) -> None:
    """One process's part of ``--case module`` (Lightning launches the other ranks by running this script again);
    ``factory``: ``model=`` a function that builds the model (built on the meta device, each rank fills its rows)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import ModelParallelStrategy

    from lightning_ties import MultiTaskMergeModule

    torch.set_num_threads(1)
    sampler = RssSampler().start()
    x = torch.randn(16, width)
    loaders = {f"t{i}": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, i] > 0).long()), batch_size=8)
               for i in range(2)}
    module = MultiTaskMergeModule(inputs[0], {f"t{i}": p for i, p in enumerate(inputs[1:])},
                                  model=partial(_Blocks.build, layers, width) if factory else _Blocks.build(layers, width))
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=Path(record).parent)
    marks = {"before_merge_mb": sampler.now()}
    sampler.reset()
    start = time.perf_counter()
    module.evaluate(trainer, loaders, k=CALLBACK_K, lam=CALLBACK_LAM)
    marks.update(merge_s=time.perf_counter() - start, merge_peak_mb=sampler.peak)
    sampler.stop()
    row = {"rank": trainer.global_rank, "peak_rss_mb": peak_rss_mb(), **marks}
    Path(f"{record}.rank{trainer.global_rank}.json").write_text(json.dumps(row))


def main_callback(args: argparse.Namespace) -> None:
    import torch

    layers, width = (4, 512) if args.small else (args.layers, args.width)
    params = layers * (width * width + width)
    what = "callback merge" if args.case == "callback" else "MultiTaskMergeModule.evaluate"
    tasks_of = "2 tasks + this run" if args.case == "callback" else "base + 2 tasks (files)"
    print(f"{what}: {layers} x {width} MLP ({params / 1e6:.1f}M float32 parameters, "
          f"{params * 4 / 2**20:.0f} MB), {tasks_of}, k={CALLBACK_K}, lam={CALLBACK_LAM}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per process")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        build = build_callback_inputs if args.case == "callback" else build_module_inputs
        tasks = build(root, layers, width)
        one = measure_callback(1, layers, width, tasks, root, args.case)
        runs = {"": measure_callback(args.world, layers, width, tasks, root, args.case)}
        if args.case == "module":  # the model built whole on every rank, then the same given as a factory
            runs[", model= a factory"] = measure_callback(args.world, layers, width, tasks, root, args.case, factory=True)
    single = one["ranks"][0]
    label = "merge's" if args.case == "callback" else "evaluation's"
    for variant, many in runs.items():
        worst_peak = max(r["peak_rss_mb"] for r in many["ranks"])
        worst_increase = max(r["merge_increase_mb"] for r in many["ranks"])
        print(f"peak RSS per rank, W={args.world}{variant} / one process: {worst_peak / single['peak_rss_mb']:.2f}x "
              f"(worst rank {worst_peak:.0f} MB vs {single['peak_rss_mb']:.0f} MB)")
        print(f"{label} memory increase per rank, W={args.world}{variant} / one process: "
              f"{worst_increase / max(single['merge_increase_mb'], 1e-9):.2f}x "
              f"({worst_increase:.0f} MB vs {single['merge_increase_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["merge_to", "callback", "module"], default="merge_to", help="what to measure")
    parser.add_argument("--small", action="store_true", help="a tiny model, for a quick check")
    parser.add_argument("--n-models", type=int, default=4)
    parser.add_argument("--world", type=int, default=2, help="processes of the multi-process run")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-hash", action="store_true", help="merge_to(hash_sources=False): no sha256 of the inputs in the card")
    parser.add_argument("--warm-digests", action="store_true",
                        help="--case merge_to: the sources' digests already cached (a repeated merge); default: hashed by each run")
    parser.add_argument("--run-merge-to", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=16, help="--case callback/module: MLP depth")
    parser.add_argument("--width", type=int, default=2048, help="--case callback/module: MLP width")
    parser.add_argument("--run-callback", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-module", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--factory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_callback is not None:
        run_callback(args.run_callback, args.layers, args.width, args.inputs, args.record)
        return
    if args.run_module is not None:
        run_module(args.run_module, args.layers, args.width, args.inputs, args.record, args.factory)
        return
    if args.run_merge_to:
        run_merge_to(args.run_merge_to, args.inputs, args.record, not args.no_hash)
        return
    if args.case == "merge_to":
        case_merge_to(args)
    else:
        main_callback(args)


if __name__ == "__main__":
    main()
