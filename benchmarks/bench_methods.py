"""Every registered merge method side by side on the digits demo suite.

For each method of the registry (``lightning_ties.METHODS``): the paper's no-validation recipe
and the scale (and k, for the trimming methods) chosen on the validation split, each scored on
the held-out test split through the demo's own scorer (Lightning's validation loop, per-task
heads). Printed per method: per-task and mean test accuracy (%), normalized accuracy (merged /
fine-tuned, per task), the time and peak extra memory of computing tau_m once, and the search
time.

The suite is the demo's (``lightning-ties demo``: 5 tasks on scikit-learn's digits, fine-tuned
with Lightning); its checkpoints are cached in ``<out>/checkpoints`` and reused when the config
is unchanged (``--retrain`` rebuilds them).

Run: ``python benchmarks/bench_methods.py [--methods tsv iso_c ...] [--out runs/bench_methods] [key=value ...]``
(``key=value``: demo config overrides, e.g. ``seed=1`` or ``search.strategy=coarse_to_fine``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lightning_ties.config import DemoConfig, load_config
from lightning_ties.demo.models import HEAD_PATTERN, DigitsNet
from lightning_ties.demo.run import build_scorer, make_suite, save_checkpoints, torch_threads, train_models
from lightning_ties.lightning.scoring import quiet_lightning
from lightning_ties.merging import METHODS, get_method, method_task_vector
from lightning_ties.merging.regmean import collect_grams, regmean_state_dict


def _rss_peak_kib() -> int | None:
    """The process's peak resident memory (VmHWM) in KiB, Linux only."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return None


def _reset_rss_peak() -> int | None:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return it; None where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _rss_peak_kib()


def measure_merge(base: Any, models: list[Any], method: str) -> tuple[float, float | None]:
    """Seconds and peak extra resident memory (MiB) of computing tau_m once with the paper's parameters."""
    before = _reset_rss_peak()
    t0 = time.perf_counter()
    method_task_vector(base, models, method, exclude=[HEAD_PATTERN])
    seconds = time.perf_counter() - t0
    after = _rss_peak_kib()
    extra = (after - before) / 1024 if before is not None and after is not None else None
    return seconds, extra


def load_or_train(cfg: DemoConfig, out: Path, retrain: bool) -> tuple[DigitsNet, dict[str, dict[str, torch.Tensor]]]:
    """The demo's base and fine-tuned models: from ``<out>/checkpoints`` when built with this config."""
    recipe = {k: v for k, v in asdict(cfg).items() if k in ("tasks", "seed", "data", "model", "pretrain", "finetune")}
    stamp = out / "checkpoints" / "recipe.json"
    base = DigitsNet(num_classes=10, hidden=cfg.model.hidden, depth=cfg.model.depth)
    if not retrain and stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(recipe, default=str)):
        base.load_state_dict(load_file(str(out / "checkpoints" / "base.safetensors")))
        finetuned = {t: load_file(str(out / "checkpoints" / f"{t}.safetensors")) for t in cfg.tasks}
        print(f"reusing the checkpoints in {out / 'checkpoints'}")
        return base, finetuned
    suite = make_suite(cfg)
    trained, finetuned, timings = train_models(cfg, suite, print)
    save_checkpoints(out, trained, finetuned)
    stamp.write_text(json.dumps(recipe, default=str))
    print(f"trained the suite in {timings['pretrain_s'] + timings['finetune_s']:.1f}s")
    return trained, finetuned


