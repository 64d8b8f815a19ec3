"""``method="auto"`` with validation data through the module's search and the callback, under both packages.

Given two tiny tasks, when the search is ``method="auto"``, then every registry method is tried
(RegMean included: the module has the data), the best candidate over all is applied (the model
holds the engine's merge of it), each candidate records its seconds and phase, and a budget given
in seconds is reported; the callback takes ``budget_s`` and searches at fit end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_ties.merging import METHODS, merge

from conftest import base_and_tasks, data, net_class, recorder, tiny_tasks, trainer


def _best(result):
    order = {m: i for i, m in enumerate(result.methods)}
    rows = sorted(result.candidates, key=lambda c: (order[c.method], -1.0 if c.k is None else c.k, c.lam))
    return max(rows, key=lambda c: c.objective)


def _expected(base_state, models, best):
    params = {"k": best.k} if best.k is not None else {}
    return merge(base_state, models, method=best.method, lam=best.lam, **params)


def test_module_auto_search_tries_every_method_and_applies_the_best(lightning_package) -> None:
    pl, layer = lightning_package
    base, base_state, tasks = tiny_tasks()
    module = layer.MultiTaskMergeModule(base, tasks)
    loaders = {"a": data(0), "b": data(1)}

    result = module.search(trainer(pl), loaders, method="auto", budget_s=600, normalize=False)

    assert {c.method for c in result.candidates} == set(METHODS)  # RegMean too: the search has data
    assert all(c.seconds is not None and c.seconds >= 0 and c.phase in ("coarse", "refine") for c in result.candidates)
    best = _best(result)
    assert (result.method, result.k, result.lam) == (best.method, best.k, best.lam) == (module.method, *module.current)
    assert result.budget_s == 600 and not result.budget_cut and f"chose {best.method}" in result.summary
    assert {"seconds", "phase"} <= set(result.to_csv().splitlines()[0].split(","))
    if best.method != "regmean":  # RegMean's merge depends on the data: not the data-free engine's
        expected = _expected(base_state, list(tasks.values()), best)
        for key, value in module.model.state_dict().items():
            torch.testing.assert_close(value, expected[key])


def test_callback_auto_search_at_fit_end_within_a_budget(lightning_package, tmp_path: Path) -> None:
    pl, layer = lightning_package
    base_state, tasks = base_and_tasks(pl)
    model = net_class(pl)()
    model.load_state_dict(base_state)
    # lam lists replace every method's grid (two values): a short search
    merging = layer.TiesMerging(tasks=tasks, task="c", method="auto", lam=[0.5, 1.0], budget_s=600,
                                val_dataloaders={"a": data(0), "b": data(1)}, save_dir=str(tmp_path / "m"))
    finetuned = recorder(pl)
    trainer(pl, max_epochs=1, callbacks=[finetuned, merging]).fit(model, data(2), data(2))

    result = merging.result
    assert result is not None and result.budget_s == 600 and {c.method for c in result.candidates} == set(METHODS)
    best = _best(result)
    assert (result.method, result.k, result.lam) == (best.method, best.k, best.lam)
    if best.method != "regmean":
        expected = _expected(base_state, [tasks["a"], tasks["b"], finetuned.state], best)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key])


def test_auto_search_refuses_a_budget_for_a_named_method(tiny) -> None:
    from lightning_ties.lightning import MultiTaskMergeModule, TiesMerging

    base, _, tasks = tiny
    with pytest.raises(ValueError, match="budget_s=10 limits method='auto' only"):
        MultiTaskMergeModule(base, tasks).search(None, {"a": data(0), "b": data(1)}, method="tsv", budget_s=10)
    with pytest.raises(ValueError, match="budget_s must be a positive number"):
        TiesMerging(tasks={"a": "a.ckpt"}, task="b", method="auto", budget_s=-1)
