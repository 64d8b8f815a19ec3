"""The demo end to end: pretrain, fine-tune one model per task, merge every way, score on held-out data.

Steps (all seeded, CPU, offline):

1. pretrain a :class:`DigitsNet` on the source task (identity of the digits 0-4);
2. for each task: fit a linear-probe head on the frozen pretrained features (the task's head,
   kept fixed), then fine-tune the body with a Lightning ``Trainer``;
3. wire the checkpoints into :class:`~lightning_ties.pytorch_lightning.MultiTaskMergeModule` (per-task
   heads) and, through Lightning's validation loop, score on the test split: the base, the
   fine-tuned models, and each merge method with the paper's no-validation recipe and with
   lam (and k) searched on the validation split;
4. when ``learned`` is among the methods, learn per-task, per-layer coefficients on the validation split (``learn_coefficients``) and score them too.

Example (what ``lightning-ties demo --fast`` runs, without printing)::

    from lightning_ties.config import DEMO_FAST, DemoConfig, load_config
    cfg = load_config(DemoConfig, presets=[("fast", DEMO_FAST)])
    report = run_demo(cfg, out_dir="runs/demo")
    print(report.plain_table())
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import LEARNED, DemoConfig
from ..io import save_safetensors
from ..io.task_store import TaskVectorStore
from ..pytorch_lightning import MultiTaskMergeModule, learn_coefficients
from ..pytorch_lightning.scoring import TaskScorer, make_trainer, quiet_lightning
from ..merging import get_method
from ..report import ResultRow, RunReport, SearchCurve, learned_row
from .data import SOURCE_TASK, DigitsSuite, DigitsTask
from .models import HEAD_PATTERN, DigitsNet, linear_probe
from .training import fit_classifier

__all__ = [
    "build_scorer", "finetune", "learn", "make_suite", "pretrain",
    "quiet_lightning", "run_continual", "run_demo", "save_checkpoints", "torch_threads", "train_models",
]

Progress = Callable[[str], None]


def pretrain(cfg: DemoConfig, suite: DigitsSuite) -> DigitsNet:
    """The shared starting point: a DigitsNet trained on the source task (identity of ``data.source_digits``)."""
    torch.manual_seed(cfg.seed)
    base = DigitsNet(num_classes=10, hidden=cfg.model.hidden, depth=cfg.model.depth)
    x, y = suite.split(SOURCE_TASK, "train", digits=cfg.data.source_digits)
    return fit_classifier(base, x, y, cfg.pretrain.epochs, cfg.pretrain.lr, True, cfg.seed, cfg.pretrain.batch_size)


def finetune(cfg: DemoConfig, suite: DigitsSuite, base: DigitsNet, index: int) -> dict[str, torch.Tensor]:
    """Task ``cfg.tasks[index]``: a linear-probe head on frozen base features, then the body fine-tuned."""
    task = DigitsTask.parse(cfg.tasks[index])
    x, y = suite.split(task, "train")
    net = copy.deepcopy(base)
    net.head = linear_probe(base, x, y, task.num_classes)
    fit_classifier(
        net, x, y, cfg.finetune.epochs, cfg.finetune.lr, False, cfg.seed + 1 + index, cfg.finetune.batch_size
    )
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads: the demo's tiny matrices run fastest on one, and share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_models(
    cfg: DemoConfig, suite: DigitsSuite, say: Progress
) -> tuple[DigitsNet, dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Pretrain the base and fine-tune one copy per task; returns base, fine-tuned state dicts, seconds."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = pretrain(cfg, suite)
    timings["pretrain_s"] = time.perf_counter() - t0
    say(f"pretrained the base on digits {list(cfg.data.source_digits)} ({timings['pretrain_s']:.1f}s)")
    finetuned = {}
    t1 = time.perf_counter()
    for i, name in enumerate(cfg.tasks):
        finetuned[name] = finetune(cfg, suite, base, i)
        say(f"fine-tuned {name} ({i + 1}/{len(cfg.tasks)})")
    timings["finetune_s"] = time.perf_counter() - t1
    return base, finetuned, timings


def save_checkpoints(
    out_dir: Path, base: DigitsNet, finetuned: Mapping[str, Mapping[str, torch.Tensor]], overwrite: bool = True
) -> dict[str, str]:
    """Write base and fine-tuned weights as .safetensors (what merge/search/evaluate configs read); ``overwrite``
    as :func:`~lightning_ties.io.save_safetensors`'s."""
    folder = out_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"base": str(save_safetensors(base.state_dict(), folder / "base.safetensors", overwrite=overwrite))}
    for name, state in finetuned.items():
        paths[name] = str(save_safetensors(dict(state), folder / f"{name}.safetensors", overwrite=overwrite))
    return paths


