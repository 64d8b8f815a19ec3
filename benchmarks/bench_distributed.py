"""Merging past one process: ``merge_to`` on 1 vs W processes (``--case merge_to``).

``--case merge_to``: TIES (global trim, k=0.2) of N synthetic Llama-shaped checkpoints (base +
small noise, float32 safetensors folders, built as ``bench_files.py`` builds them: 4 x 168M by
default) into a folder, once by ``merge_to`` in one process and once under
``torchrun --nproc_per_node=W``, every process on one thread. Prints the time of the
``merge_to`` call (rank 0's, which returns once every rank is done and the output is
published), the wall time of the whole command (interpreter and launcher start included),
the CPU seconds of each rank's ``merge_to`` (all its threads: the inputs' sha256 runs beside
the merge) and its peak RSS, the speed-ups, a CPU-bound estimate of the speed-up on idle
cores (the measured one depends on what else runs), and whether the two outputs are
identical file for file.

    python benchmarks/bench_distributed.py --case merge_to            # 4 x 168M, W=2
    python benchmarks/bench_distributed.py --case merge_to --small    # a quick check

The inputs are built in a temporary folder and deleted afterwards (``--workdir`` keeps them).
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
import time
from pathlib import Path

from bench_files import FULL, SMALL, build_checkpoints

DENSITY = 0.2


# ---- --case merge_to ------------------------------------------------------------------------------
def run_merge_to(out: str, inputs: list[str], record: str, hash_sources: bool) -> None:
    """One process's part (every rank runs this): merge, then record its time, CPU and peak RSS."""
    from lightning_ties import merge_to

    start, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    merge_to(out, inputs[0], inputs[1:], "ties", k=DENSITY, progress=False, hash_sources=hash_sources)
    seconds = time.perf_counter() - start
    rank = int(os.environ.get("RANK", 0))
    record_row = {
        "rank": rank, "merge_s": seconds,
        "cpu_s": time.process_time() - cpu,  # merge_to's CPU, all threads (the sha256 thread too)
        "main_thread_cpu_s": time.thread_time() - thread,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(f"{record}.rank{rank}.json").write_text(json.dumps(record_row))


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
            f"({'with' if not args.no_hash else 'without'} the sources' sha256), 1 thread per process; "
            f"{os.cpu_count()} CPUs, load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            flush=True,
        )
        hashing = not args.no_hash
        rows = [measure_merge_to("1 process", 1, root / "out-1", inputs, root, hashing)]
        rows.append(measure_merge_to(f"{args.world} processes", args.world, root / f"out-{args.world}", inputs, root, hashing))
        identical = same_folders(root / "out-1", root / f"out-{args.world}")
        for out in (root / "out-1", root / f"out-{args.world}"):
            shutil.rmtree(out)
        one, many = rows
        print("\n| processes | merge_to (s) | wall (s) | CPU per rank (s) | peak RSS per rank (MB) | merge_to speed-up | wall speed-up |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            rss = " / ".join(f"{mb:.0f}" for mb in r["peak_rss_mb"])
            cpu = " / ".join(f"{s:.1f}" for s in r["cpu_s"])
            print(
                f"| {r['world']} | {r['merge_s']:.2f} | {r['wall_s']:.2f} | {cpu} | {rss} | "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["merge_to"], default="merge_to", help="what to measure")
    parser.add_argument("--small", action="store_true", help="tiny Llama (quick check) instead of the 168M one")
    parser.add_argument("--n-models", type=int, default=4)
    parser.add_argument("--world", type=int, default=2, help="processes of the multi-process run")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-hash", action="store_true", help="merge_to(hash_sources=False): no sha256 of the inputs in the card")
    parser.add_argument("--run-merge-to", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_merge_to:
        run_merge_to(args.run_merge_to, args.inputs, args.record, not args.no_hash)
        return
    if args.case == "merge_to":
        case_merge_to(args)


if __name__ == "__main__":
    main()
