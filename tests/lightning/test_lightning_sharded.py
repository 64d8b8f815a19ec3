"""TiesMerging under sharded Lightning strategies on the CPU (2 gloo processes, launched by Lightning).

Given a fit under ModelParallelStrategy (FSDP2), a user's subclass of it, or FSDPStrategy (FSDP1, a test-only
subclass since Lightning refuses FSDP on the CPU), when TiesMerging merges at fit end on every rank's shards,
then the weights equal the single-process ``ties_merge`` of the same base, tasks and fine-tuned weights bit for
bit, and the DCP checkpoint the Trainer saves afterwards reads back (as a source) as those merged weights.
"""

from __future__ import annotations

import os
import shutil
import types
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ties.io import open_source, save_safetensors
from lightning_ties.merging import ties_merge
from lightning_ties.pytorch_lightning import TiesMerging

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

SCRIPT = Path(__file__).parents[1] / "sharded_fit_script.py"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> Path:
    sys.path.insert(0, str(SCRIPT.parent))
    from sharded_fit_script import make_net

    folder = tmp_path_factory.mktemp("tasks")
    base = {f"model.{k}": v for k, v in make_net().state_dict().items()}
    g = torch.Generator().manual_seed(5)
    for t in ("a", "b", "c"):  # c: where a fit ends in the auto test
        save_safetensors({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                         folder / f"{t}.safetensors")
    return folder


def launch(strategy: str, tasks: Path, out: Path, apply: str = "merged", devices: int = 2,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), strategy, str(devices), str(out), str(tasks), apply],
                          capture_output=True, text=True, timeout=150, env=env, cwd=SCRIPT.parent)


def fit(strategy: str, tasks: Path, out: Path, apply: str = "merged", devices: int = 2,
        env: dict[str, str] | None = None) -> dict:
    proc = launch(strategy, tasks, out, apply, devices, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=True)


def oracle(result: dict, tasks: Path) -> dict:
    """The same merge in one process: base, the task files and this fit's fine-tuned weights."""
    files = [open_source(tasks / f"{t}.safetensors") for t in ("a", "b")]
    return ties_merge(result["base"], [*files, result["finetuned"]], k=0.3, lam=0.8)


def assert_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.parametrize(("strategy", "devices"), [("model_parallel", 2), ("model_parallel", 1), ("fsdp", 2),
                                                   ("fsdp_full", 2)])
def test_fit_end_merge_on_shards_equals_the_single_process_merge(strategy, devices, task_files, tmp_path):
    result = fit(strategy, task_files, tmp_path / "out", devices=devices)
    assert result["world"] == devices
    assert result["layer"] == "lightning_ties.pytorch_lightning.callback"
    assert any(not torch.equal(result["finetuned"][k], result["base"][k]) for k in result["base"])  # it trained
    assert_equal(result["merged"], oracle(result, task_files))
    # the Trainer's checkpoint after fit, and the callback's save_dir/merged.ckpt: DCP folders read whole here
    # (FSDPStrategy with state_dict_type="full": one file each)
    full = strategy == "fsdp_full"
    assert (tmp_path / "out" / "save" / "merged.ckpt").is_file() == full
    for path in (tmp_path / "out" / ("ckpt.ckpt" if full else "ckpt"), tmp_path / "out" / "save" / "merged.ckpt"):
        saved = open_source(path)
        assert_equal({k: saved.get(k) for k in saved.keys()}, result["merged"])


@pytest.mark.parametrize("strategy", ["model_parallel", "fsdp"])
def test_the_unified_lightning_package_merges_on_shards_as_one_process_does(strategy, task_files, tmp_path):
    # given the same fit on ``lightning.pytorch``: the callback comes from the layer the other one is generated from
    result = fit(strategy, task_files, tmp_path / "out", env={"LIGHTNING_TIES_BACKEND": "lightning"})
    assert result["layer"] == "lightning_ties.pytorch.callback"
    assert result["world"] == 2
    assert_equal(result["merged"], oracle(result, task_files))


