"""What a learned merge returns (:class:`LearnedMergeResult`), saving it, its model card and its plot."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from huggingface_hub import ModelCard

from ...io import build_model_card, save_hf_folder, save_lightning_checkpoint, save_safetensors
from ...io.card import source_name
from ...evaluation.plots import plot_coefficients
from ...merging import MergeReport


@dataclass
class LearnedMergeResult:
    """What :func:`learn_coefficients` returns: merged weights, each task's head, coefficients, history."""

    state_dict: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    coefficients: torch.Tensor
    tasks: list[str]
    groups: list[str]
    history: list[dict[str, Any]]
    best_epoch: int | None
    epochs_run: int
    train_seconds: float
    report: MergeReport
    initial_coefficients: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))
    #: the base's Hugging Face folder (its ``config.json``): what :meth:`save` copies into a folder output
    base_folder: str | None = None
    #: the base's name for the card's ``base_model`` (a Hub id, or the folder's name; None: unknown)
    base_model: str | None = None
    #: started from a search whose winner is another method: the hold-out's mean loss (and
    #: accuracy) of ``"learned"`` (these coefficients) and of that winner (with its k and lam)
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: what the hold-out prefers (:func:`~.start.prefer_on_holdout`): ``"learned"``, or the
    #: search winner's method, whose merge (``module.apply_merge``/``merge_to`` at its k and lam) is then the better one
    kept: str = "learned"

    def __repr__(self) -> str:
        """A few lines: method, tasks, coefficients' shape and range, epochs and the best hold-out scores.

        Example:
            >>> from lightning_ties.merging import MergeReport
            >>> r = LearnedMergeResult({}, {}, torch.tensor([[0.5, 1.0], [0.3, 0.2]]), ["a", "b"], ["l0.", "l1."],
            ...     [{"epoch": 0, "loss": 0.41, "acc": 0.9}], 0, 1, 2.0, MergeReport("learned", {"base_method": "ties"}, [], [], {}))
            >>> print(r)
            LearnedMergeResult(learned coefficients over ties)
              tasks: a, b
              coefficients: 2 tasks x 2 groups, from 0.2 to 1 (mean 0.5)
              epochs run: 1, best epoch: 0 (loss=0.41, acc=0.9), 2 s of training
        """
        c = self.coefficients.float()
        shape = f"{len(self.tasks)} tasks x {len(self.groups)} groups"
        spread = f", from {c.min():.3g} to {c.max():.3g} (mean {c.mean():.3g})" if c.numel() else ""
        best = next((h for h in self.history if h.get("epoch") == self.best_epoch), self.history[-1] if self.history else {})
        scores = ", ".join(f"{k}={v:.4g}" for k, v in best.items() if "/" not in k and k != "epoch" and isinstance(v, float))
        tasks = ", ".join(self.tasks[:8]) + (f" and {len(self.tasks) - 8} more" if len(self.tasks) > 8 else "")
        return "\n".join([
            f"{type(self).__name__}(learned coefficients over {self.report.params.get('base_method', self.report.method)})",
            f"  tasks: {tasks}",
            f"  coefficients: {shape}{spread}",
            f"  epochs run: {self.epochs_run}, best epoch: {self.best_epoch}" + (f" ({scores})" if scores else "")
            + f", {self.train_seconds:.0f} s of training",
        ])

    __str__ = __repr__

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The merged weights with ``task``'s own head: a model that runs that task."""
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; the tasks are {self.tasks}")
        return {**self.state_dict, **self.heads[task]}

    def coefficient_table(self) -> dict[str, dict[str, float]]:
        return {t: {g: float(self.coefficients[i, j]) for j, g in enumerate(self.groups)} for i, t in enumerate(self.tasks)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for model cards and the CLI)."""
        return {"tasks": self.tasks, "groups": self.groups, "coefficients": self.coefficient_table(),
                "history": self.history, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run,
                "train_seconds": self.train_seconds, "report": self.report.to_dict(),
                "compared": self.compared, "kept": self.kept}

    def save(
        self,
        path: str | os.PathLike[str],
        task: str | None = None,
        config_from: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the merged model (with ``task``'s head if given) through the io sinks, atomically.

        ``*.safetensors``: one file, the coefficients in its metadata; ``*.ckpt``: a Lightning
        checkpoint, the coefficients in its hyper-parameters; any other path: a Hugging Face
        folder that ``AutoModel.from_pretrained`` loads: the config and tokenizer files of
        ``config_from`` (default: the base's folder, :attr:`base_folder`) copied, ``README.md``
        (model card with ``base_model`` and the coefficient table) and ``learned_merge.json``.
        With no config to copy the folder is still written, with a warning saying how to fix it.
        Missing parent folders are created.
        """
        state = self.task_state_dict(task) if task is not None else self.state_dict
        summary = {**self.to_dict(), "head_of": task}
        path = Path(path)
        if path.suffix == ".safetensors":
            return save_safetensors(state, path, {"lightning_ties.learned": json.dumps(summary)}, overwrite=overwrite)
        if path.suffix == ".ckpt":
            return save_lightning_checkpoint(state, path, {"learned_merge": summary}, overwrite=overwrite)
        config_from = config_from if config_from is not None else self.base_folder
        if config_from is None or not (Path(config_from) / "config.json").is_file():
            warnings.warn(
                f"{path}: no config.json to copy ({'config_from' if config_from else 'the base was not a Hugging Face folder'}"
                f"{f': {config_from}' if config_from else ''}), so AutoModel.from_pretrained cannot load this folder; "
                "pass config_from=<the base model's folder> to save()",
                UserWarning, stacklevel=2,
            )
        card = learned_model_card({**summary, "base_model": self.base_model})
        return save_hf_folder(state, path, config_from, overwrite=overwrite, card=card,
                              extra_files={"learned_merge.json": json.dumps(summary, indent=2)})