def build_scorer(
    cfg: DemoConfig, base: DigitsNet, finetuned: Mapping[str, Mapping[str, torch.Tensor]], logger: Any = None
) -> Any:
    """A :class:`~lightning_ties.pytorch_lightning.scoring.TaskScorer` over base and the fine-tuned models (heads: ``head.*``)."""
    arch = DigitsNet(num_classes=10, hidden=cfg.model.hidden, depth=cfg.model.depth)
    module = MultiTaskMergeModule(base.state_dict(), dict(finetuned), model=arch, heads=[HEAD_PATTERN])
    return TaskScorer(module, make_trainer(logger), finetuned)


def learn(cfg: DemoConfig, base: DigitsNet, finetuned: Mapping[str, Any], val: Mapping[str, Any]) -> Any:
    """Per-task/per-layer coefficients trained on the validation split (``learn_coefficients``)."""
    arch = copy.deepcopy(base)
    return learn_coefficients(
        arch,
        dict(finetuned),
        dict(val),
        heads=[HEAD_PATTERN],
        seed=cfg.seed,
        trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False, "logger": False},
        **dict(cfg.learned),
    )


def _paper_recipe(method: str) -> tuple[float | None, float]:
    m = get_method(method)
    return m.default_k, m.default_lam


def make_suite(cfg: DemoConfig) -> DigitsSuite:
    return DigitsSuite(
        seed=cfg.seed,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        train_limit=cfg.data.train_limit,
    )


def run_demo(
    cfg: DemoConfig,
    out_dir: str | Path | None = None,
    logger: Any = None,
    say: Progress = lambda _: None,
    tick: Callable[[], None] = lambda: None,
) -> RunReport:
    """Run the whole demo and return its report (the caller prints and writes it).

    Args:
        cfg: the demo config (``load_config(DemoConfig, ...)``).
        out_dir: where the checkpoints go (``<out_dir>/checkpoints``); None keeps them in memory only.
        logger: a Lightning logger the evaluation Trainer logs to.
        say: called with one line per finished stage (progress messages).
        tick: called after each search candidate (a progress bar's update).
    """
    t_start = time.perf_counter()
    suite = make_suite(cfg)
    with quiet_lightning(), torch_threads(1):
        base, finetuned, timings = train_models(cfg, suite, say)
        ckpts = save_checkpoints(Path(out_dir), base, finetuned, cfg.overwrite) if out_dir is not None else {}
        val = {t: suite.dataloader(t, "val") for t in cfg.tasks}
        test = {t: suite.dataloader(t, "test") for t in cfg.tasks}
        report = RunReport(
            title="lightning-ties demo: digits suite", tasks=list(cfg.tasks), metric="accuracy", split="test"
        )
        ev = build_scorer(cfg, base, finetuned, logger)
        t_eval = time.perf_counter()
        report.add_row(ResultRow("base (pretrained)", "base", "reference", ev.score_base(test)))
        report.add_row(ResultRow("fine-tuned (own task)", "finetuned", "reference", ev.score_finetuned(test)))
        learned_info = None
        for method in cfg.methods:
            if method == LEARNED:
                t_l = time.perf_counter()
                result = learn(cfg, base, finetuned, val)
                scores = ev.score_weights(test, result.state_dict)
                timings["learned_s"] = time.perf_counter() - t_l
                learned_info = result.to_dict()
                report.add_row(learned_row(result, scores))
                say(f"learned coefficients ({timings['learned_s']:.1f}s)")
                continue
            m = get_method(method)
            if not m.has_lam:
                report.add_row(ResultRow(method, method, "no parameters", ev.score_merged(test, method, None, None)))
                continue
            k, lam = _paper_recipe(method)
            report.add_row(
                ResultRow(f"{method} (paper recipe)", method, "paper recipe", ev.score_merged(test, method, k, lam), k, lam)
            )
            result = ev.search(val, method, cfg.search, on_candidate=lambda _c: tick())
            scores = ev.score_merged(test, method, result.k, result.lam)
            report.add_row(ResultRow(f"{method} (searched)", method, "searched on val", scores, result.k, result.lam))
            report.searches.append(SearchCurve.from_search(method, result, cfg.search.objective))
            k = "" if result.k is None else f"k={result.k}, "  # methods without a trim have no k to report
            say(f"{method}: searched {len(result.candidates)} candidates, chose {k}lam={result.lam}")
        timings["evaluate_s"] = time.perf_counter() - t_eval
    timings["total_s"] = time.perf_counter() - t_start
    report.fill_normalized()
    report.extra = {"timings": timings, "checkpoints": ckpts, "source_task": SOURCE_TASK}
    if learned_info is not None:
        report.extra["learned"] = learned_info
    return report