def test_a_subclass_of_model_parallel_is_sharded_too_and_apply_keep_writes_the_merge(task_files, tmp_path):
    result = fit("my_mp", task_files, tmp_path / "out", apply="keep")
    written = open_source(tmp_path / "out" / "save" / "merged.safetensors")
    assert_equal({k: written.get(k) for k in written.keys()}, oracle(result, task_files))
    assert_equal(result["merged"], result["finetuned"])  # keep: the module holds the fine-tuned weights again


def test_strategies_are_found_by_isinstance_and_deepspeed_is_refused():
    import pytorch_lightning as pl

    from lightning_ties.pytorch_lightning.sharded import DEEPSPEED_REFUSAL, sharding_kind

    class MyFSDP(pl.strategies.FSDPStrategy):
        pass

    class MyDeepSpeed(pl.strategies.DeepSpeedStrategy):
        def __init__(self) -> None:  # deepspeed is not installed: build the object without its checks
            pl.strategies.DDPStrategy.__init__(self)

    assert sharding_kind(MyFSDP()) == "fsdp1"
    assert sharding_kind(pl.strategies.ModelParallelStrategy()) == "fsdp2"
    assert sharding_kind(pl.strategies.DDPStrategy()) is None
    with pytest.raises(RuntimeError, match="does not support DeepSpeedStrategy") as err:
        sharding_kind(MyDeepSpeed())
    assert str(err.value) == DEEPSPEED_REFUSAL and "ModelParallelStrategy" in DEEPSPEED_REFUSAL


def test_a_subclass_of_deepspeed_is_refused_by_both_callbacks_and_the_merge_modules(tmp_path, tiny):
    import pytorch_lightning as pl

    from lightning_ties.lightning import ContinualTiesMerging, MultiTaskMergeModule
    from lightning_ties.pytorch_lightning.sharded import DEEPSPEED_REFUSAL

    class MyDeepSpeed(pl.strategies.DeepSpeedStrategy):  # a user's subclass: found by isinstance, not by name
        def __init__(self) -> None:  # deepspeed is not installed: build the object without its checks
            pl.strategies.DDPStrategy.__init__(self)

    class FakeTrainer:
        strategy = MyDeepSpeed()

    for callback in (TiesMerging(tasks={"a": "a.safetensors"}, task="c"),
                     ContinualTiesMerging(task="c", store=str(tmp_path / "store"))):
        with pytest.raises(RuntimeError) as err:
            callback.setup(FakeTrainer(), None, "fit")
        assert str(err.value) == DEEPSPEED_REFUSAL
    model, base, tasks = tiny
    module = MultiTaskMergeModule(base, tasks, model=model)
    module._trainer = FakeTrainer()
    with pytest.raises(ValueError, match="MultiTaskMergeModule does not support the sharded strategy MyDeepSpeed"):
        module.setup("validate")


#: tasks a, b, c arriving one fit at a time (c starts from the stored merge of a and b)
CONTINUAL_RUNS = [("a", "base"), ("b", "base"), ("c", "merged")]


@pytest.fixture(scope="module")
def continual_single(task_files, tmp_path_factory) -> tuple[Path, dict]:
    """The reference: the same fits in one process, unsharded (its store is ROOT/store)."""
    root = tmp_path_factory.mktemp("continual-single")
    return root, {task: fit("single", task_files, root / task, apply=f"continual:{task}:{start_from}", devices=1)
                  for task, start_from in CONTINUAL_RUNS}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", ["model_parallel", "fsdp"])
def test_continual_merging_on_shards_equals_one_process_task_after_task(strategy, task_files, continual_single,
                                                                        tmp_path):
    from lightning_ties.distributed import gather_store
    from lightning_ties.io.task_store import TaskVectorStore

    _, singles = continual_single
    for task, start_from in CONTINUAL_RUNS:
        sharded = fit(strategy, task_files, tmp_path / task, apply=f"continual:{task}:{start_from}")
        single = singles[task]
        # then each fit starts and ends as one process does, bit for bit
        assert_equal(sharded["started"], single["started"])
        assert_equal(sharded["merged"], single["merged"])
        assert sharded["chosen"][:2] == single["chosen"][:2] == [0.3, 0.8]
    assert any(not torch.equal(sharded["started"][k], sharded["base"][k]) for k in sharded["base"])  # c: from the merge
    # each rank stored its own rows; the store lists every task once
    store = tmp_path / "store"
    assert sorted(p.name for p in store.iterdir() if p.name.startswith("rank-")) == ["rank-0-of-2", "rank-1-of-2"]
    assert TaskVectorStore(store / "rank-1-of-2", k=None).names() == ["a", "b", "c"]
    # put together for one process, the store is file for file the one-process fits' store
    single_root, _ = continual_single
    gather_store(TaskVectorStore(store, k=0.3))
    for name in ("base.safetensors", "tasks/a.safetensors", "tasks/b.safetensors", "tasks/c.safetensors"):
        assert (store / name).read_bytes() == (single_root / "store" / name).read_bytes(), name


