"""MultiTaskMergeModule through a real Trainer: known-answer searches, normalized scores, heads, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import (
    Classifier,
    CountValidations,
    LinearRegressor,
    fine_tune,
    pretrained,
    quiet_trainer,
    regression_data,
    task_data,
)
from torchmetrics import MeanSquaredError

from lightning_ties import MultiTaskMergeModule, TiesMerging, ties_merge
from lightning_ties.core.metrics import ArgmaxAccuracy


def regression_setup():
    """Base w = 0; both tasks w = [1, 0.1]: with k=0.5 the trim keeps [1, 0], so the merged output is lam."""
    base = LinearRegressor()
    tau = {"w.weight": torch.tensor([[1.0, 0.1]])}
    tasks = {"a": dict(tau), "b": dict(tau)}
    loaders = {"a": regression_data(1.3), "b": regression_data(1.3)}
    return base, tasks, loaders


def test_search_picks_the_known_best_k_and_lam():
    base, tasks, loaders = regression_setup()
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=0.5)
    counter = CountValidations()
    result = module.search(quiet_trainer(callbacks=[counter]), loaders, k=[0.5, 1.0], lam="paper", mode="min")
    assert (result.k, result.lam) == (0.5, 1.3)
    assert result.best.scores == {"a": {"MeanSquaredError": 0.0}, "b": {"MeanSquaredError": 0.0}}
    # k=1 keeps 0.1 too: output 1.1 * lam, best lam 1.2 -> (1.32 - 1.3)^2
    assert result.find(1.0, 1.2).scores["a"]["MeanSquaredError"] == pytest.approx(0.02**2, abs=1e-6)
    assert counter.count == 2 + 2 * 18  # one reference pass per task, then every candidate
    assert torch.allclose(base.w.weight, torch.tensor([[1.3, 0.0]]))  # the best merge is left applied


def test_normalized_score_divides_by_each_fine_tuned_score():
    base, tasks, loaders = regression_setup()
    tasks["b"] = {"w.weight": torch.tensor([[2.0, 0.0]])}  # fine-tuned b outputs 2.0: MSE 0.49
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=1.0)
    result = module.search(quiet_trainer(), loaders, lam=[1.0], mode="min")
    ref = result.reference
    assert ref["a"]["MeanSquaredError"] == pytest.approx(0.2**2)  # 1.1 vs 1.3
    assert ref["b"]["MeanSquaredError"] == pytest.approx(0.7**2)
    # k=1, same signs: tau_m = disjoint mean = [1.5, 0.1] -> output 1.6 -> MSE 0.09 on both tasks
    row = result.rows()[0]
    assert row["a/MeanSquaredError"] == pytest.approx(0.09)
    assert row["a/normalized_MeanSquaredError"] == pytest.approx(0.09 / 0.04, rel=1e-5)
    assert row["b/normalized_MeanSquaredError"] == pytest.approx(0.09 / 0.49, rel=1e-5)


def test_evaluate_logs_per_task_mean_and_normalized_names():
    base, tasks, loaders = regression_setup()
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=0.5)
    trainer = quiet_trainer()
    scores = module.evaluate(trainer, loaders, k=0.5, lam=1.0, normalize=True)
    assert scores["a"]["MeanSquaredError"] == pytest.approx(0.09)
    logged = trainer.callback_metrics
    for name in ("merge/a/MeanSquaredError", "merge/mean/MeanSquaredError", "merge/b/normalized_MeanSquaredError",
                 "merge/mean/normalized_MeanSquaredError", "merge/lam", "merge/k"):
        assert name in logged, name
    assert float(logged["merge/lam"]) == 1.0


def test_lam_is_applied_in_place_without_new_modules_or_recomputing_tau():
    base, tasks, loaders = regression_setup()
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=0.5)
    weight = base.w.weight
    calls = []
    original = module.merger.task_vector  # the merge core computes tau_m for the module

    def counting(k=None):
        tau = original(k)
        calls.append(id(tau))
        return tau

    module.merger.task_vector = counting
    module.search(quiet_trainer(), loaders, k=0.5, lam=[0.5, 1.0, 1.5], mode="min", normalize=False)
    assert base.w.weight is weight  # same parameter object, written in place
    assert len(set(calls)) == 1  # one tau_m for the whole lam sweep


def test_each_task_is_scored_with_its_own_head():
    base_model = pretrained(classes=3)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    tasks = {"a": fine_tune(base, seed=1, classes=3), "b": fine_tune(base, seed=2, classes=5)}
    module = MultiTaskMergeModule(base_model, tasks, k=0.5)
    assert module.head_keys == ["head.bias", "head.weight"]
    loaders = {"a": task_data(1, classes=3), "b": task_data(2, classes=5)}
    scores = module.evaluate(quiet_trainer(), loaders, k=0.5, lam=1.0)
    assert set(scores) == {"a", "b"} and all(0.0 <= s["acc"] <= 1.0 for s in scores.values())
    # the body is the TIES merge; heads are never averaged
    with pytest.warns(UserWarning, match="differ across models"):
        oracle = ties_merge(base, list(tasks.values()), k=0.5, lam=1.0)
    for key in ("body.0.weight", "body.0.bias"):
        torch.testing.assert_close(base_model.state_dict()[key], oracle[key])
    module.use_task("b")
    assert base_model.head.weight.shape == (5, 16)
    torch.testing.assert_close(base_model.head.weight, tasks["b"]["head.weight"])
    module.use_task("a")
    torch.testing.assert_close(base_model.head.weight, tasks["a"]["head.weight"])


def test_fine_tuned_reference_matches_each_task_alone():
    base_model = pretrained()
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    ft = fine_tune(base, seed=3)
    module = MultiTaskMergeModule(base_model, {"a": ft, "b": base}, k=0.2)
    ref = module.measure_finetuned(quiet_trainer(), {"a": task_data(3)})
    alone = Classifier()
    alone.load_state_dict(ft)
    x, y = task_data(3).dataset.tensors
    assert ref["a"]["acc"] == pytest.approx(float((alone(x).argmax(-1) == y).float().mean()))


def test_metrics_are_one_object_per_task():
    base, tasks, _ = regression_setup()
    shared = ArgmaxAccuracy()
    module = MultiTaskMergeModule(base, tasks, metrics={"a": shared, "b": shared})
    a, b = module.task_metrics.collection("a"), module.task_metrics.collection("b")
    assert a["acc"] is not b["acc"] and a["acc"] is not shared


def test_resume_from_a_checkpoint_mid_search_skips_finished_candidates(tmp_path):
    base, tasks, loaders = regression_setup()
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=0.5)
    trainer = quiet_trainer()

    def stop_after_five(candidate):
        if len(module.search_result.candidates) == 5:
            raise KeyboardInterrupt  # e.g. the job was pre-empted

    with pytest.raises(KeyboardInterrupt):
        module.search(trainer, loaders, lam="paper", mode="min", on_candidate=stop_after_five)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    base2, tasks2, _ = regression_setup()
    resumed = MultiTaskMergeModule(base2, tasks2, metrics=MeanSquaredError(), k=0.5)
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    resumed.on_load_checkpoint(checkpoint)
    counter = CountValidations()
    result = resumed.search(quiet_trainer(callbacks=[counter]), loaders, lam="paper", mode="min")
    assert counter.count == 18 - 5  # references and 5 candidates came from the checkpoint
    assert result.lam == 1.3 and len(result.candidates) == 18


def test_a_different_search_does_not_reuse_old_candidates():
    base, tasks, loaders = regression_setup()
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=0.5)
    module.search(quiet_trainer(), loaders, lam=[1.0], mode="min")
    result = module.search(quiet_trainer(), loaders, lam=[1.0], mode="min", objective="normalized")
    assert result.fingerprint != "" and len(result.candidates) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dataloaders={"a": None, "b": "x", "zzz": "x"}), r"unknown task\(s\) \['zzz'\]"),
        (dict(dataloaders={"a": "x"}), r"task\(s\) \['b'\] have no validation dataloader"),
        (dict(dataloaders=["x", "y"]), "must be a dict task -> dataloader"),
        (dict(dataloaders={"a": "x", "b": "y"}, lam=[]), r"lam=\[\]: the grid is empty"),
        (dict(dataloaders={"a": "x", "b": "y"}, k=[]), r"k=\[\]: the grid is empty"),
    ],
)
def test_bad_search_input_fails_before_any_validation(kwargs, message):
    base, tasks, _ = regression_setup()
    module = MultiTaskMergeModule(base, tasks)
    counter = CountValidations()
    with pytest.raises((ValueError, TypeError), match=message):
        module.search(quiet_trainer(callbacks=[counter]), **kwargs)
    assert counter.count == 0


def test_a_base_with_different_keys_is_refused():
    model = LinearRegressor()
    other_base = {"encoder.w": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="key"):
        MultiTaskMergeModule(other_base, {"a": {"encoder.w": torch.ones(1, 2)}}, model=model)
    with pytest.raises(ValueError, match="pass model="):
        MultiTaskMergeModule({"w.weight": torch.zeros(1, 2)}, {"a": {"w.weight": torch.ones(1, 2)}})
    with pytest.raises(ValueError, match="task names"):
        MultiTaskMergeModule(model, {"mean": {"w.weight": torch.ones(1, 2)}})
    with pytest.raises(ValueError, match=r"heads pattern\(s\) \['classifier'\] match no key"):
        MultiTaskMergeModule(model, {"a": {"w.weight": torch.ones(1, 2)}}, heads="classifier")
    with pytest.raises(ValueError, match=r"\['classifier'\] match no key"):  # every pattern must name a key
        MultiTaskMergeModule(model, {"a": {"w.weight": torch.ones(1, 2)}}, heads=["w", "classifier"])


def test_module_and_callback_are_exported_at_top_level():
    assert MultiTaskMergeModule.__module__ == "lightning_ties.pytorch_lightning.module"
    assert TiesMerging.__module__ == "lightning_ties.pytorch_lightning.callback"


def test_trainer_validate_with_a_dict_routes_by_task_name_and_applies_the_default_merge():
    base, tasks, _ = regression_setup()
    tasks["b"] = {"w.weight": torch.tensor([[3.0, 0.0]])}
    module = MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(), k=1.0, lam=1.0)
    trainer = quiet_trainer()
    # dict order b, a differs from the module's task order a, b
    trainer.validate(module, dataloaders={"b": regression_data(2.0), "a": regression_data(1.0)}, verbose=False)
    # k=1, lam=1: disjoint mean [2, 0.1] (0.1 only from a) -> output 2.1
    assert module.last_scores["b"]["MeanSquaredError"] == pytest.approx(0.1**2, rel=1e-4)
    assert module.last_scores["a"]["MeanSquaredError"] == pytest.approx(1.1**2, rel=1e-4)


def test_heads_may_be_named_by_pattern_or_by_submodule():
    base_model = pretrained(classes=3)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    same_shape = {t: {k: v + 0.1 * (i + 1) for k, v in base.items()} for i, t in enumerate("ab")}
    assert MultiTaskMergeModule(base_model, same_shape).head_keys == []  # nothing differs: all merged
    by_pattern = MultiTaskMergeModule(base_model, same_shape, heads=r"^head\.")
    by_module = MultiTaskMergeModule(base_model, same_shape, heads=base_model.head)
    assert by_pattern.head_keys == by_module.head_keys == ["head.bias", "head.weight"]
    assert "head.weight" not in by_module.task_vector(0.2)
    with pytest.raises(ValueError, match="not a submodule of the model"):
        MultiTaskMergeModule(base_model, same_shape, heads=torch.nn.Linear(2, 2))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_tasks=st.integers(1, 4),
    k=st.sampled_from([0.1, 0.2, 0.5, 1.0]),
    lam=st.floats(0.0, 3.0),
)
def test_apply_merge_writes_exactly_ties_merge_into_the_model(seed, n_tasks, k, lam):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    base = {key: torch.randn(v.shape, generator=g) for key, v in model.state_dict().items()}
    model.load_state_dict(base)
    tasks = {f"t{i}": {key: v + torch.randn(v.shape, generator=g) for key, v in base.items()} for i in range(n_tasks)}
    module = MultiTaskMergeModule(model, tasks, k=k)
    module.apply_merge(k, lam)
    module.apply_merge(k, lam)  # applying twice is idempotent: always base + lam * tau_m
    oracle = ties_merge(base, list(tasks.values()), k=k, lam=lam)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, oracle[key])
