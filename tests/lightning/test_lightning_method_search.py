"""Choosing the merge method on validation data: the module's search, the callback, under both packages.

Given several registry methods (TIES, task arithmetic, TSV-M), when the search scores each method's
own (k, lam) grid on the validation dataloaders, then every candidate is reported with its method,
the best over all methods is chosen (ties go to the method listed first), and the model ends
holding exactly the engine's merge with the chosen method, k and lam.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from lightning_ties.lightning import MultiTaskMergeModule
from lightning_ties.merging import SUBSPACE_LAM_GRID, TA_LAM_GRID, TIES_LAM_GRID, merge

from conftest import PACKAGES, base_and_tasks, data, net_class, recorder, tiny_tasks, trainer

METHODS = ["ties", "task_arithmetic", "tsv"]





def _expected(base_state, models, method: str, k: float | None, lam: float):
    params = {"k": k} if k is not None else {}
    return merge(base_state, models, method=method, lam=lam, **params)


def _argmax(result):
    """The best candidate recomputed from the rows: highest objective, first in (method, k, lam) order."""
    order = {m: i for i, m in enumerate(result.methods)}
    rows = sorted(result.candidates, key=lambda c: (order[c.method], -1.0 if c.k is None else c.k, c.lam))
    return max(rows, key=lambda c: c.objective)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_module_search_chooses_across_methods_and_applies_the_chosen_merge(package: str) -> None:
    pl = importlib.import_module(package)
    layer = importlib.import_module(PACKAGES[package])
    base, base_state, tasks = tiny_tasks()
    module = layer.MultiTaskMergeModule(base, tasks, method_params={"scope": "per_tensor"})
    loaders = {"a": data(0), "b": data(1)}

    result = module.search(trainer(pl, max_epochs=2), loaders, method=METHODS, k=[0.2, 0.5], lam=[0.5, 1.0, 1.5])

    # every method's candidates are reported: ties over k x lam, the others over lam only
    by_method = {m: [(c.k, c.lam) for c in result.candidates if c.method == m] for m in METHODS}
    assert sorted(by_method["ties"]) == [(k, lam) for k in (0.2, 0.5) for lam in (0.5, 1.0, 1.5)]
    assert sorted(by_method["task_arithmetic"]) == sorted(by_method["tsv"]) == [(None, 0.5), (None, 1.0), (None, 1.5)]
    assert result.methods == METHODS
    best = _argmax(result)
    assert (result.method, result.k, result.lam) == (best.method, best.k, best.lam) == (module.method, *module.current)
    # the module holds the engine's merge with the chosen method (ties keeps its per-tensor scope)
    params = {"scope": "per_tensor", "k": best.k} if best.method == "ties" else {}
    expected = merge(base_state, list(tasks.values()), method=best.method, lam=best.lam, **params)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert "method" in result.to_csv().splitlines()[0] and "tsv" in result.table


def test_a_checkpoint_restores_the_method_its_merge_is_of() -> None:
    # the restored (k, lam) is a merge of the chosen method: read under the module's own method it was another merge
    import copy

    base, _, tasks = tiny_tasks()
    module = MultiTaskMergeModule(base, tasks, model=copy.deepcopy(base))
    result = module.search(None, {"a": data(0), "b": data(1)}, method=["tsv", "task_arithmetic"], lam=[0.3, 1.0])
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored = MultiTaskMergeModule(base, tasks, model=copy.deepcopy(base))
    restored.on_load_checkpoint(checkpoint)
    assert restored.method == result.method != "ties" and restored.current == module.current
    restored.apply_merge(*restored.current)
    for key, value in module.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value), key


def test_lam_paper_gives_each_method_its_own_grid_and_the_fingerprint_names_the_methods() -> None:
    base, _, tasks = tiny_tasks()
    module = MultiTaskMergeModule(base, tasks)
    loaders = {"a": data(0), "b": data(1)}
    seen: list = []
    result = module.search(None, loaders, method=METHODS, lam="paper", normalize=False, on_candidate=seen.append)
    lams = {m: sorted(c.lam for c in result.candidates if c.method == m) for m in METHODS}
    assert lams == {"ties": list(TIES_LAM_GRID), "task_arithmetic": list(TA_LAM_GRID), "tsv": list(SUBSPACE_LAM_GRID)}
    assert len(seen) == len(TIES_LAM_GRID) + len(TA_LAM_GRID) + len(SUBSPACE_LAM_GRID)
    # the same search resumed reuses every candidate; another list of methods starts afresh
    seen.clear()
    module.search(None, loaders, method=METHODS, lam="paper", normalize=False, on_candidate=seen.append)
    assert seen == []
    module.search(None, loaders, method=["tsv", "ties"], lam=1.0, normalize=False, on_candidate=seen.append)
    assert [c.method for c in seen] == ["tsv", "ties"]
    assert module.fingerprint(methods=["ties"]) != module.fingerprint(methods=["ties", "tsv"])


def test_unknown_method_or_k_for_no_method_is_refused_before_any_pass() -> None:
    base, _, tasks = tiny_tasks()
    module = MultiTaskMergeModule(base, tasks)
    loaders = {"a": data(0), "b": data(1)}
    with pytest.raises(ValueError, match="unknown merge method 'tsvm'"):
        module.search(None, loaders, method=["ties", "tsvm"])
    with pytest.raises(ValueError, match=r"have no k to search"):
        module.search(None, loaders, method=["tsv", "task_arithmetic"], k=0.5)
    assert module.search_result is None


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_callback_chooses_the_method_at_fit_end(package: str, tmp_path: Path) -> None:
    pl = importlib.import_module(package)
    layer = importlib.import_module(PACKAGES[package])

    base_state, tasks = base_and_tasks(pl)
    model = net_class(pl)()
    model.load_state_dict(base_state)
    merging = layer.TiesMerging(tasks=tasks, task="c", method=METHODS, k=0.5, lam=[0.5, 1.0],
                                val_dataloaders={"a": data(0), "b": data(1)}, save_dir=str(tmp_path / "m"))
    finetuned = recorder(pl)
    trainer(pl, max_epochs=2, callbacks=[finetuned, merging]).fit(model, data(2), data(2))

    result = merging.result
    assert result is not None and {c.method for c in result.candidates} == set(METHODS)
    assert len(result.candidates) == 2 + 2 + 2
    best = _argmax(result)
    assert (result.method, result.k, result.lam) == (best.method, best.k, best.lam)
    expected = _expected(base_state, [tasks["a"], tasks["b"], finetuned.state], best.method, best.k, best.lam)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert (tmp_path / "m" / "search.csv").read_text().startswith("method,")


def test_callback_validates_every_method_and_keys_its_state_by_them() -> None:
    from lightning_ties.lightning import TiesMerging

    with pytest.raises(ValueError, match="unknown merge method 'tsvm'"):
        TiesMerging(tasks={"a": "a.ckpt"}, task="b", method=["ties", "tsvm"])
    with pytest.raises(ValueError, match="non-empty list"):
        TiesMerging(tasks={"a": "a.ckpt"}, task="b", method=[])
    single = TiesMerging(tasks={"a": "a.ckpt"}, task="b", method="tsv", lam="paper")
    assert single.methods == ["tsv"] and single.lams == list(SUBSPACE_LAM_GRID)
    several = TiesMerging(tasks={"a": "a.ckpt"}, task="b", method=["ties", "tsv"], lam="paper")
    assert several.lam_grids == {"ties": list(TIES_LAM_GRID), "tsv": list(SUBSPACE_LAM_GRID)}
    assert several.searching and "tsv" in several.state_key and several.state_key != single.state_key
    only_ties = TiesMerging(tasks={"a": "a.ckpt"}, task="b", method=["ties"], lam="paper")
    assert only_ties.state_key == TiesMerging(tasks={"a": "a.ckpt"}, task="b", method="ties", lam="paper").state_key


def test_search_config_takes_a_list_of_methods_and_names_an_unknown_one_in_one_line() -> None:
    from lightning_ties.config import ConfigError, SearchConfig, load_config

    base = ["base=b.safetensors", "tasks={a: a.safetensors}", "output_dir=out", "data.target=m:f", "model.target=m:g"]
    cfg = load_config(SearchConfig, overrides=[*base, "search.methods=[ties,tsv,iso_c]", "search.lam=paper"])
    assert list(cfg.search.methods) == ["ties", "tsv", "iso_c"]
    with pytest.raises(ConfigError) as err:
        load_config(SearchConfig, overrides=[*base, "search.methods=[ties,tsvm]"])
    message = str(err.value)
    assert "\n" not in message and "search.methods" in message and "'tsvm'" in message
    with pytest.raises(ConfigError, match="search.lam"):  # every listed method's grid is checked
        load_config(SearchConfig, overrides=[*base, "search.methods=[ties,tsv]", "search.lam=[]"])
