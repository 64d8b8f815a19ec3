"""LearnedMergeModule: a LightningModule whose only trainable parameters are the merging coefficients."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from ...evaluation.metrics import ArgmaxAccuracy
from ...merging import METHODS, MergeOptions, MergeReport, TaskVectorMerger, as_source, get_method
from ...merging.plan import Patterns
from .._compat import pl
from ..sharded import refuse_sharded
from ...core.heads import HeadsArg, HeadStore, differing_keys, require_heads
from ...core.keys import held_names, match_to_module, module_ties
from ...core.matching import match_sources
from ...core.merger import module_device
from ...core.learned.components import TaskComponents
from ...core.learned.data import check_loaders, split_loaders
from ...core.learned.checks import check_arguments, coefficient_logs
from ...core.learned.groups import group_keys
from ...core.learned.start import StartScale, learned_method, search_start_scale, start_scale
from ...core.search import SearchResult
from ...core.learned.objectives import (
    LossObjective,
    StepCaller,
    cross_entropy,
    logits_of,
    prediction_entropy,
    split_batch,
)


class LearnedMergeModule(pl.LightningModule):
    """A LightningModule whose only trainable parameters are the merging coefficients lam[task, group].

    Train it with ``Trainer.fit(module)`` (its own ``train_dataloader``/``val_dataloader`` serve
    the fit part and the hold-out of ``dataloaders``); the frozen model stays in eval mode, so
    Lightning's note about modules in eval mode is expected. Checkpoints hold only the
    coefficients: to resume, build the module with the same arguments and pass ``ckpt_path``.

    Example:
        >>> base = nn.Linear(2, 2)
        >>> fts = {"a": {k: v + 1 for k, v in base.state_dict().items()}, "b": base.state_dict()}
        >>> x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
        >>> loaders = {t: DataLoader(list(zip(x, y)), batch_size=4) for t in fts}
        >>> module = LearnedMergeModule(base, fts, loaders, k=1.0, granularity="task", holdout=0.0)
        >>> module.coefficients.shape
        torch.Size([2, 1])

    Args:
        model: the architecture the merged weights run in (an ``nn.Module`` whose state dict has
            base's keys); by default it holds the base weights itself. Kept frozen in eval mode.
        tasks: task name -> fine-tuned model (module, state dict, path or source) from base, matched
            to ``model``'s keys like base (:mod:`lightning_ties.core.keys`). The components live
            in this module's buffers, so the Trainer puts them (and the coefficients) on its device.
        dataloaders: task name -> DataLoader of validation batches to learn from.
        base: the pretrained weights when they are not ``model``'s own (they are written into
            ``model`` in place, so one copy is kept).
        heads: regexes (or submodules of ``model``) naming per-task keys (never merged; each task
            runs with its own). Keys whose shape or presence differs across tasks are heads too
            (:mod:`lightning_ties.core.heads`).
        method: registry method whose components are learned (``"ties"``, ``"task_arithmetic"``,
            any method with a linear per-task merge; ``"auto"``: the best such method of the
            search ``lam``); ``k`` (default: the method's, 0.2 for TIES) and ``params`` go to it.
        lam: the scale every coefficient starts at: a number, a search's :class:`SearchResult`
            (its best lam, and its k when ``k`` is None: start where the search put the merge),
            or None (the method's default, 1.0 for TIES: the first forward is ``ties_merge(k, lam=1)``).
            To search it on the hold-out, call :meth:`search_start` before ``fit``.
        granularity: ``"task"``, ``"layer"`` or ``"tensor"``; ``groups``: regexes for ``"layer"``.
        objective: ``"ce"``, ``"entropy"``, ``"validation_step"`` or ``fn(output, target) -> loss``.
        l2: weight of ``||lam - lam_start||^2`` added to the loss: pulls the coefficients toward
            where they started (:meth:`start_from`).
        holdout: fraction of each task's data held out to pick the final coefficients, a dict of
            hold-out loaders, or 0 (no hold-out: the last coefficients are final).
        lr: Adam learning rate of the coefficients.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Any],
        dataloaders: Mapping[str, DataLoader],
        base: Any = None,
        heads: HeadsArg = None,
        method: str = "ties",
        k: float | None = None,
        lam: StartScale = None,
        granularity: str = "layer",
        groups: Patterns = None,
        objective: LossObjective = "ce",
        l2: float = 0.0,
        holdout: float | Mapping[str, DataLoader] = 0.2,
        lr: float = 1e-2,
        seed: int = 0,
        include: Patterns = None,
        exclude: Patterns = None,
        **params: Any,
    ) -> None:
        super().__init__()
        check_arguments(model, tasks, granularity, objective, l2, holdout, lr)
        if objective == "validation_step" and not isinstance(model, pl.LightningModule):
            raise ValueError("objective='validation_step' needs model to be a LightningModule with validation_step")
        self.tasks = list(tasks)
        self.objective = objective
        self.l2 = float(l2)
        self.lr = float(lr)
        self.granularity = granularity
        loaders = check_loaders(dataloaders, self.tasks, "dataloaders")
        self._fit_loaders, self._holdout_loaders = split_loaders(loaders, holdout, seed, self.tasks)
        self.strict_loading = False  # checkpoints hold the coefficients, not the frozen weights
        method = learned_method(method, lam)  # "auto": the best method of the search lam that splits into shares
        self.method = get_method(method)
        if not self.method.decomposes:  # before any component is computed
            raise ValueError(
                f"method {method!r} does not split into per-task shares, so it has no coefficients to learn; "
                f"use one that does: {', '.join(sorted(n for n, m in METHODS.items() if m.decomposes))}"
            )
        lam, k = start_scale(lam, method, k)  # a search's result gives its best lam (and k)
        if lam == "search":
            raise ValueError("lam='search' is learn_coefficients'; on the module, call search_start(trainer) before fit")
        # checked once, k a named field (a method without k refuses it here, by name)
        options = MergeOptions.from_keywords(method, k=k, **params)
        self.merge_params = options.method_params
        # Everything is checked on specs before any tensor is read or model is changed.
        # sources are matched to the model's own keys (an inner model's folder under its attribute...)
        model_keys = list(model.state_dict())
        base_src = match_to_module(base, model_keys, label="base") if base is not None else as_source(model, "base")
        base_src, sources, named, self.plan = match_sources(model, base_src, tasks, heads, include, exclude)
        self.sources = sources  # read again only by learn.merge_of (another method's merge, to compare on the hold-out)
        self.head_keys = _head_keys(self.plan, model, base_src, sources, named)
        self.groups, self.key_group = group_keys(self.plan.merge_keys, granularity, groups)
        self.model = model.requires_grad_(False).eval()
        if base is not None and base is not model:
            _write_base_into(model, base_src)
        # each task's head, read now into buffers that move with this module (and stay out of checkpoints)
        self.heads = HeadStore(self.head_keys, dict(zip(self.tasks, sources)), as_buffers=True)
        # components are computed where the model is (the GPU when it already lives there) and move
        # with this module: the Trainer puts them, the heads and the coefficients on its device
        merger = TaskVectorMerger(as_source(model, "base"), sources, options, plan=self.plan, device=module_device(model))
        self.components = TaskComponents.from_iterable(merger.components(), len(self.tasks))
        self.thresholds = [t.value for t in merger.thresholds] if merger.thresholds else None
        init = float(self.method.default_lam if lam is None else lam)
        shape = (len(self.tasks), len(self.groups))
        self.coefficients = nn.Parameter(torch.full(shape, init))
        self.register_buffer("initial_coefficients", torch.full(shape, init))
        self.register_buffer("best_coefficients", torch.full(shape, init))
        self.register_buffer("best_score", torch.tensor(math.inf))
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.val_loss = nn.ModuleList(MeanMetric() for _ in self.tasks)
        self.val_acc = nn.ModuleList(ArgmaxAccuracy() for _ in self.tasks)  # the package's one accuracy
        self._val_params: dict[str, torch.Tensor] | None = None
        self._fixed_params: dict[str, torch.Tensor] | None = None  # holdout_scores: merged weights to score instead

    # ---- the merged parameters -------------------------------------------------------------
    def merged_parameters(self, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """theta_base + sum_t lam[t, g] * delta_t for every merged key (differentiable in lam)."""
        lam = self.coefficients if coefficients is None else coefficients
        base = self.model.state_dict(keep_vars=True)
        out = {}
        for i, key in enumerate(self.components.keys):
            if self.components.layouts[i] == "empty":
                continue  # base's own value, left to the model
            b = base[key]
            merged = self.components.merged(i, b.detach(), lam[:, self.key_group[i]])
            out[key] = merged.to(b.dtype)
        return out

    def task_forward(self, task: str, batch: Any, params: Mapping[str, torch.Tensor], batch_idx: int = 0) -> Any:
        """Run the model on one task's batch with ``params`` plus that task's own head."""
        full = {**params, **self.heads.of(task)}
        if self.objective == "validation_step":
            wrapper = StepCaller(self.model)
            prefixed = {f"inner.{k}": v for k, v in full.items()}
            return functional_call(wrapper, prefixed, (batch, batch_idx))
        args, kwargs, _ = split_batch(batch)
        return functional_call(self.model, full, args, kwargs)

    def task_loss(self, task: str, batch: Any, params: Mapping[str, torch.Tensor], batch_idx: int = 0):
        """``(loss, output, target)`` of one task's batch under the objective."""
        output = self.task_forward(task, batch, params, batch_idx)
        if self.objective == "validation_step":
            loss = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(loss, torch.Tensor):
                raise TypeError("validation_step must return the loss tensor (or a dict with 'loss') for this objective")
            return loss, None, None
        _, _, target = split_batch(batch)
        if self.objective == "entropy":
            return prediction_entropy(logits_of(output)), output, target
        if target is None:
            raise ValueError(
                f"task {task!r}: the batch has no labels but objective={self.objective!r} needs them; "
                "use objective='entropy' for unlabelled data"
            )
        if callable(self.objective):
            return self.objective(output, target), output, target
        return cross_entropy(logits_of(output), target), output, target

    # ---- Lightning hooks -------------------------------------------------------------------
    def train(self, mode: bool = True) -> LearnedMergeModule:
        super().train(mode)
        self.model.eval()  # frozen: no dropout noise, no BatchNorm statistics updates
        return self

    def setup(self, stage: str) -> None:
        refuse_sharded(self.trainer, "LearnedMergeModule")

    def train_dataloader(self) -> dict[str, DataLoader]:
        return self._fit_loaders

    def val_dataloader(self) -> list[DataLoader]:
        return [self._holdout_loaders[t] for t in self.tasks if t in self._holdout_loaders]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.lr)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        params = self.merged_parameters()
        losses = {}
        for task, task_batch in batch.items():
            if task_batch is not None:
                losses[task] = self.task_loss(task, task_batch, params, batch_idx)[0]
        loss = torch.stack(list(losses.values())).mean()
        # one step = one batch per task: epoch means weigh steps equally (batch_size=1)
        for task, value in losses.items():
            self.log(f"learned/train/{task}/loss", value.detach(), on_step=True, on_epoch=True, batch_size=1)
        if self.l2 > 0:
            loss = loss + self.l2 * (self.coefficients - self.initial_coefficients).square().sum()
        self.log("learned/train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=1)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(coefficient_logs(self.coefficients.detach(), self.tasks, self.groups))

    def on_validation_epoch_start(self) -> None:
        for metric in [*self.val_loss, *self.val_acc]:
            metric.reset()  # states left by trainer.validate are inference tensors; fit may not use inference mode
        fixed = self._fixed_params
        self._val_params = fixed if fixed is not None else {k: v.detach() for k, v in self.merged_parameters().items()}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        held = [t for t in self.tasks if t in self._holdout_loaders]
        i = self.tasks.index(held[dataloader_idx])
        loss, output, target = self.task_loss(self.tasks[i], batch, self._val_params or {}, batch_idx)
        n = len(target) if target is not None else 1
        self.val_loss[i].update(loss.detach(), weight=n)
        if target is not None and output is not None:
            logits = logits_of(output)
            # regression targets (float) or outputs that are not per-target logits have no accuracy
            if not target.dtype.is_floating_point and logits.shape[:-1] == target.shape:
                self.val_acc[i].update(logits, target)

    def on_validation_epoch_end(self) -> None:
        self._val_params = None
        record: dict[str, Any] = {"epoch": self.current_epoch, "step": self.global_step, "granularity": self.granularity,
                                  "stage": "fit" if self.trainer.state.fn == "fit" else "init"}
        losses = []
        for i, task in enumerate(self.tasks):
            if task not in self._holdout_loaders:
                continue
            loss = self.val_loss[i].compute()
            losses.append(loss)
            record[f"{task}/loss"] = float(loss)
            if self.val_acc[i].update_count:
                record[f"{task}/acc"] = float(self.val_acc[i].compute())
            self.val_loss[i].reset()
            self.val_acc[i].reset()
        if not losses or self.trainer.sanity_checking:
            return
        score = torch.stack(losses).mean()
        record["loss"] = float(score)
        accs = [v for k, v in record.items() if k.endswith("/acc")]
        if accs:
            record["acc"] = sum(accs) / len(accs)
        self.log_dict({f"learned/val/{k}": v for k, v in record.items() if "/" in k or k in ("loss", "acc")})
        if self._fixed_params is not None:  # another merge scored by holdout_scores: not a candidate
            record["stage"] = "compare"
        self.history.append(record)
        if record["stage"] != "compare" and float(score) < float(self.best_score):
            self.best_score.fill_(float(score))
            self.best_coefficients.copy_(self.coefficients.detach())
            self.best_epoch = self.current_epoch if record["stage"] == "fit" else None

    # ---- where the coefficients start ------------------------------------------------------
    @torch.no_grad()
    def start_from(self, coefficients: torch.Tensor | float) -> None:
        """Set the coefficients (a number, or ``[tasks, groups]``) and make them the start: the
        l2 pull's centre and the first candidate of the hold-out's choice (no best yet)."""
        value = torch.as_tensor(coefficients, dtype=self.coefficients.dtype).to(self.coefficients.device)
        for tensor in (self.coefficients, self.initial_coefficients, self.best_coefficients):
            tensor.copy_(value.expand_as(tensor))
        self.best_score.fill_(math.inf)
        self.best_epoch = None

    def search_start(self, trainer: pl.Trainer) -> SearchResult:
        """Start every coefficient at the scale of the method's lam grid with the lowest hold-out loss.

        Each grid value the coarse-to-fine walk visits is one ``trainer.validate`` pass over the hold-out.
        """
        if not self._holdout_loaders:
            raise ValueError("searching the start scale needs a hold-out: pass holdout= a fraction > 0 or loaders")

        def holdout_losses(lam: float) -> dict[str, float]:
            self.start_from(lam)
            trainer.validate(self, verbose=False)
            return {t: self.history[-1][f"{t}/loss"] for t in self.tasks if t in self._holdout_loaders}

        searched = search_start_scale(holdout_losses, self.method.paper_lam_grid, self.method.name)
        self.start_from(float(searched.lam))
        return searched

    def holdout_scores(self, trainer: pl.Trainer, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The hold-out's loss (and accuracy) of fixed merged weights (another method's merge) as a history
        record: returned, not kept in :attr:`history`, and never the best coefficients."""
        if not self._holdout_loaders:
            raise ValueError("scoring on the hold-out needs one: pass holdout= a fraction > 0 or loaders")
        self._fixed_params = {k: v.detach().to(self.device) for k, v in params.items()}
        try:
            trainer.validate(self, verbose=False)
        finally:
            self._fixed_params = None
        return self.history.pop()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("model.", "components.", "heads."))]:
            del state[key]  # frozen and rebuilt from the sources when the module is constructed
        checkpoint["learned_merge"] = {"tasks": self.tasks, "groups": self.groups, "history": self.history,
                                       "best_epoch": self.best_epoch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("learned_merge")
        if saved is None or "coefficients" not in checkpoint.get("state_dict", {}):
            raise ValueError("checkpoint has no learned merging coefficients: it was not saved by LearnedMergeModule")
        if saved["tasks"] != self.tasks or saved["groups"] != self.groups:
            raise ValueError(
                f"checkpoint coefficients are for tasks {saved['tasks']} x {len(saved['groups'])} groups, this "
                f"module has tasks {self.tasks} x {len(self.groups)} groups: build it with the same tasks and granularity"
            )
        self.history = list(saved["history"])
        self.best_epoch = saved["best_epoch"]

    # ---- results ---------------------------------------------------------------------------
    def final_coefficients(self) -> torch.Tensor:
        """The best hold-out coefficients when a hold-out was evaluated, else the current ones."""
        return self.best_coefficients if math.isfinite(float(self.best_score)) else self.coefficients.detach()

    @torch.no_grad()
    def merged_state_dict(self, task: str | None = None, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The merged model's state dict (model's keys and dtypes); with ``task``, that task's head (without, head keys
        hold the model's base values; use ``task=`` for a model that runs a task, :meth:`head_state_dict` for heads)."""
        if task is not None and task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; the tasks are {self.tasks}")
        lam = self.final_coefficients() if coefficients is None else coefficients
        merged = self.merged_parameters(lam)
        out = {k: merged[k].detach().clone() if k in merged else v.detach().clone()
               for k, v in self.model.state_dict().items()}
        for key, first in module_ties(self.model).items():  # a tied weight merged under one name: both get it
            value = out[key if key in merged else first]
            out[first], out[key] = value, value.clone()  # each name its own tensor, as a state dict holds them
        if task is not None:
            out.update({k: v.clone() for k, v in self.heads.of(task).items()})
        return out

    def head_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.heads.of(task).items()}

    def coefficient_table(self, coefficients: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
        """task -> group -> coefficient."""
        lam = self.final_coefficients() if coefficients is None else coefficients
        return {t: {g: float(lam[i, j]) for j, g in enumerate(self.groups)} for i, t in enumerate(self.tasks)}

    def report(self) -> MergeReport:
        """A :class:`MergeReport` of the learned merge (coefficients in ``params``)."""
        params = {**self.merge_params, "base_method": self.method.name, "granularity": self.granularity,
                  "groups": self.groups, "coefficients": self.coefficient_table(),
                  "objective": self.objective if isinstance(self.objective, str) else "custom",
                  "best_epoch": self.best_epoch, "heads": self.head_keys}
        return MergeReport(method="learned", params=params, sources=list(self.tasks),
                           merged_keys=list(self.plan.merge_keys), skipped=dict(self.plan.skipped),
                           thresholds=self.thresholds, lam=None)


def _head_keys(plan: Any, model: nn.Module, base_src: Any, sources: list[Any], named: list[str]) -> list[str]:
    """User-named heads plus keys that differ across tasks (model order); each task must have them all."""
    model_keys = list(model.state_dict().keys())
    held = held_names(base_src.keys(), module_ties(model))  # a tied key is held under either name
    differ = set(differing_keys(plan, model_keys, base_keys=held))
    out = [k for k in model_keys if k in differ or k in set(named)]
    require_heads(out, sources)
    not_in_model = [k for k in plan.merge_keys if k not in set(model_keys)]
    if not_in_model:
        raise ValueError(f"merged key(s) {not_in_model[:5]} are not in the model; pass the matching architecture")
    return out


@torch.no_grad()
def _write_base_into(model: nn.Module, src: Any) -> None:
    """Copy base's values into ``model``'s matching entries in place (one copy of the base)."""
    targets = model.state_dict(keep_vars=True)
    for key in src.keys():
        if key in targets and tuple(targets[key].shape) == tuple(src.spec(key).shape):
            targets[key].data.copy_(src.get(key))

__all__ = ["LearnedMergeModule"]
