"""The merge engine vs the paper's flatten-and-kthvalue path and PEFT's per-tensor ``ties``.

N task vectors of P float32 parameters are merged with TIES (k=0.2, sign "mass", disjoint
mean) by four competitors, side by side in one run, each in a fresh subprocess:

- ``paper``: the paper code's path written from its formulas: flatten every model into one
  vector, stack the N task vectors into an [N, P] matrix, ``kthvalue`` per row, keep
  ``|x| >= kth`` (int(k*P) + 1 entries), sign of the sum, majority fallback, disjoint mean;
- ``ours-global``: :class:`lightning_ties.merging.TaskVectorMerger`, scope="global" (same
  maths, int(k*P) entries kept, exact radix-select threshold, streamed key by key);
- ``peft``: ``peft.utils.merge_utils.ties`` applied tensor by tensor (per-tensor trim);
- ``ours-per-tensor``: the engine with scope="per_tensor" (PEFT's maths).

Two model shapes: ``flat`` (one tensor of P entries) and ``model`` (transformer-like
embedding, attention, MLP and LayerNorm tensors totalling about P). For each competitor it
prints the wall time of the merge (inputs already in memory; output: tau_m for every key),
its CPU time (user + system: on a machine shared with other jobs the steadier measure of the
work done), the peak resident memory above the inputs (VmHWM reset before the merge), and the
ratios to ``paper`` (for ours-global) and to ``peft`` (for ours-per-tensor).
It also checks the outputs: ours-global against the paper path (which keeps one more entry
per task, so a few entries differ) and against the paper path with the kept count aligned to
int(k*P) (must be bit-identical), and ours-per-tensor against PEFT (max abs difference).

Run (about a minute at the default size; ``--params 2e6`` for a quick look)::

    .venv/bin/python benchmarks/bench_engine.py --params 20e6 --tasks 8 --threads 1

On a GPU (``--device cuda``; inputs generated on the GPU, everything runs in this process)
it times global TIES three ways with CUDA events: ``paper`` (the flatten + kthvalue path
above, on the same GPU), ``ours-global`` (the engine, merging on the inputs' device: row
``eager`` with PyTorch ops only, row ``triton`` with the fused kernels of
``lightning_ties/merging/kernels.py`` when Triton imports; ``--no-kernels`` drops it) and
``floor`` (two reads of every input: two ``torch.sum`` passes over all of them, the least
any exact global trim can do, one pass to find the thresholds and one to merge). It prints
the times, the ratios to the floor and to the paper path, and the peak GPU memory above the
inputs (``torch.cuda.max_memory_allocated``); then it checks, on a smaller size that still
takes the sampled-bracket path, that the GPU output equals the CPU engine's bit for bit::

    python benchmarks/bench_engine.py --device cuda --params 200e6 --tasks 8 --case flat
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

COMPETITORS = ("paper", "ours-global", "ours-torch-count", "peft", "ours-per-tensor")
#: the engine on torch's ops alone (LIGHTNING_TIES_NUMBA=0), beside ours-global with the compiled loops of the
#: count and the merge (lightning_ties/merging/cpu_kernels.py; run only when numba is installed)
TORCH_COUNT = "ours-torch-count"
SCALE = 0.02  # weight scale of the synthetic base model; fine-tuning moves it by ~SCALE / 2


# ---- inputs -------------------------------------------------------------------------------
def model_shapes(params: int, case: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one model: one flat tensor, or a transformer-like stack of about ``params``."""
    if case == "flat":
        return {"flat": (params,)}
    d = max(64, 64 * round(math.sqrt(params / 80) / 64))
    vocab = 16 * d
    per_layer = 12 * d * d + 13 * d
    layers = max(1, (params - vocab * d) // per_layer)
    shapes: dict[str, tuple[int, ...]] = {"embeddings.word": (vocab, d), "embeddings.norm.weight": (d,)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q", "k", "v", "o"):
            shapes[p + f"attn.{name}.weight"] = (d, d)
            shapes[p + f"attn.{name}.bias"] = (d,)
        shapes.update({p + "mlp.up.weight": (4 * d, d), p + "mlp.up.bias": (4 * d,)})
        shapes.update({p + "mlp.down.weight": (d, 4 * d), p + "mlp.down.bias": (d,)})
        for norm in ("norm1", "norm2"):
            shapes.update({p + f"{norm}.weight": (d,), p + f"{norm}.bias": (d,)})
    return shapes


def make_models(params: int, tasks: int, case: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = model_shapes(params, case)
    base = {k: SCALE * torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + (SCALE / 2) * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(tasks)]
    return base, fts


# ---- competitors (each returns tau_m: key -> float32 tensor) -------------------------------
def paper_path(base, fts, k: float, aligned: bool = False) -> dict[str, torch.Tensor]:
    """The reference code's flat path: [N, P] matrix, kthvalue per row, sign of sum, disjoint mean.

    ``aligned=True`` thresholds at the int(k*P)-th largest |x| instead (the engine's count).
    """
    keys = list(base)
    flat_base = torch.cat([base[key].reshape(-1) for key in keys])
    taus = torch.stack([torch.cat([ft[key].reshape(-1) for key in keys]) - flat_base for ft in fts])
    n = taus.shape[1]
    m = int(k * n)
    kth = n - m + 1 if aligned else n - m  # paper: kthvalue(n - int(k*n)) keeps int(k*n) + 1
    magnitudes = taus.abs()
    thresholds = magnitudes.kthvalue(kth, dim=1, keepdim=True).values
    trimmed = taus * (magnitudes >= thresholds)
    del magnitudes
    gamma = trimmed.sum(0).sign()
    gamma[gamma == 0] = 1.0 if gamma.sum() >= 0 else -1.0
    selected = trimmed * torch.where(gamma > 0, trimmed > 0, trimmed < 0)
    del trimmed
    merged = selected.sum(0) / (selected != 0).sum(0).float().clamp(min=1)
    return dict(zip(keys, (t.view(base[key].shape) for t, key in zip(merged.split([base[k].numel() for k in keys]), keys))))


def peft_per_tensor(base, fts, k: float) -> dict[str, torch.Tensor]:
    from peft.utils.merge_utils import ties

    weights = torch.ones(len(fts))
    return {key: ties([ft[key] - b for ft in fts], weights, density=k, majority_sign_method="total") for key, b in base.items()}


def ours(base, fts, k: float, scope: str) -> dict[str, torch.Tensor]:
    from lightning_ties.merging import MergeSpec, TaskVectorMerger

    return dict(TaskVectorMerger(base, fts, MergeSpec(k=k, scope=scope)))


def run_competitor(name: str, base, fts, k: float) -> dict[str, torch.Tensor]:
    if name == "paper":
        return paper_path(base, fts, k)
    if name == "peft":
        return peft_per_tensor(base, fts, k)
    return ours(base, fts, k, "per_tensor" if name == "ours-per-tensor" else "global")


# ---- measuring ----------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def worker(args: argparse.Namespace) -> None:
    """Run one competitor in this (fresh) process; print a JSON line; save its output."""
    torch.set_num_threads(args.threads)
    base, fts = make_models(int(args.params), args.tasks, args.case)
    warnings.simplefilter("ignore")
    warm_up = [{k: v[:16] for k, v in sd.items()} for sd in (base, *fts)]  # imports and first calls
    run_competitor(args.worker, warm_up[0], warm_up[1:], args.k)
    load_s = compiled_loops_load(args.tasks) if args.worker in ("ours-global", "ours-per-tensor") else None
    times, cpu_times = [], []
    rss_before = _status_kb("VmRSS")
    _reset_peak_rss()
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = run_competitor(args.worker, base, fts, args.k)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if len(times) < args.repeats:
            del out
    peak_mb = (_status_kb("VmHWM") - rss_before) / 1024
    outputs = {args.worker: out}
    extra_ties = 0
    if args.worker == "paper":
        outputs["paper-aligned"] = paper_path(base, fts, args.k, aligned=True)
        extra_ties = threshold_ties(base, fts, args.k)
    for label, tensors in outputs.items():
        torch.save({k: v.contiguous() for k, v in tensors.items()}, Path(args.out) / f"{label}.pt")
    inputs_mb = sum(v.numel() * v.element_size() for sd in [base, *fts] for v in sd.values()) / 2**20
    result = {"name": args.worker, "seconds": min(times), "cpu_seconds": min(cpu_times), "peak_mb": peak_mb,
              "count_load_s": load_s}
    print(json.dumps({**result, "inputs_mb": inputs_mb, "extra_ties": extra_ties}))


def compiled_loops_load(n_tasks: int) -> float | None:
    """Load the compiled loops now (lightning_ties/merging/cpu_kernels.py), as any merge large enough for them does
    once per process (from numba's cache on disk; the first run on a machine, or for a new number of tasks,
    compiles them): their seconds, or None when they are not used."""
    from lightning_ties.merging import cpu_kernels

    start = time.perf_counter()
    count, merge = cpu_kernels.bracket_counter(force=True), cpu_kernels.ties_merger(force=True)
    if count is None or merge is None:
        return None
    one = torch.ones(4)  # the first calls load (or compile) the loops for these argument types
    count(one, one, 0, 1, torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    merge(one, [one] * n_tasks, [0.5] * n_tasks, [0.0] * n_tasks, torch.empty(4))
    return time.perf_counter() - start


def compiled_loops_available() -> bool:
    """Whether numba imports here (the compiled loops exist): only then does ours-torch-count differ from ours-global."""
    return importlib.util.find_spec("numba") is not None and os.environ.get("LIGHTNING_TIES_NUMBA", "1") != "0"


def threshold_ties(base, fts, k: float) -> int:
    """Entries the aligned paper path keeps beyond int(k*P) per task: ties at the threshold."""
    keys = list(base)
    extra = 0
    for ft in fts:
        mags = torch.cat([(ft[key] - base[key]).reshape(-1) for key in keys]).abs()
        m = int(k * mags.numel())
        extra += int((mags >= mags.kthvalue(mags.numel() - m + 1).values).sum()) - m
    return extra


def spawn(name: str, args: argparse.Namespace, out_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--out", str(out_dir), "--case", args.case]
    cmd += ["--params", str(args.params), "--tasks", str(args.tasks), "--k", str(args.k)]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    env = {**os.environ, **({"LIGHTNING_TIES_NUMBA": "0"} if name == TORCH_COUNT else {})}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(out_dir: Path, extra_ties: int) -> list[str]:
    load = lambda label: torch.load(out_dir / f"{label}.pt", weights_only=True)  # noqa: E731
    paper, aligned, ours_g = load("paper"), load("paper-aligned"), load("ours-global")
    peft_out, ours_t = load("peft"), load("ours-per-tensor")
    lines = []
    if (out_dir / f"{TORCH_COUNT}.pt").exists():
        torch_count = load(TORCH_COUNT)
        same = all(torch.equal(torch_count[k], ours_g[k]) for k in ours_g)
        lines.append(f"ours-global (compiled loops) vs {TORCH_COUNT}: " + ("bit-identical" if same else "DIFFER"))
    differ = sum(int((paper[k] != ours_g[k]).sum()) for k in paper)
    differ_aligned = sum(int((aligned[k] != ours_g[k]).sum()) for k in aligned)
    max_diff = max(float((peft_out[k] - ours_t[k]).abs().max()) for k in peft_out)
    differ_t = sum(int((peft_out[k] != ours_t[k]).sum()) for k in peft_out)
    return lines + [
        f"ours-global vs paper (paper keeps int(k*P)+1 per task): {differ} differing entries",
        "ours-global vs paper with the count aligned to int(k*P): "
        + ("bit-identical" if differ_aligned == 0 else f"{differ_aligned} differing entries")
        + f" (the aligned path also keeps every entry tied at a task's threshold: {extra_ties} extra here;"
        " ours keeps exactly int(k*P), the first ties in key then flat order)",
        f"ours-per-tensor vs peft: {differ_t} differing entries, max abs diff {max_diff:.3g} "
        "(entries tied at a tensor's threshold: PEFT's topk keeps an arbitrary one, we keep the first)",
    ]


# ---- GPU: in-process, CUDA events ---------------------------------------------------------------
GPU_COMPETITORS = ("floor", "paper", "ours-global eager", "ours-global triton")
_CHECK_PARAMS = 6_000_000  # above the engine's 4M-entry bracketing threshold, quick on the CPU


def make_models_on(params: int, tasks: int, case: str, device: str, seed: int = 0):
    """The same kind of inputs as :func:`make_models`, generated directly on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = model_shapes(params, case)
    base = {k: SCALE * torch.randn(s, generator=g, device=device) for k, s in shapes.items()}
    fts = []
    for _ in range(tasks):
        fts.append({k: v + (SCALE / 2) * torch.randn(v.shape, generator=g, device=device) for k, v in base.items()})
    return base, fts


def two_reads(base, fts) -> torch.Tensor:
    """The floor: read every input twice (a threshold pass and a merge pass), nothing else."""
    total = torch.zeros((), device=next(iter(base.values())).device)
    for _ in range(2):
        for sd in (base, *fts):
            for v in sd.values():
                total += v.sum()
    return total


class kernels_off:
    """Within the block the engine runs its eager PyTorch path (``LIGHTNING_TIES_KERNELS=0``)."""

    def __init__(self, off: bool = True) -> None:
        self.off = off

    def __enter__(self) -> None:
        from lightning_ties.merging import kernels

        self.saved = os.environ.get(kernels.ENV_VAR)
        if self.off:
            os.environ[kernels.ENV_VAR] = "0"

    def __exit__(self, *exc) -> None:
        from lightning_ties.merging import kernels

        if self.saved is None:
            os.environ.pop(kernels.ENV_VAR, None)
        else:
            os.environ[kernels.ENV_VAR] = self.saved


def run_gpu_competitor(name: str, base, fts, k: float):
    if name == "floor":
        return two_reads(base, fts)
    if name == "paper":
        return paper_path(base, fts, k)
    with kernels_off(name.endswith("eager")):
        return ours(base, fts, k, "global")


def time_gpu(name: str, base, fts, k: float, repeats: int) -> dict:
    """Fastest of ``repeats`` runs (CUDA events around a synchronised run) and peak memory."""
    warm_up = [{key: v[:4096] for key, v in sd.items()} for sd in (base, *fts)]
    run_gpu_competitor(name, warm_up[0], warm_up[1:], k)
    if name.startswith("ours"):  # Triton compiles per input specialisation: warm up on the real sizes
        run_gpu_competitor(name, base, fts, k)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = run_gpu_competitor(name, base, fts, k)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
        del out
    peak_mb = (torch.cuda.max_memory_allocated() - allocated) / 2**20
    return {"name": name, "seconds": min(times), "peak_mb": peak_mb}


def check_gpu_equals_cpu(tasks: int, k: float, case: str, modes: tuple[str, ...]) -> list[str]:
    """The engine on the GPU (each of ``modes``: eager, triton) against the engine on the CPU and the aligned paper path."""
    base, fts = make_models_on(_CHECK_PARAMS, tasks, case, "cuda", seed=1)
    cpu = ours({kk: v.cpu() for kk, v in base.items()}, [{kk: v.cpu() for kk, v in ft.items()} for ft in fts], k, "global")
    aligned = paper_path(base, fts, k, aligned=True)
    lines = []
    for mode in modes:
        with kernels_off(mode == "eager"):
            gpu = ours(base, fts, k, "global")
        on_gpu = all(v.device.type == "cuda" for v in gpu.values())
        differ = sum(int((gpu[key].cpu() != cpu[key]).sum()) for key in cpu)
        differ_paper = sum(int((gpu[key] != aligned[key]).sum()) for key in aligned)
        lines += [
            f"check ({mode}) at {_CHECK_PARAMS:,} params x {tasks}: outputs on the GPU: {on_gpu}; "
            + ("bit-identical to the CPU engine" if differ == 0 else f"{differ} entries differ from the CPU engine (BUG)"),
            f"ours-global {mode} (GPU) vs the aligned paper path (GPU): {differ_paper} differing entries (ties at a threshold only)",
        ]
    return lines


def gpu_phases(base, fts, k: float, repeats: int, mode: str = "eager") -> list[str]:
    with kernels_off(mode == "eager"):
        return _gpu_phases(base, fts, k, repeats, mode)


def _gpu_phases(base, fts, k: float, repeats: int, mode: str) -> list[str]:
    """Where ours-global spends its time on the GPU: sample brackets, select pass, merge pass.

    CUDA events around each phase (fastest of ``repeats``), then one more run under
    ``torch.cuda.set_sync_debug_mode("warn")`` that counts the host syncs of each phase.
    """
    import warnings

    from lightning_ties.merging import MergeSpec, TaskVectorMerger
    from lightning_ties.merging.select import keep_count

    def one_run() -> dict[str, float]:
        merger = TaskVectorMerger(base, fts, MergeSpec(k=k, scope="global"))
        keys, events = merger.plan.merge_keys, {}
        sample = merger.finder.sample_brackets

        def timed_sample(*a, **kw):
            events["brackets"] = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            events["brackets"][0].record()
            out = sample(*a, **kw)
            events["brackets"][1].record()
            return out

        merger.finder.sample_brackets = timed_sample
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize()
        marks[0].record()
        merger.thresholds = merger.finder.select(keys, keep_count(k, merger.plan.numel))
        marks[1].record()
        for _ in merger:
            pass
        marks[2].record()
        torch.cuda.synchronize()
        brackets = events["brackets"][0].elapsed_time(events["brackets"][1]) if "brackets" in events else 0.0
        return {
            "sample brackets": brackets,
            "select pass": marks[0].elapsed_time(marks[1]) - brackets,
            "merge pass": marks[1].elapsed_time(marks[2]),
        }

    one_run()  # warm up
    runs = [one_run() for _ in range(repeats)]
    best = {phase: min(r[phase] for r in runs) for phase in runs[0]}
    syncs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            merger = TaskVectorMerger(base, fts, MergeSpec(k=k, scope="global"))
            n = len(caught)
            m = keep_count(k, merger.plan.numel)
            brackets = merger.finder.sample_brackets(merger.plan.merge_keys, m)
            syncs["sample brackets"] = len(caught) - n
            n = len(caught)
            merger.finder.sample_brackets = lambda *a, **kw: brackets
            merger.thresholds = merger.finder.select(merger.plan.merge_keys, m)
            syncs["select pass"] = len(caught) - n
            n = len(caught)
            for _ in merger:
                pass
            syncs["merge pass"] = len(caught) - n
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [
        f"ours-global {mode} phases (CUDA events, fastest of {repeats}): "
        + ", ".join(f"{phase} {ms:.1f} ms ({syncs[phase]} host syncs)" for phase, ms in best.items())
    ]


def gpu_main(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this torch")
    from lightning_ties.merging import kernels

    if args.no_kernels:
        os.environ[kernels.ENV_VAR] = "0"
    modes = ("eager", "triton") if kernels.available("cuda") else ("eager",)
    if not args.no_kernels and modes == ("eager",):
        print("note: Triton is not importable here (or the kernels are off): only the eager engine runs")
    competitors = [c for c in GPU_COMPETITORS if not c.startswith("ours") or c.split()[-1] in modes]
    props = torch.cuda.get_device_properties(0)
    print(f"TIES k={args.k}, {args.tasks} tasks x {int(args.params):,} float32 params, global trim, on {props.name}, torch {torch.__version__}")
    print(f"host CPU: {cpu_model()}")
    for case in ["flat", "model"] if args.case == "both" else [args.case]:
        base, fts = make_models_on(int(args.params), args.tasks, case, "cuda")
        torch.cuda.synchronize()
        inputs_mb = sum(v.numel() * v.element_size() for sd in (base, *fts) for v in sd.values()) / 2**20
        results = {name: time_gpu(name, base, fts, args.k, args.repeats) for name in competitors}
        phases = [line for mode in modes for line in gpu_phases(base, fts, args.k, args.repeats, mode)]
        del base, fts
        torch.cuda.empty_cache()
        print(f"\n[{case}: {len(model_shapes(int(args.params), case))} tensor(s); inputs {inputs_mb:,.0f} MB on the GPU]")
        print(f"{'competitor':<20}{'ms':>10}{'x floor':>10}{'speed-up vs paper':>19}{'peak MB over inputs':>21}")
        floor, paper = results["floor"]["seconds"], results["paper"]["seconds"]
        for name in competitors:
            r = results[name]
            print(
                f"{name:<20}{r['seconds'] * 1000:>10.1f}{r['seconds'] / floor:>9.1f}x"
                f"{paper / r['seconds']:>18.1f}x{r['peak_mb']:>21,.0f}"
            )
        for line in [*phases, *check_gpu_equals_cpu(args.tasks, args.k, case, modes)]:
            print("  " + line)


def cpu_model() -> str:
    """The CPU's model name, x86 family/model/stepping, clock and L2 (``/proc/cpuinfo``) and core count:
    figures hold for the CPU they ran on ("AMD EPYC" alone names every generation, Zen 1 to Zen 5)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    fields: dict[str, str] = {}
    for line in info:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    flags = fields.get("flags", "").split()
    vector = next((isa for isa in ("avx512f", "avx2", "neon") if isa in flags), "")
    if "model name" in fields:
        details = [f"{os.cpu_count()} logical CPUs", *([vector] if vector else [])]
        if "cpu family" in fields:
            details.append(f"family {fields['cpu family']} model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}")
        if "cpu MHz" in fields:
            details.append(f"{float(fields['cpu MHz']) / 1000:.1f} GHz")
        if "cache size" in fields:
            details.append(f"cache {fields['cache size']}")
        return f"{fields['model name']} ({', '.join(details)})"
    import platform

    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def bincount_ns_per_entry(n: int = 4_000_000) -> float:
    """``torch.bincount``'s cost per entry here (int32 digits over 8192 bins, fastest of 3): the counting
    pass's main cost, and the one that differs most between CPUs (0.7 ns on one AMD EPYC, 4 on another)."""
    digits = torch.arange(n, dtype=torch.int32).bitwise_and_(8191)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        torch.bincount(digits, minlength=8192)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=20e6, help="parameters per model (default 20e6)")
    parser.add_argument("--tasks", type=int, default=8, help="number of fine-tuned models (default 8)")
    parser.add_argument("--k", type=float, default=0.2, help="fraction kept by the trim (default 0.2)")
    parser.add_argument("--case", choices=["flat", "model", "both"], default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="merges per competitor; the fastest is reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where inputs live and merges run")
    parser.add_argument(
        "--no-kernels", action="store_true", help="--device cuda: only the eager engine (as LIGHTNING_TIES_KERNELS=0)"
    )
    parser.add_argument("--worker", choices=COMPETITORS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cuda":
        return gpu_main(args)
    cases = ["flat", "model"] if args.case == "both" else [args.case]
    print(
        f"TIES k={args.k}, {args.tasks} tasks x {int(args.params):,} float32 params, "
        f"{args.threads} thread(s), torch {torch.__version__}\nCPU: {cpu_model()}; load average {os.getloadavg()[0]:.1f}; "
        f"torch.bincount {bincount_ns_per_entry():.2f} ns per entry; CPU loops: "
        + ("compiled loops (numba), beside ours-torch-count" if compiled_loops_available() else "torch ops (numba not installed)")
    )
    competitors = [c for c in COMPETITORS if c != TORCH_COUNT or compiled_loops_available()]
    for case in cases:
        args.case = case
        n_tensors = len(model_shapes(int(args.params), case))
        with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
            results = {name: spawn(name, args, Path(tmp)) for name in competitors}
            checks = compare(Path(tmp), results["paper"]["extra_ties"])
        inputs_mb = results["paper"]["inputs_mb"]
        print(f"\n[{case}: {n_tensors} tensor(s); inputs {inputs_mb:,.0f} MB]")
        header = ("wall s", 8), ("speed-up", 10), ("CPU s", 8), ("CPU ratio", 11), ("peak MB over inputs", 21)
        print(f"{'competitor':<17}" + "".join(f"{title:>{width}}" for title, width in header) + f"{'memory ratio':>14}")
        for name in competitors:
            ref = results["paper" if name in ("paper", "ours-global", TORCH_COUNT) else "peft"]
            r = results[name]
            speed = ref["seconds"] / r["seconds"]
            cpu = ref["cpu_seconds"] / r["cpu_seconds"]
            memory = ref["peak_mb"] / max(r["peak_mb"], 1.0)
            print(
                f"{name:<17}{r['seconds']:>8.2f}{speed:>9.1f}x{r['cpu_seconds']:>8.2f}{cpu:>10.1f}x"
                f"{r['peak_mb']:>21,.0f}{memory:>13.1f}x"
            )
        load_s = results["ours-global"].get("count_load_s")
        if load_s is not None:
            print(f"  ours-global loaded the compiled loops once before its timed merges: {load_s:.2f} s")
        for line in checks:
            print("  " + line)
    # the load during the run: on a shared machine wall times (and thread scaling) hold only when it is low
    print(f"\nload average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