def learned_model_card(summary: Mapping[str, Any]) -> ModelCard:
    """The Hub model card of a learned merge (the io layer's one card writer): how the coefficients
    were learned and their table, tasks across, groups along."""
    params = summary["report"]["params"]
    groups = summary["groups"]
    table = ["| task | " + " | ".join(g.rstrip(".") for g in groups) + " |", "|---|" + "---|" * len(groups)]
    for task, row in summary["coefficients"].items():
        table.append(f"| {task} | " + " | ".join(f"{row[g]:.3f}" for g in groups) + " |")
    return build_model_card(
        title=f"Merged model (learned coefficients over {params['base_method']})",
        method=params["base_method"],
        summary=(
            f"Tasks: {', '.join(summary['tasks'])}; granularity {params['granularity']}; objective "
            f"{params['objective']}; best hold-out epoch {summary['best_epoch']}; "
            f"{summary['train_seconds']:.0f} s of coefficient training."
            + (f" Head: task {summary['head_of']!r}." if summary.get("head_of") else "")
        ),
        sections=[("Coefficients", "\n".join(table))],
        tags=["learned-merging-coefficients"],
        metadata={"learned_tasks": list(summary["tasks"]), "learned_groups": list(groups),
                  **({"base_model": summary["base_model"]} if summary.get("base_model") else {})},
    )


def hf_base(base: Any, model: Any = None) -> tuple[str | None, str | None]:
    """``(folder, name)`` of a learned merge's base: its Hugging Face folder (holding ``config.json``)
    and its name for a card's ``base_model`` (a Hub id, or the folder's name).

    A path to a folder is taken as is; a ``transformers`` model (``base``, else ``model``) by its
    ``config.name_or_path`` (a local folder, or a Hub id with no folder). ``(None, None)``: unknown.

    Example:
        >>> hf_base({"w": torch.zeros(1)})
        (None, None)
    """
    for candidate in (base, model):
        if isinstance(candidate, (str, os.PathLike)):
            folder = Path(candidate)
            if (folder / "config.json").is_file():
                return str(folder), source_name(os.path.abspath(folder))
            continue
        name = getattr(getattr(candidate, "config", None), "name_or_path", None)
        if isinstance(name, str) and name:
            if (Path(name) / "config.json").is_file():
                return name, source_name(os.path.abspath(name))
            return None, name
    return None, None


def model_card(summary: Mapping[str, Any]) -> str:
    """The model card (markdown with its YAML header) of :func:`learned_model_card`."""
    return str(learned_model_card(summary))


__all__ = ["LearnedMergeResult", "hf_base", "learned_model_card", "model_card", "plot_coefficients"]