@pytest.fixture(scope="module")
def stored_on_2_ranks(task_files, tmp_path_factory) -> Path:
    """A store after tasks a and b, each fit on 2 ranks (the folder ROOT/store)."""
    root = tmp_path_factory.mktemp("continual-2-ranks")
    for task, start_from in CONTINUAL_RUNS[:2]:
        fit("model_parallel", task_files, root / task, apply=f"continual:{task}:{start_from}", devices=2)
    return root / "store"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("last", [("model_parallel", 3), ("single", 1), ("ddp", 2)], ids=["on-3-ranks", "unsharded", "ddp"])
def test_a_continual_store_written_on_2_ranks_is_continued_on_3_or_unsharded_as_one_process_continues_it(
        last, task_files, continual_single, stored_on_2_ranks, tmp_path):
    # given tasks a and b stored by fits on 2 ranks, when task c's fit runs on 3 ranks (uneven rows), in one
    # process or under DDP (the ranks' rows put together first, by global rank 0)
    _, singles = continual_single
    shutil.copytree(stored_on_2_ranks, tmp_path / "store")
    strategy, devices = last
    continued = fit(strategy, task_files, tmp_path / "c", apply="continual:c:merged", devices=devices)
    assert continued["world"] == devices
    # then c starts from the stored merge of a and b and ends with the merge of all three, as in one process
    assert_equal(continued["started"], singles["c"]["started"])
    assert_equal(continued["merged"], singles["c"]["merged"])
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if p.name.startswith("rank-")) == [
        "rank-0-of-2", *(["rank-0-of-3"] if devices == 3 else []), "rank-1-of-2",
        *(["rank-1-of-3", "rank-2-of-3"] if devices == 3 else [])]


@pytest.mark.timeout(300)
def test_a_continual_search_on_validation_data_on_shards_chooses_and_merges_as_one_process(task_files, tmp_path):
    # tasks a then b arrive; each fit searches k x lam on the validation data of every task so far
    for task in ("a", "b"):
        apply = f"continual:{task}:base:search"
        single = fit("single", task_files, tmp_path / "single" / task, apply=apply, devices=1)
        sharded = fit("model_parallel", task_files, tmp_path / "sharded" / task, apply=apply)
        assert sharded["chosen"][3] == single["chosen"][3] == "search"
        assert sharded["chosen"][2] == 4  # 2 k x 2 lam, every candidate scored on every rank alike
        assert sharded["chosen"] == single["chosen"]  # candidates, their scores and the choice
        assert_equal(sharded["merged"], single["merged"])


def test_a_scored_search_on_shards_applies_the_single_process_merge_of_its_choice(task_files, tmp_path):
    result = fit("model_parallel", task_files, tmp_path / "out", apply="search")
    k, lam, candidates, reason = result["chosen"][:4]
    assert reason == "search" and candidates == 4 and k in (0.2, 0.5) and lam in (0.5, 1.0)
    files = [open_source(task_files / f"{t}.safetensors") for t in ("a", "b")]
    assert_equal(result["merged"], ties_merge(result["base"], [*files, result["finetuned"]], k=k, lam=lam))


