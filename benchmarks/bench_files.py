"""TIES-merge checkpoints from disk: lightning-ties (per-tensor and global trim) vs mergekit-yaml.

Builds N synthetic "fine-tuned" Llama-shaped checkpoints (base + small noise) as Hugging Face
folders, then runs each competitor as its own subprocess on the same files and reports wall
time and peak RSS (``os.wait4``'s ``ru_maxrss`` of that subprocess), their ratios to
mergekit, and how many entries of our per-tensor output differ from mergekit's.

    python benchmarks/bench_files.py --mergekit .venv-mergekit/bin/mergekit-yaml
    python benchmarks/bench_files.py --small          # a quick run on a tiny model

mergekit lives in its own venv so that it cannot change ours:
``python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install -c constraints.txt torch==2.13.0 mergekit``.
The executable comes from ``--mergekit`` or ``$MERGEKIT_YAML``; without one, mergekit is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000)
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, vocab_size=4000)
DENSITY, LAM = 0.2, 1.0


def build_checkpoints(root: Path, shape: dict, n_models: int) -> tuple[Path, list[Path]]:
    """Base (N(0, 0.02)) and N fine-tuned folders (base + N(0, 0.002) noise), fp32 safetensors.

    A ``--workdir`` that already holds the same build (``built.json``) is reused.
    """
    folders = [root / "base", *(root / f"ft{i}" for i in range(1, n_models + 1))]
    stamp = json.dumps({"shape": shape, "n_models": n_models})
    if (root / "built.json").is_file() and (root / "built.json").read_text() == stamp:
        print(f"reusing the checkpoints in {root}", flush=True)
        return folders[0], folders[1:]
    # Built in a subprocess: Linux carries a process's peak RSS across fork+exec, so a parent
    # that held the checkpoints would inflate every competitor's measured peak.
    subprocess.run([sys.executable, os.path.abspath(__file__), "--build", str(root), stamp], check=True)
    (root / "built.json").write_text(stamp)
    return folders[0], folders[1:]


def _write_checkpoints(folders: list[Path], shape: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        weights = base if i == 0 else {k: v + torch.randn(v.shape, generator=g) * 0.002 for k, v in base.items()}
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(v.numel() for v in base.values())
    print(f"built base + {len(folders) - 1} models of {n_params / 1e6:.1f}M fp32 parameters", flush=True)


def run_ours(scope: str, base: str, models: list[str], out: str) -> None:
    from lightning_ties import merge_to

    merge_to(out, base, models, "ties", lam=LAM, k=DENSITY, scope=scope, progress=False)


def mergekit_config(base: Path, models: list[Path], path: Path) -> None:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", f"      density: {DENSITY}", "      weight: 1.0"]
    lines += ["parameters:", "  normalize: true", f"  lambda: {LAM}", "dtype: float32", ""]
    path.write_text("\n".join(lines))


def measure(name: str, cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` as a subprocess; wall and CPU seconds and its peak RSS (MB) from ``wait4``.

    The parent stays small (no torch imported yet) because the child's peak RSS starts at the
    parent's RSS at fork time.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed ({cmd}):\n{err[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    row = {"name": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": usage.ru_maxrss / 1024}
    print(f"  {name:<28} {wall:8.2f} s wall {cpu:8.2f} s cpu {row['peak_rss_mb']:8.0f} MB", flush=True)
    return row


def count_differences(ours: Path, theirs: Path) -> tuple[int, int, int, float]:
    """Entries that differ at all, entries differing by more than 1e-6, total entries, max |diff|."""
    from lightning_ties import open_source

    a, b = open_source(ours), open_source(theirs)
    if set(a.keys()) != set(b.keys()):
        raise SystemExit(f"key sets differ: {sorted(set(a.keys()) ^ set(b.keys()))[:10]}")
    differ = far = total = 0
    worst = 0.0
    for key in a.keys():
        x, y = a.get(key), b.get(key).to(a.spec(key).dtype)
        diff = (x - y).abs()
        differ += int((x != y).sum())
        far += int((diff > 1e-6).sum())
        total += x.numel()
        worst = max(worst, float(diff.max()))
    return differ, far, total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny Llama (quick check) instead of the 168M one")
    parser.add_argument("--n-models", type=int, default=4)
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML"), help="mergekit-yaml executable")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--threads", type=int, help="OMP/MKL threads for every competitor (on a busy machine 1 avoids thread thrashing)"
    )
    parser.add_argument("--run-ours", nargs=2, metavar=("SCOPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("ROOT", "STAMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        stamp = json.loads(args.build[1])
        root = Path(args.build[0])
        _write_checkpoints([root / "base", *(root / f"ft{i}" for i in range(1, stamp["n_models"] + 1))], stamp["shape"])
        return
    if args.run_ours:
        run_ours(args.run_ours[0], args.inputs[0], args.inputs[1:], args.run_ours[1])
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_files_"))
    try:
        base, models = build_checkpoints(root / "inputs", SMALL if args.small else FULL, args.n_models)
        inputs = [str(base), *map(str, models)]
        me = [sys.executable, os.path.abspath(__file__)]
        # every run hashes its sources for the card: no run finds an earlier one's digests cached
        env = {**os.environ, "LIGHTNING_TIES_DIGEST_CACHE": "off"}
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        threads = args.threads or "default"
        print(f"TIES k={DENSITY} lam={LAM}, {args.n_models} models, outputs in {root}; threads: {threads}, {os.cpu_count()} CPUs")
        rows = [
            measure("lightning-ties per_tensor", [*me, "--run-ours", "per_tensor", str(root / "ours_pt"), "--inputs", *inputs], env),
            measure("lightning-ties global", [*me, "--run-ours", "global", str(root / "ours_global"), "--inputs", *inputs], env),
        ]
        if args.mergekit:
            cfg = root / "mergekit.yml"
            mergekit_config(base, models, cfg)
            mk_cmd = [args.mergekit, str(cfg), str(root / "mergekit"), "--quiet"]
            rows.append(measure("mergekit-yaml ties", mk_cmd + (["-j", str(args.threads)] if args.threads else []), env))
        report(rows, root, args)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def report(rows: list[dict], root: Path, args: argparse.Namespace) -> None:
    mk = rows[-1] if rows[-1]["name"].startswith("mergekit") else None
    print("\n| competitor | wall (s) | CPU (s) | peak RSS (MB) | wall speed-up vs mergekit | CPU speed-up | RSS / mergekit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = f"{mk['wall_s'] / r['wall_s']:.1f}x" if mk else "-"
        cpu = f"{mk['cpu_s'] / r['cpu_s']:.1f}x" if mk else "-"
        rss = f"{r['peak_rss_mb'] / mk['peak_rss_mb']:.2f}" if mk else "-"
        print(f"| {r['name']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | {speed} | {cpu} | {rss} |")
    result = {"rows": rows, "small": args.small, "n_models": args.n_models}
    if mk:
        differ, far, total, worst = count_differences(root / "ours_pt", root / "mergekit")
        print(
            f"\nper-tensor output vs mergekit: {differ} of {total} entries differ at all "
            f"({far} by more than 1e-6; max |diff| {worst:.3g})"
        )
        result["vs_mergekit"] = {"differ": differ, "differ_gt_1e-6": far, "total": total, "max_abs_diff": worst}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
