"""Learned merging coefficients (AdaMerging-style) on top of TIES, trained by a plain ``Trainer``.

The package's parts: :mod:`.groups` (which parameters share a coefficient), :mod:`.components`
(each task's share of the merge, stored compactly), :mod:`.objectives` (losses and the batch
convention), :mod:`.data` (the hold-out), :mod:`.module` (:class:`LearnedMergeModule`),
:mod:`.result` (:class:`LearnedMergeResult`, saving, model card, plot) and :mod:`.learn` (the one call).

The merged model is ``theta = theta_base + sum_t lam[t, g] * delta_t``: ``delta_t`` is task t's
share of the TIES disjoint merge (so that ``sum_t delta_t = tau_m``), or its plain task vector
(``method="task_arithmetic"``), computed once by the engine and stored compactly; ``lam[t, g]``
has one entry per task and per group of parameters (``granularity``: ``"task"``, ``"layer"``,
``"tensor"``) and starts where the chosen merge is (``lam=1`` over TIES components is exactly
``ties_merge(k, lam=1)``). The coefficients are the only trainable parameters of
:class:`LearnedMergeModule`; the model runs through ``torch.func.functional_call`` with the
merged tensors and each task's own head. Objectives: cross-entropy on labelled validation
batches (``"ce"``), the user's ``LightningModule.validation_step`` loss (``"validation_step"``),
or AdaMerging's entropy on unlabelled inputs (``"entropy"``), plus an optional L2 pull towards
the start. Part of the data is held out (stratified by class when the labels are at hand,
:func:`~lightning_ties.core.learned.data.holdout_indices`) to pick the final coefficients (and for
early stopping).

Where to start and how finely (:mod:`lightning_ties.core.learned.start`): where a search put
the merge (``lam=search_result``, or ``lam="search"`` to walk the method's lam grid on the
hold-out), optionally pulled toward that start (``l2=``), per layer or per tensor as the hold-out
prefers (``granularity="auto"``: per layer first, then per tensor from the per-layer result; on
the MiniLM benchmark per tensor without l2 measured best)::

    searched = module.search(trainer, val_loaders, method="tsv", lam="paper")  # or any SearchResult
    result = learn_coefficients(base, tasks, val_loaders, method="tsv", lam=searched,
                                granularity="auto", max_time_s=300)
    result.report.params["granularity"], result.report.params["granularity_candidates"]

One call (what the CLI's ``method=learned`` and the demo use)::

    from lightning_ties import learn_coefficients

    result = learn_coefficients(
        base=pretrained_model,                    # nn.Module (also the architecture), state dict or path
        tasks={"a": "runs/a.ckpt", "b": model_b},  # fine-tuned models from that base
        dataloaders={"a": val_a, "b": val_b},      # labelled (or unlabelled for "entropy") batches
        heads=None,                                # auto: keys that differ across tasks; or regexes
        k=0.2, granularity="layer", objective="ce", max_epochs=10,
    )
    result.state_dict            # merged weights (base's keys); result.task_state_dict("a") adds a's head
    result.coefficients          # [tasks, groups] tensor; result.coefficient_table() as nested dict
    result.history               # hold-out loss/accuracy per validation epoch

See :mod:`.objectives` for the batches and outputs it reads.
"""

from ...core.learned.components import TaskComponents
from ...core.learned.data import split_holdout
from ...core.learned.groups import GRANULARITIES, check_granularity, default_group, group_keys
from .learn import learn_coefficients
from .module import LearnedMergeModule
from ...core.learned.objectives import OBJECTIVES, LossObjective, cross_entropy, logits_of, prediction_entropy, split_batch
from ...core.learned.result import LearnedMergeResult, model_card, plot_coefficients

__all__ = [
    "GRANULARITIES",
    "OBJECTIVES",
    "LearnedMergeModule",
    "LearnedMergeResult",
    "LossObjective",
    "TaskComponents",
    "check_granularity",
    "cross_entropy",
    "default_group",
    "group_keys",
    "learn_coefficients",
    "logits_of",
    "model_card",
    "plot_coefficients",
    "prediction_entropy",
    "split_batch",
    "split_holdout",
]