def regmean_weights(
    base: DigitsNet, finetuned: dict[str, dict[str, torch.Tensor]], val: dict[str, Any], examples: int, alpha: float
) -> dict[str, torch.Tensor]:
    """RegMean's merged weights: Gram matrices of the body's linear layers on ``examples``
    validation examples of each task (its own fine-tuned model), the heads left as base's."""
    body = lambda key: re.search(HEAD_PATTERN, key) is None  # noqa: E731
    states, grams = [], []
    for task, state in finetuned.items():
        net = DigitsNet(num_classes=state["head.weight"].shape[0], hidden=base.head.in_features, depth=len(base.body) // 2)
        net.load_state_dict(state)
        g, _ = collect_grams(net, val[task], max_examples=examples, include=lambda name, _: body(f"{name}.weight"))
        grams.append(g)
        states.append({k: v for k, v in state.items() if body(k)})
    merged = regmean_state_dict(states, grams, alpha)
    return {**{k: v for k, v in base.state_dict().items() if not body(k)}, **merged}


def _row(name: str, k: Any, lam: Any, scores: dict[str, float], ref: dict[str, float], tasks: list[str], extra: str) -> str:
    cells = [f"{100 * scores[t]:5.1f}" for t in tasks]
    mean = 100 * sum(scores.values()) / len(scores)
    norm = 100 * sum(scores[t] / ref[t] for t in tasks) / len(tasks)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"| {name:<28} | {fmt(k):>4} | {fmt(lam):>4} | " + " | ".join(cells) + f" | {mean:5.1f} | {norm:5.1f} | {extra}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="*", default=None, help="registry methods (default: all)")
    p.add_argument("--out", default="runs/bench_methods")
    p.add_argument("--retrain", action="store_true", help="rebuild the cached checkpoints")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--regmean-examples", type=int, default=256, help="validation examples per task for RegMean's Gram matrices (0: skip RegMean)")
    p.add_argument("overrides", nargs="*", help="demo config overrides (key=value)")
    args = p.parse_args(argv)
    cfg = load_config(DemoConfig, overrides=args.overrides)
    methods = args.methods or list(METHODS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"tasks": list(cfg.tasks), "methods": {}}
    with quiet_lightning(), torch_threads(1):
        base, finetuned = load_or_train(cfg, out, args.retrain)
        suite = make_suite(cfg)
        val = {t: suite.dataloader(t, "val") for t in cfg.tasks}
        test = {t: suite.dataloader(t, "test") for t in cfg.tasks}
        scorer = build_scorer(cfg, base, finetuned)
        ref = scorer.score_finetuned(test)
        base_scores = scorer.score_base(test)
        tasks = list(cfg.tasks)
        header = f"| {'method':<28} | {'k':>4} | {'lam':>4} | " + " | ".join(f"{t[:5]:>5}" for t in tasks)
        lines = [header + " |  mean |  norm | tau_m s, peak MiB; search s (candidates)"]
        lines.append(_row("base (pretrained)", None, None, base_scores, ref, tasks, ""))
        lines.append(_row("fine-tuned (own task)", None, None, ref, ref, tasks, ""))
        results["base"], results["finetuned"] = base_scores, ref
        models = [finetuned[t] for t in tasks]
        for method in methods:
            m = get_method(method)
            seconds, peak = measure_merge(base.state_dict(), models, method)
            cost = f"{seconds:.3f}s, {'-' if peak is None else f'{peak:.1f}'} MiB"
            k = m.parameters().get("k")
            lam = m.lam if m.searchable else None
            paper = scorer.score_merged(test, method, k, lam)
            entry: dict[str, Any] = {"merge_s": seconds, "peak_mib": peak, "paper": {"k": k, "lam": lam, "test": paper}}
            if not m.searchable:
                lines.append(_row(method, k, lam, paper, ref, tasks, cost))
                results["methods"][method] = entry
                continue
            lines.append(_row(f"{method} (paper)", k, lam, paper, ref, tasks, cost))
            t0 = time.perf_counter()
            found = scorer.search(val, method, cfg.search)
            search_s = time.perf_counter() - t0
            chosen = scorer.score_merged(test, method, found.k, found.lam)
            lines.append(
                _row(f"{method} (val-chosen)", found.k, found.lam, chosen, ref, tasks, f"search {search_s:.1f}s ({len(found.candidates)})")
            )
            entry["searched"] = {"k": found.k, "lam": found.lam, "test": chosen, "search_s": search_s, "candidates": len(found.candidates)}
            results["methods"][method] = entry
            print(lines[-2], lines[-1], sep="\n", flush=True)
        if args.regmean_examples > 0:  # data-aware: not a registry method, driven here with the val loaders
            before = _reset_rss_peak()
            t0 = time.perf_counter()
            weights = regmean_weights(base, finetuned, val, args.regmean_examples, alpha=0.9)
            seconds = time.perf_counter() - t0
            after = _rss_peak_kib()
            peak = (after - before) / 1024 if before is not None and after is not None else None
            scores = scorer.score_weights(test, weights)
            cost = f"{seconds:.3f}s incl. data, {'-' if peak is None else f'{peak:.1f}'} MiB"
            lines.append(_row(f"regmean ({args.regmean_examples}/task)", None, None, scores, ref, tasks, cost))
            results["methods"]["regmean"] = {"merge_s": seconds, "peak_mib": peak, "examples": args.regmean_examples, "alpha": 0.9, "test": scores}
            print(lines[-1], flush=True)
    print("\ntest accuracy (%), digits suite; lam (and k) chosen on the validation split, as the demo\n")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
