"""``lightning-ties search`` with ``search.method: auto`` and ``search.budget_s``: the config and the command."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from lightning_ties.cli import main
from lightning_ties.config import ConfigError, SearchConfig, load_config
from lightning_ties.merging import METHODS, merge
from lightning_ties.report import RunReport

from test_cli_workflows import HEAD, TASKS, as_dict, checkpoints, search_config  # noqa: F401  (checkpoints: a fixture)

BASE = ["base=b.safetensors", "tasks={a: a.safetensors}", "output_dir=out", "data.target=m:f", "model.target=m:g"]


def test_search_config_accepts_method_auto_and_a_budget_and_names_what_contradicts_them() -> None:
    cfg = load_config(SearchConfig, overrides=[*BASE, "search.method=auto", "search.budget_s=300"])
    assert cfg.search.method == "auto" and cfg.search.budget_s == 300
    for override, words in [
        (["search.method=best"], "search.method='best': only 'auto'"),
        (["search.budget_s=60"], "search.budget_s limits search.method=auto only"),
        (["search.method=auto", "search.budget_s=0"], "search.budget_s=0"),
        (["search.method=auto", "search.methods=[ties,tsv]"], "leave search.methods out"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(SearchConfig, overrides=[*BASE, *override])
        assert words in str(err.value) and "\n" not in str(err.value)


def test_search_auto_tries_every_method_reports_them_and_saves_the_winner(tmp_path, checkpoints) -> None:  # noqa: F811
    cfg = search_config(tmp_path, checkpoints, search={"method": "auto", "budget_s": 600, "lam": [0.5, 1.0]})
    assert main(["search", str(cfg), "--quiet"]) == 0
    out = tmp_path / "search"
    report = RunReport.from_json((out / "report.json").read_text())
    auto = report.extra["auto"]
    assert auto["budget_s"] == 600 and auto["budget_cut"] is False and "chose" in auto["summary"]
    assert {row["method"] for row in auto["candidates"]} == set(METHODS)
    assert all(row["seconds"] >= 0 and row["phase"] in ("coarse", "refine") for row in auto["candidates"])
    row = report.rows[2]
    assert row.name.endswith("(auto)") and row.method in METHODS
    # the saved file is the engine's merge of the winner (RegMean's needs the data), with the tasks in
    # the config's order: DARE's random drops are drawn per task position, so the order matters there
    if not METHODS[row.method].needs_data:
        params = {"k": row.k} if row.k is not None else {}
        order = list(yaml.safe_load(cfg.read_text())["tasks"])
        expected = merge(as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in order], method=row.method,
                         lam=row.lam, exclude=HEAD, **params)
        merged = as_dict(out / "merged.safetensors")
        for key, value in expected.items():
            assert torch.allclose(merged[key], value, atol=1e-6), key


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_search_saves_dares_merge_with_the_tasks_in_the_configs_order(tmp_path, checkpoints, method) -> None:  # noqa: F811
    # DARE's drops are seeded by (seed, task position, key): the command keeps the config's task
    # order, which yaml.safe_dump sorted (ge5 before parity), unlike TASKS
    cfg = search_config(tmp_path, checkpoints, method=method, search={"lam": [1.0]})
    assert main(["search", str(cfg), "--quiet"]) == 0
    order = list(yaml.safe_load(cfg.read_text())["tasks"])
    assert order == sorted(TASKS) != list(TASKS)
    merged = as_dict(tmp_path / "search" / "merged.safetensors")
    expected = merge(as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in order], method=method, lam=1.0, exclude=HEAD)
    assert all(torch.equal(merged[key], value) for key, value in expected.items())
    swapped = merge(as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in reversed(order)], method=method, lam=1.0, exclude=HEAD)
    assert not all(torch.equal(merged[key], value) for key, value in swapped.items())


def test_search_finish_is_checked_by_name_before_any_work() -> None:
    auto = [*BASE, "search.method=auto", "search.budget_s=300"]
    cfg = load_config(SearchConfig, overrides=[*auto, "search.finish={name: learned, share: 0.5, granularity: tensor}"])
    assert cfg.search.finish == {"name": "learned", "share": 0.5, "granularity": "tensor"}
    for override, words in [
        ([*BASE, "search.finish={name: learned}"], "search.finish finishes search.method=auto only"),
        ([*auto, "search.finish={name: ties}"], "search.finish={'name': 'ties'}: expected a mapping with name: learned"),
        ([*auto, "search.finish={name: learned, share: 1.5}"], "search.finish.share=1.5: expected a number between 0 and 1"),
        ([*auto, "search.finish={name: learned, lam: 1.0}"], "search.finish.lam: the search chooses it"),
        ([*auto, "search.finish={name: learned, epochs: 3}"], "search.finish.epochs is not a parameter of method 'learned'"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(SearchConfig, overrides=override)
        assert words in str(err.value) and "\n" not in str(err.value)


def test_search_auto_finished_by_learned_coefficients_keeps_what_the_holdout_prefers(tmp_path, checkpoints) -> None:  # noqa: F811
    finish = {"name": "learned", "granularity": "task", "max_epochs": 2, "lr": 0.01, "holdout": 0.5}
    cfg = search_config(tmp_path, checkpoints, search={"method": "auto", "lam": [0.5, 1.0], "finish": finish})
    assert main(["search", str(cfg), "--quiet"]) == 0
    out = tmp_path / "search"
    report = RunReport.from_json((out / "report.json").read_text())
    done = report.extra["finish"]
    winner = report.rows[2]
    assert winner.name.endswith("(auto)") and report.rows[3].method == "learned"
    learned_on = done["learned"]["report"]["params"]["base_method"]
    assert METHODS[learned_on].decomposes
    assert report.rows[3].name.startswith("learned" if learned_on == "ties" else f"learned on {learned_on} (")
    if winner.method == learned_on:  # nothing else to beat: the learned coefficients start at the winner
        assert done["compared"] == {} and done["kept"] == "learned"
    else:
        assert set(done["compared"]) == {"learned", winner.method} and done["kept"] in done["compared"]
    params = {"k": winner.k} if winner.k is not None else {}
    order = list(yaml.safe_load(cfg.read_text())["tasks"])
    winners = merge(as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in order], method=winner.method,
                    lam=winner.lam, exclude=HEAD, **params)
    merged = as_dict(out / "merged.safetensors")
    body = [key for key in winners if not re.search(HEAD, key)]  # heads: base's in one file, the model's in the other
    same = all(torch.allclose(merged[key], winners[key], atol=1e-6) for key in body)
    # the saved model is the one the hold-out kept; learned coefficients that never beat their start
    # (the winner itself when it has shares) are that start
    start_kept = done["learned"]["best_epoch"] is None and learned_on == winner.method
    assert same == (done["kept"] != "learned" or start_kept)


def test_learned_configs_take_a_searched_start_and_the_granularity_choice_and_name_a_bad_one() -> None:
    cfg = load_config(SearchConfig, overrides=[*BASE, "method={name: learned, lam: search, granularity: auto}"])
    assert cfg.method["lam"] == "search" and cfg.method["granularity"] == "auto"
    finish = load_config(SearchConfig, overrides=[*BASE, "search.method=auto", "search.finish={name: learned, granularity: auto}"])
    assert finish.search.finish["granularity"] == "auto"
    for override, words in [
        ("method={name: learned, granularity: row}", "method.granularity='row': choose one of task, layer, tensor, auto"),
        ("method={name: learned, lam: best}", "method.lam must be a real number"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(SearchConfig, overrides=[*BASE, override])
        assert words in str(err.value)
    with pytest.raises(ConfigError, match="search.finish.granularity='row'"):
        load_config(SearchConfig, overrides=[*BASE, "search.method=auto", "search.finish={name: learned, granularity: row}"])


def test_the_command_learns_from_a_start_it_searched_on_the_holdout(tmp_path, checkpoints) -> None:  # noqa: F811
    method = {"name": "learned", "lam": "search", "granularity": "layer", "max_epochs": 1, "lr": 0.01}
    cfg = search_config(tmp_path, checkpoints, method=method, search={"k": [0.2]})
    assert main(["search", str(cfg), "--quiet"]) == 0
    learned = RunReport.from_json((tmp_path / "search" / "report.json").read_text()).extra["learned"]
    starts = [h for h in learned["history"] if h["stage"] == "init"]
    assert len(starts) > 2  # the start scale was walked on the hold-out before the fit
    assert learned["report"]["params"]["base_method"] == "ties"
