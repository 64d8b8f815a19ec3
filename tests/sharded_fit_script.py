"""A fit under a sharded Lightning strategy on the CPU, with TiesMerging at fit end (run by test_lightning_sharded.py).

Usage: python sharded_fit_script.py STRATEGY DEVICES OUT TASKS_DIR [APPLY]

APPLY: ``merged`` (default), ``keep``, ``search`` (k x lam scored), ``auto`` (``method="auto"``),
``continual:<task>:<start_from>[:search]`` (ContinualTiesMerging over the store OUT/../store; the fit ends at
TASKS_DIR/<task>; ``:search``: k and lam searched on every stored task's validation data) or
``resume[:<checkpoint>[:perturbed]]`` (the fit ends at TASKS_DIR/c; without a checkpoint it saves one at step 2 in
OUT/ckpts, with one it resumes from it, the module built with other weights when ``perturbed``), ``every``
(``every_n_val_epochs=1``: one validation epoch, at step 2, where the module holds TASKS_DIR/c's weights) or
``heads`` (the last Linear given as the head submodule; the fit ends at TASKS_DIR/c).

STRATEGY: ``single`` (one process, unsharded: the reference), ``ddp`` (unsharded, every rank whole), ``model_parallel`` (ModelParallelStrategy + fully_shard in configure_model), ``fsdp`` (a test-only
FSDPStrategy subclass that wraps with device_id=cpu, since Lightning refuses FSDP on the CPU), ``my_mp`` (a
user's subclass of ModelParallelStrategy) or ``deepspeed`` (refused). Lightning re-launches this script for
the other ranks. ``LIGHTNING_TIES_BACKEND=lightning`` runs it on the unified ``lightning`` package;
``LT_TEST_PROGRESS_WRITE_FAILS=1`` makes rank 0's search-progress writes fail as on a full disk. Rank 0 writes OUT/result.pt: the base, the fine-tuned weights (gathered before the merge),
the merged weights (gathered after it), and OUT/ckpt (a DCP checkpoint saved by the Trainer after the merge).
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

if os.environ.get("LIGHTNING_TIES_BACKEND") == "lightning":  # the unified package (its layer: lightning_ties.pytorch)
    import lightning.pytorch as pl  # noqa: E402
else:
    import pytorch_lightning as pl  # noqa: E402
FSDPStrategy, ModelParallelStrategy = pl.strategies.FSDPStrategy, pl.strategies.ModelParallelStrategy

from lightning_ties import ContinualTiesMerging, TiesMerging  # noqa: E402
from lightning_ties.distributed.fit import full_state  # noqa: E402

K, LAM = 0.3, 0.8
#: the ``bf16_cuda`` strategy: FSDP2 computes in bf16 over fp32 sharded parameters
BF16 = len(sys.argv) > 1 and sys.argv[1] == "bf16_cuda"
RESUME = len(sys.argv) > 5 and sys.argv[5].startswith("resume")


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))


class Net(pl.LightningModule):
    def __init__(self, perturbed: bool = False) -> None:
        super().__init__()
        self.model = make_net()
        if perturbed:  # built from other weights than the first fit's (one entry off)
            with torch.no_grad():
                self.model[0].bias[0] += 1.0

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # bf16: the forward computes in bf16, the sharded parameters (what is merged) stay fp32 master weights
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if BF16 else None
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"], **({"mp_policy": policy} if BF16 else {}))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.model(x), y), sync_dist=True)

    def configure_optimizers(self):
        # resume: FSDPStrategy cannot restore an empty optimizer state (plain SGD keeps none): momentum keeps one
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9 if RESUME else 0.0)


class CPUFSDPStrategy(FSDPStrategy):
    """Test only: Lightning refuses ``strategy="fsdp"`` on the CPU; FSDP1 itself runs there with device_id=cpu."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, device_id=torch.device("cpu"), **self.kwargs)

    def lightning_module_state_dict(self):
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        # Lightning's full state dict offloads to the CPU, which FSDP1 cannot do from the CPU (a crash): the same
        # full state dict without the offload (on the GPU, fsdp_full_cuda runs Lightning's own)
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()


