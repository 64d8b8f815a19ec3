"""The reliability pieces wired into the Lightning layer: each refusal comes before any training step.

Given a user's file in ``save_dir``, a task file changed between a crash and its resume, a mostly
foreign task checkpoint, a misspelled metric task, a nesting bomb as progress file, or a CUDA
device on a machine without one, then the callback refuses and says what to do; its
``merged.ckpt`` is written through the atomic writer (recorded in the manifest, no optimizer state).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import fine_tune, pretrained, quiet_trainer, task_data
from safetensors.torch import save_file

from lightning_ties import TiesMerging
from lightning_ties.core.keys import KeyMatchError, match_to_module
from lightning_ties.core.resume import read_progress
from lightning_ties.io.errors import UnsafeOutputError
from lightning_ties.io.jsonsafe import JSONNestingError
from lightning_ties.io.ownership import read_manifest
from lightning_ties.io.provenance import StaleResultError


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    folder = tmp_path_factory.mktemp("tasks")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = str(folder / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in fine_tune(base, seed=seed).items()}, paths[name])
    return paths


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_start(self, *args) -> None:
        self.count += 1


def fit(callbacks, root, ckpt_path=None):
    model = pretrained()
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, enable_checkpointing=True, default_root_dir=root)
    trainer.fit(model, task_data(3), task_data(3), ckpt_path=ckpt_path)
    return model


def test_a_users_file_in_save_dir_refuses_the_fit_at_setup(tmp_path, task_files):
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    (save_dir / "search.json").write_text("my own notes")
    steps = CountSteps()
    with pytest.raises(FileExistsError, match="search.json"):
        fit([TiesMerging(tasks=task_files, task="c", save_dir=str(save_dir)), steps], tmp_path)
    assert (save_dir / "search.json").read_text() == "my own notes"
    assert steps.count == 0  # refused before any step


@pytest.mark.parametrize("apply, name", [("keep", "merged.safetensors"), ("merged", "merged.ckpt")])
def test_an_earlier_runs_merge_in_save_dir_merged_again_is_never_written_over(tmp_path, task_files, apply, name):
    # the first run's merge is ours and unchanged, so the ownership rule alone would let the second replace it:
    # but the second reads it as a task, and writing its own merge there would destroy one of its inputs
    save_dir = tmp_path / "out"
    fit([TiesMerging(tasks=task_files, task="c", save_dir=str(save_dir), apply=apply)], tmp_path)
    earlier = (save_dir / name).read_bytes()
    tasks = {**task_files, "earlier": str(save_dir / name)}
    steps = CountSteps()
    with pytest.raises(UnsafeOutputError, match=rf"save_dir=.*writes {name} there.*is the input"):
        fit([TiesMerging(tasks=tasks, task="d", save_dir=str(save_dir), apply=apply), steps], tmp_path)
    assert (save_dir / name).read_bytes() == earlier and steps.count == 0
    # a task given as a folder (a Hugging Face folder, a DCP checkpoint) that holds save_dir: refused too
    with pytest.raises(UnsafeOutputError, match=r"writes search.json there.*lies inside the input folder"):
        fit([TiesMerging(tasks={**task_files, "all": str(tmp_path)}, task="d", save_dir=str(save_dir))], tmp_path)


def test_merged_ckpt_enters_the_manifest_and_a_rerun_may_replace_it(tmp_path, task_files):
    save_dir = tmp_path / "out"
    fit([TiesMerging(tasks=task_files, task="c", save_dir=str(save_dir))], tmp_path)
    assert "merged.ckpt" in read_manifest(save_dir)
    checkpoint = torch.load(save_dir / "merged.ckpt", weights_only=True)
    assert "optimizer_states" not in checkpoint  # a merged model: weights and hyper-parameters
    fit([TiesMerging(tasks=task_files, task="c", save_dir=str(save_dir))], tmp_path)  # ours: replaced


def test_a_task_file_changed_before_resume_refuses_the_resume(tmp_path, task_files):
    tasks = {"a": str(tmp_path / "a.safetensors"), "b": task_files["b"]}
    Path(tasks["a"]).write_bytes(Path(task_files["a"]).read_bytes())
    make = lambda: TiesMerging(tasks=tasks, task="c", k=[0.1, 0.3], lam=[0.5, 1.0],
                               val_dataloaders={"a": task_data(1), "b": task_data(2)})
    model = pretrained()
    trainer = quiet_trainer(max_epochs=1, callbacks=[make()], default_root_dir=tmp_path)
    trainer.fit(model, task_data(3), task_data(3))
    ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(ckpt)
    fit([make()], tmp_path / "same", ckpt_path=ckpt)  # unchanged: resumes
    weights = {k: v.contiguous() * 1.01 for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    save_file(weights, tasks["a"])
    with pytest.raises(StaleResultError, match="task:a"):
        fit([make()], tmp_path / "changed", ckpt_path=ckpt)


def test_a_mostly_foreign_checkpoint_is_refused_by_key_matching():
    module_keys = {f"model.layer{i}.weight": torch.zeros(2) for i in range(10)}
    # one key of the module's ten lands: the mapping covers half of the source's stripped keys but not the module
    foreign = {"layer0.weight": torch.zeros(2), "layer1.weight": torch.zeros(2), "x.bias": torch.zeros(2)}
    with pytest.raises(KeyMatchError, match="only 2 of the module's 10 float keys"):
        match_to_module(foreign, module_keys, label="task a")
    whole = {f"layer{i}.weight": torch.zeros(2) for i in range(10)}
    assert len(match_to_module(whole, module_keys, label="task a").keys()) == 10


def test_progress_files_are_read_with_bounded_nesting_and_written_atomically(tmp_path):
    (tmp_path / "search_progress.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(JSONNestingError, match="search_progress.json"):
        read_progress(tmp_path)


def test_a_metrics_dict_naming_an_unknown_task_fails_at_construction(task_files):
    with pytest.raises(ValueError, match=r"\['typo'\].*\['a', 'b', 'c'\]"):
        TiesMerging(tasks=task_files, task="c", metrics={"typo": None})


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [("ties", {"sigm": "mass"}, r"method_params \['sigm'\]: no method of \['ties'\] has them"),
     ("ties", {"sign": "mas"}, "unknown sign 'mas'"),
     (["tsv", "ties"], {"sigm": "count"}, r"no method of \['tsv', 'ties'\] has them.*ties \['k', 'merge'"),
     (["tsv", "ties"], {"sign": "mas"}, "unknown sign 'mas'")],
)
def test_a_misspelled_method_params_key_or_value_fails_at_construction(task_files, method, params, message):
    with pytest.raises(ValueError, match=message):  # before: at fit end, after every training step
        TiesMerging(tasks=task_files, task="c", method=method, method_params=params)


def test_method_params_k_and_scope_reach_the_sharded_merge_as_merge_options_fields(task_files):
    from lightning_ties.pytorch_lightning.sharded import ShardedMerging

    merging = TiesMerging(tasks=task_files, task="c", method=["tsv", "ties"], method_params={"scope": "per_tensor", "k": 0.3})
    sharded = ShardedMerging(merging)
    sharded.heads = []
    options = sharded._options("ties", None, 1.0)
    assert (options.scope, options.k) == ("per_tensor", 0.3) and sharded._options("ties", 0.2, 1.0).k == 0.2
    assert sharded._options("tsv", None, 1.0).params == {}


def test_method_params_reach_the_methods_that_have_them_in_any_order_of_the_list(task_files, tmp_path):
    # before: the first method got every parameter, so ["tsv", "ties"] with sign="count" failed after training
    results = {}
    for methods in (["ties", "tsv"], ["tsv", "ties"]):
        merging = TiesMerging(tasks=task_files, task="c", method=methods, k=0.2, lam=[0.5, 1.0],
                              method_params={"sign": "count"}, val_dataloaders={"a": task_data(1), "b": task_data(2)})
        model = fit([merging], tmp_path)
        by_candidate = {(c.method, c.k, c.lam): c.objective for c in merging.result.candidates}
        results[tuple(methods)] = (by_candidate, {k: v.clone() for k, v in model.state_dict().items()})
    (first, weights), (second, again) = results.values()
    assert first == second and len(first) == 4
    assert all(torch.equal(weights[k], again[k]) for k in weights)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_devices_without_cuda_fail_clearly(task_files):
    with pytest.raises(ValueError, match="base_device='cuda:0'.*0 CUDA"):
        TiesMerging(tasks=task_files, task="c", base_device="cuda:0")
    from lightning_ties.merging.reading import resolve_device
    with pytest.raises(ValueError, match="device='cuda'"):
        resolve_device("cuda", None)


def test_a_grid_of_more_than_10000_candidates_is_refused_unless_confirmed(task_files):
    lams = [round(0.001 * i, 3) for i in range(1, 5001)]
    with pytest.raises(ValueError, match="15000 candidates, more than max_candidates=10000.*max_candidates=15000 to confirm"):
        TiesMerging(tasks=task_files, task="c", k=[0.1, 0.2, 0.3], lam=lams)
    assert len(TiesMerging(tasks=task_files, task="c", k=[0.1, 0.2, 0.3], lam=lams, max_candidates=15000).lams) == 5000


def test_module_search_refuses_a_huge_grid_before_scoring(tiny):
    from lightning_ties.pytorch import MultiTaskMergeModule

    model, base, tasks = tiny
    module = MultiTaskMergeModule(base, tasks, model=model)
    with pytest.raises(ValueError, match="max_candidates"):
        module.search(None, {}, k=[0.1, 0.2], lam=[round(0.001 * i, 3) for i in range(1, 6001)])
