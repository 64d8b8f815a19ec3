"""MultiTaskMergeModule evaluated and searched under a sharded strategy on the CPU (run by test_lightning_sharded_module.py).

Usage: python sharded_module_script.py STRATEGY DEVICES OUT TASKS_DIR

STRATEGY: ``single`` (one process, the reference), ``model_parallel`` (ModelParallelStrategy: the module shards its
model with FSDP2 in ``configure_model``, block by block; the models are given as factories, so they are built on
the meta device and each rank fills its own rows from the base; ``model_parallel_cuda`` likewise on GPUs),
``model_parallel_fn`` (the same with a user's ``shard_fn`` sharding the model as one group) or ``fsdp``
(FSDPStrategy, a test-only subclass that wraps on the CPU: the strategy wraps the whole module, FSDP1; the models are
given built, and a model given as a factory is refused at setup, before anything builds it). Lightning re-launches
this script for the other ranks; ``LIGHTNING_TIES_BACKEND=lightning`` runs it on the unified ``lightning`` package.
The model has per-task heads of one shape (``heads="^head\\."``), its blocks in an ``nn.ModuleList``
(7 and 5 rows: uneven shards). Every rank runs, in one Trainer: ``evaluate`` with normalized scores (each task's
fine-tuned weights written into the shards and scored), a two-method k x lam ``search``, then a ``search`` naming
RegMean and a module whose method is RegMean (both refused). Rank 0 writes OUT/result.pt: the scores, the
references, the candidates, the chosen merge, the whole merged weights after each step (gathered) and the refusals'
messages; every rank writes OUT/held<rank>.pt: how many entries of the base and of tau_m it holds. Then the same
for a tiny ``BertForSequenceClassification`` (dict batches, ``classifier`` heads): scores, candidates, weights; and
for a tiny ``LlamaForCausalLM`` with tied embeddings (its checkpoints without ``lm_head.weight``): scores, weights.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if os.environ.get("LIGHTNING_TIES_BACKEND") == "lightning":  # the unified package (its layer: lightning_ties.pytorch)
    import lightning.pytorch as pl  # noqa: E402

    from lightning_ties.pytorch import MultiTaskMergeModule  # noqa: E402
else:
    import pytorch_lightning as pl  # noqa: E402

    from lightning_ties.pytorch_lightning import MultiTaskMergeModule  # noqa: E402
from lightning_ties.distributed.fit import gather_entry  # noqa: E402

TASKS = ("a", "b")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(6, 7), nn.Linear(7, 5)])
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def loaders() -> dict[str, torch.utils.data.DataLoader]:
    """32 examples per task (16 per rank at W=2: no padding), three classes the merge gets partly right."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    return {t: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, i : i + 3].argmax(1)), batch_size=8)
            for i, t in enumerate(TASKS)}


def bert() -> nn.Module:
    """A Hugging Face model from a tiny config: its layers (an nn.ModuleList) are the blocks shard_blocks shards."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def bert_loaders() -> dict[str, torch.utils.data.DataLoader]:
    """Dict batches (``input_ids``, ``attention_mask``, ``labels``): the default forward calls ``model(**batch)``."""
    g = torch.Generator().manual_seed(4)
    out = {}
    for t in TASKS:
        ids, y = torch.randint(0, 32, (16, 6), generator=g), torch.randint(0, 3, (16,), generator=g)
        rows = [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": y[i]} for i in range(16)]
        out[t] = torch.utils.data.DataLoader(rows, batch_size=4)
    return out


def llama() -> nn.Module:
    """A causal LM with tied embeddings (``lm_head.weight`` is ``model.embed_tokens.weight``), rotary buffers."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def llama_loaders() -> dict[str, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(6)
    return {t: torch.utils.data.DataLoader([{"input_ids": ids, "labels": y} for ids, y in zip(
        torch.randint(0, 32, (16, 6), generator=g), torch.randint(0, 32, (16,), generator=g))], batch_size=4)
        for t in TASKS}