def run_continual(
    cfg: DemoConfig, out_dir: str | Path, logger: Any = None, say: Progress = lambda _: None
) -> RunReport:
    """Continual merging: tasks arrive one at a time; after each, the merge of all tasks so far is scored.

    Each fine-tune starts from the pretrained base; its task vector goes to an on-disk
    :class:`~lightning_ties.io.task_store.TaskVectorStore`, and every merge reads the tasks from
    there, so step t never holds t fine-tuned models in memory. At each step, every searchable
    method of ``cfg.methods`` is searched on the validation split of the tasks seen so far and
    scored on their test split (the other tasks show "-").
    """
    t_start = time.perf_counter()
    suite = make_suite(cfg)
    methods = [m for m in cfg.methods if m != LEARNED and get_method(m).has_lam]
    if not methods:
        raise ValueError(f"continual merging needs a method with lam in methods, got {cfg.methods}")
    report = RunReport("lightning-ties continual merging: digits suite", list(cfg.tasks), split="test")
    with quiet_lightning(), torch_threads(1):
        base = pretrain(cfg, suite)
        store = TaskVectorStore(Path(out_dir) / "task_store", k=None, exclude=[HEAD_PATTERN])
        if store.has_base():  # a rerun into the same folder starts a fresh sequence
            shutil.rmtree(store.root)
            store = TaskVectorStore(Path(out_dir) / "task_store", k=None, exclude=[HEAD_PATTERN])
        store.save_base(base.state_dict())
        val = {t: suite.dataloader(t, "val") for t in cfg.tasks}
        test = {t: suite.dataloader(t, "test") for t in cfg.tasks}
        trainer = make_trainer(logger)
        finetuned_scores: dict[str, float] = {}
        base_scores: dict[str, float] = {}
        for i, name in enumerate(cfg.tasks):
            store.add(name, finetune(cfg, suite, base, i))
            seen = cfg.tasks[: i + 1]
            if i == 0:
                continue  # one task: nothing to merge yet
            arch = DigitsNet(num_classes=10, hidden=cfg.model.hidden, depth=cfg.model.depth)
            module = MultiTaskMergeModule(
                store.base_state(), {t: store.source(t) for t in seen}, model=arch, heads=[HEAD_PATTERN]
            )
            scorer = TaskScorer(module, trainer, {t: store.source(t) for t in seen})
            seen_val = {t: val[t] for t in seen}
            seen_test = {t: test[t] for t in seen}
            finetuned_scores.update(scorer.score_finetuned({t: test[t] for t in seen if t not in finetuned_scores}))
            base_scores.update({t: v for t, v in scorer.score_base(seen_test).items() if t not in base_scores})
            for method in methods:
                result = scorer.search(seen_val, method, cfg.search)
                scores = scorer.score_merged(seen_test, method, result.k, result.lam)
                report.add_row(
                    ResultRow(
                        f"{method} after {len(seen)} tasks", method, "searched on val", scores, result.k, result.lam
                    )
                )
                report.searches.append(SearchCurve.from_search(f"{method} ({len(seen)} tasks)", result, cfg.search.objective))
            say(f"task {i + 1}/{len(cfg.tasks)} ({name}): merged {len(seen)} tasks from the store")
    report.rows[:0] = [
        ResultRow("base (pretrained)", "base", "reference", base_scores),
        ResultRow("fine-tuned (own task)", "finetuned", "reference", finetuned_scores),
    ]
    report.fill_normalized()
    report.extra = {"timings": {"total_s": time.perf_counter() - t_start}, "task_store": str(store.root)}
    return report
