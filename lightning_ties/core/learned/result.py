"""What a learned merge returns (:class:`LearnedMergeResult`), saving it, its model card and its plot."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from huggingface_hub import ModelCard

from ...io import build_model_card, save_hf_folder, save_lightning_checkpoint, save_safetensors
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
                "train_seconds": self.train_seconds, "report": self.report.to_dict()}

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
        folder (``config_from``'s config and tokenizer files copied) with ``README.md``
        (model card with the coefficient table) and ``learned_merge.json``.
        """
        state = self.task_state_dict(task) if task is not None else self.state_dict
        summary = {**self.to_dict(), "head_of": task}
        path = Path(path)
        if path.suffix == ".safetensors":
            return save_safetensors(state, path, {"lightning_ties.learned": json.dumps(summary)}, overwrite=overwrite)
        if path.suffix == ".ckpt":
            return save_lightning_checkpoint(state, path, {"learned_merge": summary}, overwrite=overwrite)
        return save_hf_folder(state, path, config_from, overwrite=overwrite, card=learned_model_card(summary),
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
        metadata={"learned_tasks": list(summary["tasks"]), "learned_groups": list(groups)},
    )


def model_card(summary: Mapping[str, Any]) -> str:
    """The model card (markdown with its YAML header) of :func:`learned_model_card`."""
    return str(learned_model_card(summary))


__all__ = ["LearnedMergeResult", "learned_model_card", "model_card", "plot_coefficients"]