def test_auto_on_shards_searches_the_data_free_methods_as_one_process_restricted_to_them(task_files, tmp_path):
    # given method="auto" (RegMean among its methods), when fitting under ModelParallelStrategy on 2 ranks
    sharded = fit("model_parallel", task_files, tmp_path / "sharded", apply="auto")
    # then the same search as one unsharded process told to leave out the methods that need data
    single = fit("single", task_files, tmp_path / "single", apply="auto", devices=1)
    assert sharded["chosen"][3] == "search" and "regmean" not in {m for m, _, _ in sharded["chosen"][5]}
    assert {m for m, _, _ in sharded["chosen"][5]} >= {"tsv", "ties", "task_arithmetic"}
    assert sharded["chosen"] == single["chosen"]  # every candidate, in order, and the choice
    assert_equal(sharded["base"], single["base"])
    assert_equal(sharded["finetuned"], single["finetuned"])
    assert_equal(sharded["merged"], single["merged"])


def test_auto_leaves_out_regmean_under_sharding_but_a_named_regmean_is_refused():
    from lightning_ties.core.options import SearchOptions
    from lightning_ties.pytorch_lightning.sharded import sharded_search_options

    auto = SearchOptions.build("auto", budget_s=5.0)
    options = sharded_search_options(auto, "ModelParallelStrategy")
    assert "regmean" in auto.methods and "regmean" not in options.methods and options.auto
    assert options.methods == tuple(m for m in auto.methods if m != "regmean") and options.budget_s == 5.0
    assert sharded_search_options(options, "X") is options
    with pytest.raises(ValueError, match=r"\['regmean'\] need each task's data .* under FSDPStrategy"):
        sharded_search_options(SearchOptions.build(["ties", "regmean"]), "FSDPStrategy")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="regmean"), r"method\(s\) \['regmean'\] need each task's data"),
    (dict(heads=[torch.nn.Linear(1, 1)]), "heads: the Linear given is not a submodule of the model"),
])
def test_what_the_sharded_merge_cannot_do_is_refused_at_setup(kwargs, message):
    import pytorch_lightning as pl

    from lightning_ties.pytorch_lightning.sharded import sharded_merging

    class FakeTrainer:
        strategy = pl.strategies.ModelParallelStrategy()
        lightning_module = torch.nn.Sequential(torch.nn.Linear(1, 1))

    merging = TiesMerging(tasks={"a": "a.safetensors"}, task="c", **kwargs)
    with pytest.raises(ValueError, match=message):
        sharded_merging(merging, FakeTrainer())
    assert sharded_merging(merging, type("Whole", (), {"strategy": pl.strategies.DDPStrategy()})()) is None


@pytest.mark.parametrize("module_kind", ["MultiTaskMergeModule", "LearnedMergeModule"])
def test_the_merge_modules_refuse_the_sharded_strategies_they_do_not_merge_on_at_setup(module_kind, tiny):
    import pytorch_lightning as pl

    from lightning_ties.lightning import LearnedMergeModule, MultiTaskMergeModule

    model, base, tasks = tiny
    if module_kind == "MultiTaskMergeModule":
        module = MultiTaskMergeModule(base, tasks, model=model)
    else:
        loaders = {t: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 6), torch.zeros(4).long()),
                                                  batch_size=2) for t in tasks}
        module = LearnedMergeModule(model, tasks, loaders, base=base, k=0.2, holdout=0.0)

    def under(strategy):
        module._trainer = type("FakeTrainer", (), {"strategy": strategy})()
        module.setup("validate")

    if module_kind == "MultiTaskMergeModule":  # FSDP2, FSDP1: merged on each rank's shards (test_lightning_sharded_module.py)
        under(pl.strategies.ModelParallelStrategy())
        under(pl.strategies.FSDPStrategy())
    else:
        with pytest.raises(ValueError, match=f"{module_kind} does not support the sharded strategy ModelParallelStrategy"):
            under(pl.strategies.ModelParallelStrategy())
    under(pl.strategies.DDPStrategy())  # unsharded: accepted


