"""Continual merging: the on-disk task-vector store, alone and driven by ContinualTiesMerging over three fits."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import Recorder, pretrained, quiet_trainer, task_data

from lightning_ties import ContinualTiesMerging, TiesMerging, ties_merge
from lightning_ties.io.task_store import TaskVectorStore


def test_a_trimmed_vector_is_stored_sparsely_and_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(100, 50, generator=g), "b": torch.randn(50, generator=g)}
    ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    store = TaskVectorStore(tmp_path, k=0.1)
    store.save_base(base)
    counts = store.add("a", ft)
    assert counts == {"numel": 5050, "stored": 505, "bytes": counts["bytes"]}
    dense_bytes = 5050 * 4
    assert counts["bytes"] < 0.25 * dense_bytes  # 10% kept, index + value each
    tau = store.task_vector("a")
    expected = ties_merge(base, [ft], k=0.1, lam=1.0)  # one task: base + its trimmed vector
    for key in base:
        torch.testing.assert_close(base[key] + tau[key], expected[key])


def test_store_errors_name_the_problem(tmp_path):
    store = TaskVectorStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_base"):
        store.add("a", {"w": torch.ones(2)})
    store.save_base({"w": torch.zeros(2)})
    store.add("a", {"w": torch.ones(2)})
    with pytest.raises(FileExistsError, match="already in the store"):
        store.add("a", {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="task name 'a/b'"):
        store.add("a/b", {"w": torch.ones(2)})
    with pytest.raises(KeyError, match="'zzz' is not in the store"):
        store.source("zzz")
    assert store.names() == ["a"]


@pytest.mark.parametrize("merge_k", [0.2, 0.1])
def test_merging_stored_tasks_equals_ties_merge_of_the_fine_tuned_models(tmp_path, merge_k):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(40, 30, generator=g), "v": torch.randn(30, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    store = TaskVectorStore(tmp_path, k=0.2)
    store.save_base(base)
    for i, ft in enumerate(fts):
        store.add(f"t{i}", ft)
    merged = store.merge("ties", lam=1.3, k=merge_k)
    oracle = ties_merge(base, fts, k=merge_k, lam=1.3)
    for key in base:
        torch.testing.assert_close(merged[key], oracle[key], atol=1e-6, rtol=1e-6)


def test_three_fits_with_the_callback_equal_ties_merge_of_the_three_fine_tuned_models(tmp_path):
    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    finetuned = []
    for i, name in enumerate(["t1", "t2", "t3"]):
        merging = ContinualTiesMerging(task=name, store=str(tmp_path / "store"), k=0.2, lam=1.0)
        model = pretrained()  # each fit starts from the pretrained base
        trainer = quiet_trainer(max_epochs=1, callbacks=[merging])
        recorder = Recorder()
        trainer.callbacks.insert(0, recorder)
        trainer.fit(model, task_data(10 + i))
        finetuned.append(recorder.state)
        assert TaskVectorStore(tmp_path / "store").names() == ["t1", "t2", "t3"][: i + 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = ties_merge(base, finetuned, k=0.2, lam=1.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, oracle[key], atol=1e-6, rtol=1e-6, msg=key)


def test_start_from_merged_begins_the_next_fit_at_the_merge_so_far(tmp_path):
    store_dir = str(tmp_path / "store")
    first = ContinualTiesMerging(task="t1", store=store_dir, lam=1.3)
    quiet_trainer(max_epochs=1, callbacks=[first]).fit(pretrained(), task_data(10))
    assert TaskVectorStore(store_dir).choice == {"k": 0.2, "lam": 1.3}
    merged_so_far = TaskVectorStore(store_dir).merge("ties", lam=1.3, k=0.2)

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    second = ContinualTiesMerging(task="t2", store=store_dir, start_from="merged")
    at_start = AtStart()
    quiet_trainer(max_epochs=1, callbacks=[second, at_start]).fit(pretrained(), task_data(11))
    for key, value in merged_so_far.items():
        torch.testing.assert_close(at_start.state[key], value, msg=key)


def test_tiesmerging_refuses_a_store_the_continual_class_takes_it(tmp_path):
    # the 0.1 alias (TiesMerging(store=...) building ContinualTiesMerging) is gone: one class per behaviour
    with pytest.raises(TypeError, match="store"):
        TiesMerging(task="t1", store=str(tmp_path / "store"), k=0.2, lam=1.0)
    merging = ContinualTiesMerging(task="t1", store=str(tmp_path / "store"), k=0.2, lam=1.0, start_from="merged")
    quiet_trainer(max_epochs=1, callbacks=[merging]).fit(pretrained(), task_data(10))
    assert TaskVectorStore(str(tmp_path / "store")).names() == ["t1"]


def test_both_classes_show_their_real_signature():
    import inspect

    ties = inspect.signature(TiesMerging)
    continual = inspect.signature(ContinualTiesMerging)
    assert list(ties.parameters)[:6] == ["tasks", "task", "base", "method", "k", "lam"]
    assert "search_strategy" in ties.parameters and "strategy" not in ties.parameters
    assert list(continual.parameters)[:4] == ["tasks", "task", "store", "start_from"]
    assert set(ties.parameters) < set(continual.parameters)  # every TiesMerging argument, by name
    assert continual.parameters["lam"].default == 1.0 and continual.parameters["store"].default is inspect.Parameter.empty


def test_each_class_has_one_behaviour_tiesmerging_has_no_store_arguments_and_needs_tasks(tmp_path):
    import inspect

    assert not {"store", "start_from"} & set(inspect.signature(TiesMerging.__init__).parameters)
    with pytest.raises(ValueError, match="nothing to merge with"):
        TiesMerging(task="b")
    with pytest.raises(TypeError, match="store"):
        ContinualTiesMerging(task="b")  # the store is what it is for
    with pytest.raises(ValueError, match="start_from"):
        ContinualTiesMerging(task="b", store=str(tmp_path), start_from="middle")
    state = ContinualTiesMerging(task="b", store=str(tmp_path)).state_dict()
    assert state["base"] is None  # the base lives in the store, not in every checkpoint


def test_a_store_without_trim_merges_its_tasks_with_tsv_as_the_registry_does(tmp_path):
    # a method without k (TSV-M) keeps dense task vectors in the store; merging them equals
    # merging the fine-tuned models themselves
    from lightning_ties import merge

    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(12, 9, generator=g), "v": torch.randn(9, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    store = TaskVectorStore(tmp_path, k=None)
    store.save_base(base)
    for i, ft in enumerate(fts):
        store.add(f"t{i}", ft)
    merged = store.merge("tsv", lam=1.0)
    oracle = merge(base, fts, method="tsv", lam=1.0)
    for key in base:
        torch.testing.assert_close(merged[key], oracle[key], atol=1e-5, rtol=1e-5)


def test_continual_merging_with_tsv_equals_tsv_of_the_fine_tuned_models(tmp_path):
    from lightning_ties import merge

    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    finetuned = []
    for i, name in enumerate(["t1", "t2"]):
        merging = ContinualTiesMerging(task=name, store=str(tmp_path / "store"), method="tsv", lam=1.0)
        model = pretrained()
        recorder = Recorder()
        quiet_trainer(max_epochs=1, callbacks=[recorder, merging]).fit(model, task_data(10 + i))
        finetuned.append(recorder.state)
    oracle = merge(base, finetuned, method="tsv", lam=1.0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, oracle[key], atol=1e-5, rtol=1e-5, msg=key)


def test_rank_0_lays_out_a_sharded_store_and_every_ddp_rank_stops_when_it_cannot(tmp_path):
    # given a store marked as written by 2 ranks whose rank folders are gone
    from lightning_ties.io import CheckpointError

    store = TaskVectorStore(tmp_path, k=0.2)
    store.update_index(sharded={"world_size": 2, "shapes": {"w": [2]}})
    said = []

    class Strategy:  # DDP's broadcast: rank 0's object reaches every rank
        def __init__(self, rank0_says=None):
            self.rank0_says = rank0_says

        def broadcast(self, obj):
            said.append(obj)
            return obj if self.rank0_says is None else self.rank0_says

    class Rank0:
        is_global_zero, strategy = True, Strategy()

    class Rank1:
        is_global_zero, strategy = False, Strategy(rank0_says=(None, "CheckpointError: rank-0-of-2 is missing"))

    merging = ContinualTiesMerging(task="c", store=str(tmp_path))
    # then rank 0 raises what went wrong after telling the others, and the others raise what rank 0 said
    with pytest.raises(CheckpointError, match=r"written by 2 ranks but \['rank-0-of-2', 'rank-1-of-2'\] is missing"):
        merging._gather_sharded_store(Rank0())
    assert said[0][1].startswith("CheckpointError: ") and "rank-1-of-2" in said[0][1]
    with pytest.raises(CheckpointError, match="laying the task store out for this fit: global rank 0 failed: CheckpointError: rank-0"):
        merging._gather_sharded_store(Rank1())
    assert said[1] == (None, None)  # rank 1 had nothing to say