class MyModelParallel(ModelParallelStrategy):
    """A user's subclass: detected by isinstance, not by class name."""


class Record(pl.Callback):
    """Before TiesMerging's fit end: the fine-tuned weights, gathered whole (a check, not the merge's input)."""

    def on_fit_start(self, trainer, pl_module):
        self.base = full_state(_sharded(trainer))

    def on_train_start(self, trainer, pl_module):  # after every on_fit_start (continual: start_from="merged")
        self.started = full_state(_sharded(trainer))

    def on_fit_end(self, trainer, pl_module):
        self.finetuned = full_state(_sharded(trainer))


class AfterValidation(pl.Callback):
    """After TiesMerging's validation epoch end: the module's weights, gathered (the inline merge restored them?)."""

    state = logged = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if isinstance(pl_module, Net):  # the fit's validation (one process scores the fit-end merge in its own)
            self.state = full_state(_sharded(trainer))
            self.logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("merge")}


class EndAt(pl.Callback):
    """At train end (before the merge): the module holds the weights of ``path``, whatever the world size trained.

    W ranks and one process train on differently split batches; this makes their fine-tuned weights equal.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        from lightning_ties.distributed import RowsSource, sharded_view
        from lightning_ties.io import open_source

        view = sharded_view(_sharded(trainer))
        rows = RowsSource(open_source(self.path), view.rows)
        view.write_({key: rows.get(key) for key in view.keys})


def _sharded(trainer):
    return trainer.strategy.model if isinstance(trainer.strategy, FSDPStrategy) else trainer.lightning_module


def strategy_of(name: str):
    """The strategy a name stands for; names ending in ``_cuda`` run on the GPU (NCCL), the others on the CPU (gloo)."""
    devices = int(sys.argv[2])
    if name in ("model_parallel", "model_parallel_cuda", "bf16_cuda"):
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if name == "my_mp":
        return MyModelParallel(data_parallel_size=devices, tensor_parallel_size=1)
    if name in ("fsdp", "fsdp_full"):
        return CPUFSDPStrategy(state_dict_type="sharded" if name == "fsdp" else "full", use_orig_params=True)
    if name == "fsdp_full_cuda":
        return FSDPStrategy(state_dict_type="full", use_orig_params=True)
    if name == "single":  # the unsharded reference: one process, the whole module
        return "auto"
    if name == "ddp":  # unsharded on several processes: every rank holds the whole module
        return pl.strategies.DDPStrategy()
    if name == "deepspeed3_cuda":  # the real one (needs `import deepspeed`): refused at setup
        return pl.strategies.DeepSpeedStrategy(stage=3)
    if name == "deepspeed":
        class CPUDeepSpeed(pl.strategies.DeepSpeedStrategy):  # never gets to run: refused at setup
            def __init__(self):
                pl.strategies.DDPStrategy.__init__(self)

        return CPUDeepSpeed()
    raise SystemExit(f"unknown strategy {name}")


def main() -> None:
    name, devices, out, tasks_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    apply = sys.argv[5] if len(sys.argv) > 5 else "merged"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    tasks = {t: str(tasks_dir / f"{t}.safetensors") for t in ("a", "b")}
    val = {t: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, i] > 0).long()), batch_size=8)
           for i, t in enumerate(("a", "b"))}
    own_val = data
    if apply == "every":  # three classes, labels the merge gets partly right: scores that tell merges apart
        val, own_val = ({t: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, i : i + 3].argmax(1)),
                                                        batch_size=8) for i, t in enumerate(("a", "b", "c"))},) * 2
        val, own_val = {t: v for t, v in val.items() if t != "c"}, val["c"]
    if apply == "search":  # every task has validation data: k and lam are searched on every rank alike
        merging = TiesMerging(tasks=tasks, task="c", k=[0.2, 0.5], lam=[0.5, 1.0], val_dataloaders=val,
                              save_dir=str(out / "save"))
    elif apply == "auto":  # method="auto": sharded, the data-free methods only (unsharded: told the same here)
        merging = TiesMerging(tasks=tasks, task="c", method="auto", lam=[0.5, 1.0, 1.5], val_dataloaders=val,
                              save_dir=str(out / "save"))
        if name == "single":
            merging.options = merging.options.without_data_methods()
    elif apply.startswith("continual:"):  # continual:<task>:<start_from>[:search]; the store is OUT's sibling "store"
        _, task, start_from, *search = apply.split(":")
        grid = dict(k=[0.2, 0.3], lam=[0.5, 1.0], val_dataloaders={t: v for t, v in val.items() if t <= task}) if search else \
            dict(k=K, lam=LAM)  # search: every task so far has validation data (tasks arrive in name order)
        merging = ContinualTiesMerging(task=task, store=str(out.parent / "store"), start_from=start_from,
                                       save_dir=str(out / "save"), **grid)
    elif apply == "heads":  # the last Linear is a per-task head, given as the submodule itself
        net = Net()
        merging = TiesMerging(tasks=tasks, task="c", k=K, lam=LAM, heads=net.model[2], save_dir=str(out / "save"))
    elif apply == "every":
        merging = TiesMerging(tasks=tasks, task="c", k=K, lam=LAM, every_n_val_epochs=1, val_dataloaders=val,
                              save_dir=str(out / "save"))
    elif apply.startswith("resume"):  # both fits share save_dir: the callback's state key is the same
        merging = TiesMerging(tasks=tasks, task="c", k=K, lam=LAM, save_dir=str(out.parent / "save"))
    else:
        merging = TiesMerging(tasks=tasks, task="c", k=K, lam=LAM, apply=apply, save_dir=str(out / "save"))
    if os.environ.get("LT_TEST_PROGRESS_WRITE_FAILS"):  # save_dir's disk is full: rank 0's progress write fails
        def full_disk(save_dir, progress):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_dir) / "search_progress.json"))

        sys.modules[type(merging).__module__.rsplit(".", 1)[0] + ".checkpoints"].write_progress = full_disk
    mode, *args = apply.split(":")
    ckpt_path = args[0] if mode == "resume" and args else None
    perturbed = mode == "resume" and args[-1:] == ["perturbed"]
    record = Record()
    end = "c" if mode in ("auto", "resume", "heads") else (args[0] if mode == "continual" else None)
    end_at = [EndAt(tasks_dir / f"{end}.safetensors")] if end else []
    after = AfterValidation()
    if apply == "every":  # the inline merge scores TASKS_DIR/c's weights as this run's, whatever the world size
        at_validation = EndAt(tasks_dir / "c.safetensors")
        at_validation.on_validation_epoch_start = lambda trainer, pl_module: (
            isinstance(pl_module, Net) and at_validation.on_train_end(trainer, pl_module))
        end_at = [at_validation]
    if apply == "resume":  # the first fit: a checkpoint at step 2 to resume from
        end_at.append(pl.callbacks.ModelCheckpoint(dirpath=out / "ckpts", every_n_train_steps=2, save_top_k=-1))
    accelerator = "cuda" if name.endswith("_cuda") else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy_of(name), max_steps=3,
                         callbacks=[*end_at, record, merging, after], logger=False, default_root_dir=out,
                         enable_checkpointing=apply == "resume", enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=2 if apply == "every" else None, num_sanity_val_steps=0)
    trainer.fit(net if apply == "heads" else Net(perturbed=perturbed), data, own_val if apply in ("search", "auto", "every") else None,
                ckpt_path=ckpt_path)
    merged = full_state(_sharded(trainer))
    trainer.save_checkpoint(out / ("ckpt.ckpt" if "full" in name else "ckpt"))  # full: one file
    if trainer.is_global_zero:
        r = merging.result
        chosen = [r.k, r.lam, len(r.candidates), r.reason, r.method, [(c.method, c.k, c.lam) for c in r.candidates],
                  [c.objective for c in r.candidates], r.reference]
        torch.save({"base": record.base, "started": record.started, "finetuned": record.finetuned, "merged": merged,
                    "chosen": chosen, "after_validation": after.state,
                    "logged": after.logged,
                    "world": int(os.environ.get("WORLD_SIZE", devices)), "layer": type(merging).__module__},
                   out / "result.pt")


if __name__ == "__main__":
    main()