def next_token(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction of the token after each sequence, against its label."""
    return model(input_ids=batch["input_ids"]).logits[:, -1], batch["labels"]


def shard_as_one_group(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh)


class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """Test only: Lightning refuses ``strategy="fsdp"`` on the CPU; FSDP1 itself runs there with device_id=cpu. A module
    already wrapped is kept, as Lightning's own ``_setup_model`` keeps it."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model
        return FullyShardedDataParallel(module=model, device_id=torch.device("cpu"), **self.kwargs)


def strategy_of(name: str, devices: int):
    if name in ("model_parallel", "model_parallel_fn", "model_parallel_cuda"):
        return pl.strategies.ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if name == "fsdp":
        return CPUFSDPStrategy()
    return "auto"


def weights(module: MultiTaskMergeModule) -> dict[str, torch.Tensor]:
    """The whole weights of the module's model (gathered one tensor at a time when sharded: collective)."""
    if module.merger.sharded is not None:  # the merger's own view: the model's keys, under FSDP1 too
        view = module.merger.sharded.view_of()
        return {key: gather_entry(entry, view.collectives) for key, entry in view.entries.items()}
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def main() -> None:
    name, devices, out, tasks_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    # ``model_parallel`` passes factories: the models are built on the meta device and each rank fills its own rows
    lazy = name in ("model_parallel", "model_parallel_cuda")
    module = MultiTaskMergeModule(str(tasks_dir / "base.safetensors"), {t: str(tasks_dir / f"{t}.safetensors") for t in TASKS},
                                  model=Tiny if lazy else Tiny(), heads=r"^head\.", k=0.3, lam=0.8,
                                  exclude=r"^blocks\.0\.bias$",  # never merged: its values are the base's
                                  shard_fn=shard_as_one_group if name == "model_parallel_fn" else None)
    built_on_meta = all(p.is_meta for p in module.model.parameters())
    trainer = pl.Trainer(accelerator="cuda" if name.endswith("_cuda") else "cpu", devices=devices,
                         strategy=strategy_of(name, devices), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    record: dict = {"eval": module.evaluate(trainer, loaders(), k=0.3, lam=0.8, normalize=True),
                    "layer": type(module).__module__, "built_on_meta": built_on_meta}
    record["reference"] = dict(module.reference)
    record["sharded"] = module.merger.sharded is not None
    record["eval_weights"] = weights(module)
    result = module.search(trainer, loaders(), method=["ties", "tsv"], k=[0.2, 0.5], lam=[0.5, 1.0])
    record["candidates"] = [(c.method, c.k, c.lam, c.objective, c.scores) for c in result.candidates]
    record["chosen"] = (result.method, result.k, result.lam)
    record["search_weights"] = weights(module)
    sharded = module.merger.sharded
    held = {"base": sum(v.numel() for v in sharded.base.values()),  # this rank's rows only
            "tau": sum(v.numel() for v in module.merger.task_vector(result.k).tau.values())} if sharded else None
    try:
        module.search(trainer, loaders(), method="regmean", lam=[1.0], normalize=False)
    except ValueError as err:
        record["regmean"] = str(err)
    regmean = MultiTaskMergeModule(str(tasks_dir / "base.safetensors"),
                                   {t: str(tasks_dir / f"{t}.safetensors") for t in TASKS}, model=Tiny(), method="regmean")
    try:
        regmean.evaluate(trainer, loaders())
    except ValueError as err:
        record["regmean_module"] = str(err)
    folder = tasks_dir / "bert"
    hf = MultiTaskMergeModule(str(folder / "base.safetensors"), {t: str(folder / f"{t}.safetensors") for t in TASKS},
                              model=bert if lazy else bert(), heads=r"^classifier\.", k=0.3, lam=0.8,
                              exclude=r"^bert\.embeddings\.LayerNorm\.",
                              shard_fn=shard_as_one_group if name == "model_parallel_fn" else None)
    record["bert_built_on_meta"] = all(p.is_meta for p in hf.model.parameters())
    record["bert_eval"] = hf.evaluate(trainer, bert_loaders(), normalize=True)
    result = hf.search(trainer, bert_loaders(), k=[0.2, 0.5], lam=[0.5, 1.5])
    record["bert_candidates"] = [(c.k, c.lam, c.objective) for c in result.candidates]
    record["bert_weights"] = weights(hf)
    folder = tasks_dir / "llama"  # tied weights: the checkpoints hold one name of them, as tied ones are saved
    lm = MultiTaskMergeModule(str(folder / "base.safetensors"), {t: str(folder / f"{t}.safetensors") for t in TASKS},
                              model=llama if lazy else llama(), k=0.3, lam=0.8, forward_fn=next_token,
                              shard_fn=shard_as_one_group if name == "model_parallel_fn" else None)
    record["llama_eval"] = lm.evaluate(trainer, llama_loaders(), normalize=True)
    record["llama_tied"] = lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    record["llama_weights"] = weights(lm)
    if name == "fsdp":  # a factory: FSDP1 would build it whole on every rank, so it is refused before anything does
        lazy_lm = MultiTaskMergeModule(str(folder / "base.safetensors"), {t: str(folder / f"{t}.safetensors") for t in TASKS},
                                       model=llama, forward_fn=next_token)
        try:
            lazy_lm.evaluate(trainer, llama_loaders())
        except ValueError as err:
            record["factory"] = (str(err), all(p.is_meta for p in lazy_lm.model.parameters()))
    torch.save(held, out / f"held{trainer.global_rank}.pt")
    if trainer.is_global_zero:
        torch.save(record, out / "result.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