# ---- on a GPU (benchmarks/gpu_check.sh runs them; skipped without CUDA) -------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("strategy", ["model_parallel_cuda", "fsdp_full_cuda", "bf16_cuda"])
def test_on_the_gpu_the_fit_end_merge_equals_the_single_process_merge(strategy, task_files, tmp_path):
    # model_parallel_cuda: NCCL at world size 1; fsdp_full_cuda: FSDPStrategy(state_dict_type="full");
    # bf16_cuda: FSDP2 computes in bf16, the sharded parameters stay fp32 and the merge happens on them
    result = fit(strategy, task_files, tmp_path / "out", devices=1)
    assert result["world"] == 1
    assert all(v.dtype == torch.float32 for v in result["merged"].values())
    assert_equal(result["merged"], oracle(result, task_files))
    saved = open_source(tmp_path / "out" / "save" / "merged.ckpt")
    assert_equal({k: saved.get(k).cpu() for k in saved.keys()}, result["merged"])


@pytest.mark.cuda
@needs_cuda
def test_on_the_gpu_deepspeed_stage_3_is_refused_with_the_message(task_files, tmp_path):
    pytest.importorskip("deepspeed")
    proc = launch("deepspeed3_cuda", task_files, tmp_path / "out", devices=1)
    assert proc.returncode != 0 and "TiesMerging does not support DeepSpeedStrategy" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["model_parallel", "fsdp"])
def test_a_resumed_sharded_fit_merges_onto_the_first_fits_base_and_refuses_a_module_built_otherwise(
        strategy, task_files, tmp_path):
    # given a fit on 2 ranks that saved a checkpoint at step 2 and merged at its end
    first = fit(strategy, task_files, tmp_path / "first", apply="resume")
    saved = sorted((tmp_path / "first" / "ckpts").iterdir())
    assert [p.name for p in saved] == ["epoch=0-step=2.ckpt"]
    # when a fit resumes from that checkpoint (Lightning restores it after fit start: the base is captured again)
    resumed = fit(strategy, task_files, tmp_path / "resumed", apply=f"resume:{saved[0]}")
    # then it merges onto the same base as the first fit, as one process does
    assert_equal(resumed["merged"], first["merged"])
    assert_equal(resumed["merged"], oracle(first, task_files))
    # and a module built from other weights is refused on every rank, naming what to do (no rank hangs)
    proc = launch(strategy, task_files, tmp_path / "perturbed", apply=f"resume:{saved[0]}:perturbed")
    assert proc.returncode != 0
    assert "the module's weights at fit start are not the base the checkpoint's fit captured" in proc.stderr
    assert "TiesMerging(base=<the pretrained weights' file>)" in proc.stderr


@pytest.mark.timeout(300)
def test_an_interrupted_sharded_search_resumes_from_its_progress_and_scores_only_what_is_left(task_files, tmp_path):
    from lightning_ties.core.resume import read_progress, write_progress

    # given a search on 2 ranks that scored its 4 candidates, and a copy of its save_dir holding only the first
    # two of them as progress (the first given an objective no candidate reaches: proof it is not scored again)
    first = fit("model_parallel", task_files, tmp_path / "first", apply="search")
    assert first["chosen"][2] == 4
    shutil.copytree(tmp_path / "first" / "save", tmp_path / "resumed" / "save")
    progress = read_progress(tmp_path / "resumed" / "save")
    assert len(progress.candidates) == 4 and progress.reference  # every candidate and the references were saved
    progress.candidates = progress.candidates[:2]
    progress.candidates[0].objective = 99.0
    write_progress(tmp_path / "resumed" / "save", progress)
    # when the same fit runs again (the same fine-tuned weights), then it keeps those two, scores the other two
    resumed = fit("model_parallel", task_files, tmp_path / "resumed", apply="search")
    assert resumed["chosen"][5] == first["chosen"][5]  # the same candidates, in the same order
    assert resumed["chosen"][6][0] == 99.0 and resumed["chosen"][6][1:] == first["chosen"][6][1:]
    forged = first["chosen"][5][0]
    assert (resumed["chosen"][0], resumed["chosen"][1]) == forged[1:]  # the forged best is chosen and applied
    assert_equal(resumed["merged"], ties_merge(first["base"], [*(open_source(task_files / f"{t}.safetensors")
                                                                for t in ("a", "b")), first["finetuned"]],
                                               k=forged[1], lam=forged[2]))
    # and an unreadable progress file stops every rank, naming it and what to do
    from lightning_ties.io import atomic_open

    (tmp_path / "broken" / "save").mkdir(parents=True)
    with atomic_open(tmp_path / "broken" / "save" / "search_progress.json") as f:  # ours, damaged (cut short)
        f.write(b'{"candidates": [')
    proc = launch("model_parallel", task_files, tmp_path / "broken", apply="search")
    assert proc.returncode != 0
    assert "search_progress.json: the search progress is unreadable" in proc.stderr
    assert "remove it to start the search over" in proc.stderr
    # and a progress write that fails (a full disk under save_dir) stops every rank, naming the file: no rank waits
    proc = launch("model_parallel", task_files, tmp_path / "full", apply="search", env={"LT_TEST_PROGRESS_WRITE_FAILS": "1"})
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr  # rank 0's own error
    assert f"{tmp_path / 'full' / 'save' / 'search_progress.json'}: global rank 0 failed: OSError" in proc.stderr  # rank 1's
    # and progress of another search (here: other fine-tuned weights, as after more training) is not reused
    progress.fingerprint = progress.fingerprint.replace('"step": 3', '"step": 2')
    write_progress(tmp_path / "resumed" / "save", progress)
    again = fit("model_parallel", task_files, tmp_path / "resumed", apply="search")
    assert again["chosen"][6] == first["chosen"][6]


