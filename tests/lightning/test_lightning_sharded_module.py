"""MultiTaskMergeModule under ModelParallelStrategy and FSDPStrategy on the CPU (2 gloo processes, launched by Lightning).

Given base and task checkpoints as files, on either Lightning package, a model with per-task heads and uneven row shards, when the module
shards its model with FSDP2 in ``configure_model`` (block by block, the model given as a factory and so built on the
meta device and filled per rank from the base; or built, by the user's ``shard_fn``), or FSDPStrategy wraps the whole
module (FSDP1, once for all its validation runs; the model given built), and evaluates
(normalized), searches two methods over k x lam, and is asked for RegMean, then every score, reference, candidate
and the chosen merge equal one process's, the merged weights (gathered) equal one process's bit for bit after each
step, each rank holds only its rows of the base and of tau_m, and RegMean is refused with its reason; and a tiny
Hugging Face BERT classifier (dict batches, ``classifier`` heads) scores, searches and merges as one process too, as
does a tiny Llama causal LM with tied embeddings whose checkpoints hold one name of them (it stays tied). Under FSDP1 a
model given as a factory is refused at setup, before anything builds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_ties.io import save_safetensors

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).parents[1] / "sharded_module_script.py"


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> Path:
    sys.path.insert(0, str(SCRIPT.parent))
    from sharded_module_script import Tiny, bert, llama

    folder = tmp_path_factory.mktemp("tasks")
    g = torch.Generator().manual_seed(5)
    for where, model in ((folder, Tiny()), (folder / "bert", bert()), (folder / "llama", llama())):
        where.mkdir(exist_ok=True)
        base = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: one name
        save_safetensors(base, where / "base.safetensors")
        for t in ("a", "b"):
            save_safetensors({k: v + 0.2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                              for k, v in base.items()}, where / f"{t}.safetensors")
    return folder


def run(strategy: str, devices: int, tasks: Path, out: Path, backend: str = "pytorch_lightning") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LIGHTNING_TIES_BACKEND": backend}
    proc = subprocess.run([sys.executable, str(SCRIPT), strategy, str(devices), str(out), str(tasks)],
                          capture_output=True, text=True, timeout=200, cwd=str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def single(task_files, tmp_path_factory) -> dict:
    return run("single", 1, task_files, tmp_path_factory.mktemp("single"))


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# each Lightning package once per strategy (the module from its own layer), each way of sharding once
@pytest.mark.parametrize(("strategy", "backend"), [("model_parallel", "pytorch_lightning"), ("model_parallel_fn", "lightning"),
                                                   ("fsdp", "lightning"), ("fsdp", "pytorch_lightning")])
def test_the_merge_module_on_shards_scores_searches_and_merges_as_one_process(strategy, backend, task_files, single,
                                                                              tmp_path):
    sharded = run(strategy, 2, task_files, tmp_path, backend)
    assert sharded["layer"] == ("lightning_ties.pytorch.module" if backend == "lightning"
                                else "lightning_ties.pytorch_lightning.module")
    assert sharded["sharded"] and not single["sharded"]
    # block by block, the models are given as factories: built without weights, each rank filled its rows
    assert sharded["built_on_meta"] == sharded["bert_built_on_meta"] == (strategy == "model_parallel")
    assert sharded["eval"] == single["eval"]
    assert sharded["reference"] == single["reference"]  # each task's own weights and head written into the shards
    assert_same_weights(sharded["eval_weights"], single["eval_weights"])
    assert sharded["candidates"] == single["candidates"]
    assert len({c[3] for c in single["candidates"]}) > 1  # the candidates' scores tell them apart
    assert sharded["chosen"] == single["chosen"]
    assert_same_weights(sharded["search_weights"], single["search_weights"])
    named = "CPUFSDPStrategy" if strategy == "fsdp" else "ModelParallelStrategy"  # the strategy's class, subclass or not
    assert "['regmean'] need each task's data" in sharded["regmean"] and named in sharded["regmean"]
    assert "'regmean' needs each task's data" in sharded["regmean_module"] and "sharded" in sharded["regmean_module"]
    assert "regmean" not in single and "regmean_module" not in single  # one process runs RegMean
    # each rank holds its own rows of the base and of tau_m, none twice: together one model, about half each
    held = [torch.load(tmp_path / f"held{r}.pt") for r in range(2)]
    total = sum(v.numel() for k, v in single["search_weights"].items() if not k.startswith("head."))
    excluded = single["search_weights"]["blocks.0.bias"].numel()  # never merged: no tau_m rows
    assert sum(h["base"] for h in held) == total and sum(h["tau"] for h in held) == total - excluded
    assert max(h["tau"] for h in held) <= 0.6 * total
    # a Hugging Face model (its layers sharded as blocks, dict batches): the same scores, candidates and weights
    assert sharded["bert_eval"] == single["bert_eval"]
    assert sharded["bert_candidates"] == single["bert_candidates"]
    assert_same_weights(sharded["bert_weights"], single["bert_weights"])
    # a causal LM with tied embeddings, filled and merged through one of its two names: still tied, the same merge
    assert sharded["llama_eval"] == single["llama_eval"] and sharded["llama_tied"] and single["llama_tied"]
    assert_same_weights(sharded["llama_weights"], single["llama_weights"])
    if strategy == "fsdp":  # FSDP1 would build a factory's model whole on every rank: refused, and nothing built it
        message, still_on_meta = sharded["factory"]
        assert "model= a factory" in message and "not supported under FSDPStrategy (FSDP1)" in message and still_on_meta
        assert "Pass the model built" in message and "ModelParallelStrategy" in message
    assert "factory" not in single


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_merge_module_on_shards_merges_as_one_cpu_process(task_files, single, tmp_path):
    # NCCL at world size 1, the merge computed on the GPU: the weights are the CPU's bit for bit (the scores of a
    # GPU forward are not compared: its float sums may differ in the last bits from the CPU's)
    on_gpu = run("model_parallel_cuda", 1, task_files, tmp_path)
    assert on_gpu["sharded"] and on_gpu["built_on_meta"]  # given as a factory: filled from the base on the GPU
    assert_same_weights({k: v.cpu() for k, v in on_gpu["eval_weights"].items()}, single["eval_weights"])