@pytest.mark.timeout(300)
def test_every_n_val_epochs_on_shards_logs_the_one_process_scores_and_restores_the_shards(task_files, tmp_path):
    # given a validation epoch at step 2 where the module holds c's weights, one process and 2 ranks
    single = fit("single", task_files, tmp_path / "single", apply="every", devices=1)
    sharded = fit("model_parallel", task_files, tmp_path / "sharded", apply="every")
    # then the merge of a, b and c is scored and logged, the same on shards as in one process
    assert sorted(single["logged"]) == ["merge/a/acc", "merge/b/acc", "merge/c/acc", "merge/mean/acc"]
    assert sharded["logged"] == single["logged"] and 0 < single["logged"]["merge/mean/acc"] < 1
    # and the module holds c's weights again after it (each rank restored its own shards)
    c = open_source(task_files / "c.safetensors")
    assert_equal(sharded["after_validation"], {k: c.get(k) for k in c.keys()})


@pytest.fixture(scope="module")
def heads_single(task_files, tmp_path_factory) -> dict:
    """The reference: the head given as a submodule, in one process."""
    return fit("single", task_files, tmp_path_factory.mktemp("heads-single"), apply="heads", devices=1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["model_parallel", "fsdp"])
def test_a_head_given_as_a_submodule_stays_this_runs_own_on_shards_as_in_one_process(strategy, task_files, heads_single,
                                                                                     tmp_path):
    single = heads_single
    sharded = fit(strategy, task_files, tmp_path / "sharded", apply="heads")
    assert_equal(sharded["merged"], single["merged"])
    # the head (the last Linear) is this run's (c's), every other key merged
    c = open_source(task_files / "c.safetensors")
    for key in single["merged"]:
        assert torch.equal(single["merged"][key], c.get(key)) == key.startswith("model.2."), key


def test_scoring_a_continual_merge_mid_fit_on_shards_adds_nothing_to_the_store():
    # every_n_val_epochs scores the merge of the weights as they are mid-fit: they must not join the store
    from lightning_ties.pytorch_lightning.continual import ContinualTiesMerging, ShardedContinualMerging

    merging = ShardedContinualMerging(ContinualTiesMerging(task="c", store="unused"))

    class Store:
        def names(self):
            return ["a", "c"]

        def source(self, name):
            return f"stored {name}"

        def add(self, *args, **kwargs):
            raise AssertionError("a mid-fit score added this run to the store")

    class Fit:  # this rank's view and base rows, as far as adding to the store reads them
        keys, base = [], {}

        def view(self):
            return types.SimpleNamespace(source=lambda label: f"{label}'s rows")

    merging.store, merging.fit = Store(), Fit()
    assert merging.task_sources(None, add_this_run=False) == {"a": "stored a"}  # c: this run's live weights
    with pytest.raises(AssertionError, match="added this run"):
        merging.task_sources(None)  # at fit end it does join
