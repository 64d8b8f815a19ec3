"""The Lightning entry points in the setups users have: module layouts x task sources x precision x apply.

Given tasks a and b fine-tuned from one pretrained module and saved the way people save them
(``trainer.save_checkpoint``, ``ModelCheckpoint``, the inner model's ``save_pretrained`` folder,
a safetensors of the module's state dict, the module in memory), when task c is fitted with
``TiesMerging`` (or the three are merged by ``MultiTaskMergeModule`` / ``learn_coefficients``),
then the module ends equal to ``ties_merge(base, [a, b, c])`` at the chosen lam.

Not the full product: every pair of axis values appears in some case (16 callback cases; fp16 and
bf16-mixed once each).
The ``cuda`` cases repeat representative ones on a GPU Trainer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
transformers = pytest.importorskip("transformers")

from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_ties import ties_merge  # noqa: E402
from lightning_ties.lightning import MultiTaskMergeModule, TiesMerging, learn_coefficients  # noqa: E402
from lightning_ties.core.keys import KeyMatchError, match_to_module  # noqa: E402

K = 0.2
LAMS = [0.6, 1.2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the device tests run here on the CPU too (same code, device "cpu"); "gpu" is marked ``cuda``
ACCELERATORS = pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=[cuda, pytest.mark.cuda])])
DEVICE_TYPE = {"cpu": "cpu", "gpu": "cuda"}


# ---- three module layouts ------------------------------------------------------------------------
class OneAttribute(pl.LightningModule):
    """The most common layout: the whole network in one attribute (every key starts with ``net.``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    @property
    def inner(self) -> nn.Module:
        return self.net

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class SeveralAttributes(OneAttribute):
    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    inner = None  # no single inner model to save on its own

    def forward(self, x):
        return self.head(self.body(x))


class HFInside(OneAttribute):
    """A Hugging Face model built from a tiny config, held as ``self.model``."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        config = transformers.BertConfig(
            vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, num_labels=3,
        )
        self.model = transformers.BertForSequenceClassification(config)

    @property
    def inner(self) -> nn.Module:
        return self.model

    def forward(self, **inputs):
        return self.model(**inputs)

    def loss(self, batch):
        return self.model(**batch).loss


LAYOUTS = {"one": OneAttribute, "several": SeveralAttributes, "hf": HFInside}


def data(layout: str, seed: int, n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    if layout == "hf":
        ids = torch.randint(0, 32, (n, 6), generator=g)
        rows = [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": y[i]} for i in range(n)]
        return DataLoader(rows, batch_size=8)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), y), batch_size=8)


def trainer(precision: str = "32-true", accelerator: str = "cpu", **kwargs) -> pl.Trainer:
    opts = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(accelerator=accelerator, devices=1, precision=precision, **{**opts, **kwargs})


def pretrained(layout: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in LAYOUTS[layout]().state_dict().items()}


def start_from(layout: str, state: dict[str, torch.Tensor]) -> pl.LightningModule:
    module = LAYOUTS[layout]()
    module.load_state_dict(state)
    return module


# ---- tasks a and b, fitted once per (layout, precision) and saved every way ----------------------
class Task:
    def __init__(self, module: pl.LightningModule, folder: Path, best: str) -> None:
        self.module, self.folder, self.best = module, folder, best
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def source(self, kind: str):
        if kind == "save_checkpoint":
            return str(self.folder / "task.ckpt")
        if kind == "model_checkpoint":
            return self.best
        if kind == "inner_folder":
            return str(self.folder / "inner")
        if kind == "module_safetensors":
            return str(self.folder / "module.safetensors")
        assert kind == "in_memory"
        return self.module


_TASKS: dict[tuple[str, str], dict[str, Task]] = {}


def fitted_tasks(layout: str, precision: str, root: Path) -> dict[str, Task]:
    if (layout, precision) not in _TASKS:
        tasks = {}
        for name, seed in (("a", 1), ("b", 2)):
            folder = root / f"{layout}-{precision}-{name}"
            module = start_from(layout, pretrained(layout))
            saver = ModelCheckpoint(dirpath=folder / "mc")
            fit = trainer(precision, enable_checkpointing=True, callbacks=[saver], default_root_dir=folder)
            fit.fit(module, data(layout, seed))
            fit.save_checkpoint(folder / "task.ckpt")
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / "module.safetensors")
            if module.inner is not None:
                if layout == "hf":
                    module.inner.save_pretrained(folder / "inner")
                else:  # a plain torch model in a Hugging Face style folder
                    (folder / "inner").mkdir()
                    save_file(module.inner.state_dict(), folder / "inner" / "model.safetensors")
            tasks[name] = Task(module, folder, saver.best_model_path)
        _TASKS[(layout, precision)] = tasks
    return _TASKS[(layout, precision)]


class Probe(Callback):
    """Records the module's weights when the fit starts (the base) and ends (task c's fine-tuned weights)."""

    def on_fit_start(self, trainer, pl_module):
        self.base = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer, pl_module):
        self.finetuned = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


def assert_same_floats(actual, expected, atol: float = 0.0) -> None:
    keys = [k for k, v in expected.items() if v.is_floating_point()]
    assert keys
    for k in keys:
        assert actual[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(actual[k].cpu(), expected[k].cpu(), atol=atol, rtol=0, msg=k)


PRECISIONS = {"32": "32-true", "bf16": "bf16-true", "16": "16-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}
# (layout, source, precision, apply): every pair of values of any two axes appears at least once
CASES = [
    ("one", "save_checkpoint", "32", "merged"),
    ("one", "model_checkpoint", "bf16", "keep"),
    ("one", "inner_folder", "32", "keep"),
    ("one", "module_safetensors", "bf16", "merged"),
    ("one", "in_memory", "32", "merged"),
    ("several", "save_checkpoint", "bf16", "keep"),
    ("several", "model_checkpoint", "32", "merged"),
    ("several", "module_safetensors", "32", "keep"),
    ("several", "in_memory", "bf16", "merged"),
    ("hf", "save_checkpoint", "32", "keep"),
    ("hf", "model_checkpoint", "bf16", "merged"),
    ("hf", "inner_folder", "bf16", "merged"),
    ("hf", "module_safetensors", "32", "merged"),
    ("hf", "in_memory", "bf16", "keep"),
    # fp16 weights, and fp32 weights under bf16 autocast
    ("one", "inner_folder", "16", "merged"),
    ("hf", "module_safetensors", "bf16-mixed", "keep"),
]


def run_callback_case(tmp_path, root, layout, source, precision, apply, accelerator="cpu"):
    tasks = fitted_tasks(layout, PRECISIONS[precision], root)
    search = CASES.index((layout, source, precision, apply)) % 2 == 0 if accelerator == "cpu" else True
    merging = TiesMerging(
        tasks={t: tasks[t].source(source) for t in ("a", "b")}, task="c", k=K,
        lam=LAMS if search else 1.0,
        val_dataloaders={"a": data(layout, 11), "b": data(layout, 12)} if search else None,
        apply=apply, save_dir=str(tmp_path / "merge"),
    )
    probe = Probe()
    fit = trainer(PRECISIONS[precision], accelerator=accelerator, callbacks=[probe, merging])
    module = start_from(layout, pretrained(layout))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        fit.fit(module, data(layout, 3), data(layout, 13) if search else None)
    lam = merging.result.lam
    assert lam in (LAMS if search else [1.0])
    expected = ties_merge(probe.base, [tasks["a"].state, tasks["b"].state, probe.finetuned], k=K, lam=lam)
    return module, merging, probe, expected


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


@pytest.mark.parametrize(("layout", "source", "precision", "apply"), CASES)
def test_callback_ends_with_ties_merge_of_base_and_the_three_tasks(tmp_path, root, layout, source, precision, apply):
    module, merging, probe, expected = run_callback_case(tmp_path, root, layout, source, precision, apply)
    if apply == "merged":
        assert_same_floats(module.state_dict(), expected)
    else:
        assert_same_floats(module.state_dict(), probe.finetuned)  # the fine-tuned weights are kept
        assert_same_floats(load_file(tmp_path / "merge" / "merged.safetensors"), expected)


@pytest.mark.parametrize(
    ("layout", "source", "precision"),
    [("one", "inner_folder", "32"), ("several", "save_checkpoint", "32"), ("hf", "inner_folder", "32"),
     ("hf", "model_checkpoint", "bf16"), ("one", "module_safetensors", "bf16"), ("several", "in_memory", "32")],
)
def test_multitask_module_search_ends_with_ties_merge(root, layout, source, precision):
    tasks = fitted_tasks(layout, PRECISIONS[precision], root)
    c = fitted_tasks(layout, PRECISIONS[precision], root)["b"]  # a third source of another kind: b's file as c
    base = pretrained(layout)
    model = start_from(layout, base).to(next(iter(tasks["a"].state.values())).dtype)
    module = MultiTaskMergeModule(
        model.state_dict(), {"a": tasks["a"].source(source), "b": tasks["b"].source("save_checkpoint"),
                             "c": c.source("in_memory")}, model=model, k=K,
    )
    loaders = {t: data(layout, 20 + i) for i, t in enumerate(("a", "b", "c"))}
    result = module.search(trainer(PRECISIONS[precision]), loaders, lam=LAMS, normalize=False)
    base_state = {k: v.to(tasks["a"].state[k].dtype) for k, v in base.items()}
    expected = ties_merge(base_state, [tasks["a"].state, tasks["b"].state, c.state], k=K, lam=result.lam)
    assert_same_floats(model.state_dict(), expected)


def test_learn_coefficients_with_hf_model_inside_and_save_pretrained_tasks(root):
    tasks = fitted_tasks("hf", "32-true", root)
    base = pretrained("hf")
    model = start_from("hf", base)
    loaders = {t: data("hf", 30 + i, n=16) for i, t in enumerate(("a", "b"))}
    sources = {t: tasks[t].source("inner_folder") for t in ("a", "b")}  # keys "bert...", module's "model.bert..."
    result = learn_coefficients(
        model, sources, loaders, k=K, granularity="task", max_epochs=1, lr=1e-9, holdout=0.0,
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
    )
    assert set(result.state_dict) == set(base)
    # lr=1e-9 leaves the coefficients at their start, lam=1 over TIES components: ties_merge(k, lam=1)
    assert torch.allclose(result.coefficients, torch.ones(2, 1), atol=1e-6)
    expected = ties_merge(base, [tasks["a"].state, tasks["b"].state], k=K, lam=1.0)
    assert_same_floats(result.state_dict, expected, atol=1e-5)


def test_base_is_kept_on_cpu_by_default_and_base_device_is_checked_up_front(tmp_path, root):
    module, merging, probe, expected = run_callback_case(tmp_path, root, "one", "save_checkpoint", "32", "merged")
    assert {v.device.type for v in merging._base_state.values()} == {"cpu"}
    with pytest.raises(ValueError, match="base_device must be .*'nonsense'"):
        TiesMerging(tasks={"a": {"w": torch.zeros(1)}}, base_device="nonsense")


# ---- keys: matched to the module, never guessed ------------------------------------------------------
def test_one_attribute_checkpoint_keeps_its_prefix_and_an_inner_folder_is_mapped_under_it(root):
    tasks = fitted_tasks("one", "32-true", root)
    keys = list(OneAttribute().state_dict())
    as_saved = match_to_module(tasks["a"].source("save_checkpoint"), keys)
    assert sorted(as_saved.keys()) == sorted(keys)
    inner = match_to_module(tasks["a"].source("inner_folder"), keys)
    assert sorted(inner.keys()) == sorted(keys)
    assert torch.equal(inner.get("net.0.weight"), tasks["a"].state["net.0.weight"])
    # a wrapper's checkpoint loaded into the inner model: its "net." is stripped
    wrapper = match_to_module(tasks["a"].source("save_checkpoint"), list(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).state_dict()))
    assert sorted(wrapper.keys()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_two_copies_of_the_architecture_is_one_error_naming_the_prefix_to_pass(root):
    tasks = fitted_tasks("one", "32-true", root)
    keys = [f"{side}.{k}" for side in ("student", "teacher") for k in OneAttribute().net.state_dict()]
    folder = tasks["a"].source("inner_folder")
    with pytest.raises(KeyMatchError, match=r"2 ways.*'student\.'.*'teacher\.'.*source keys look like.*module keys look like.*'prefix': 'student\.'"):
        match_to_module(folder, keys)
    chosen = match_to_module({"path": folder, "prefix": "teacher."}, keys)
    assert sorted(chosen.keys()) == sorted(k for k in keys if k.startswith("teacher."))


# ---- the same on a GPU Trainer ---------------------------------------------------------------------
class DeviceProbe(Callback):
    """Where the merged weights and tau_m live while the evaluator's validation runs."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if isinstance(pl_module, MultiTaskMergeModule) and pl_module.current is not None:
            self.devices.add(next(pl_module.model.parameters()).device.type)
            self.devices.update(v.device.type for v in pl_module.task_vector().values())


@ACCELERATORS
@pytest.mark.parametrize(("layout", "source", "precision", "apply"), [
    ("one", "save_checkpoint", "32", "merged"), ("hf", "inner_folder", "bf16", "merged"), ("hf", "save_checkpoint", "32", "keep"),
    ("several", "module_safetensors", "16-mixed", "merged"),
])
def test_callback_on_a_gpu_trainer_merges_there(tmp_path, root, layout, source, precision, apply, accelerator):
    device_probe = DeviceProbe()
    # mixed precision keeps float32 weights: its tasks are plain float32 fits (fp16 autocast is a GPU thing)
    tasks = fitted_tasks(layout, "32-true" if "mixed" in precision else PRECISIONS[precision], root)
    merging = TiesMerging(tasks={t: tasks[t].source(source) for t in ("a", "b")}, task="c", k=K, lam=LAMS,
                          val_dataloaders={"a": data(layout, 11), "b": data(layout, 12)}, apply=apply,
                          save_dir=str(tmp_path / "merge"))
    probe = Probe()
    module = start_from(layout, pretrained(layout))
    trainer(PRECISIONS[precision], accelerator=accelerator, callbacks=[probe, merging, device_probe]).fit(
        module, data(layout, 3), data(layout, 13))
    assert device_probe.devices == {DEVICE_TYPE[accelerator]}  # candidates applied on the GPU with tau_m kept there
    assert {v.device.type for v in merging._base_state.values()} == {"cpu"}  # base_device="cpu" by default
    expected = ties_merge(probe.base, [tasks["a"].state, tasks["b"].state, probe.finetuned], k=K, lam=merging.result.lam)
    atol = 1e-2 if precision in ("bf16", "16") else 1e-5  # the GPU sums in another order; 16-bit rounds once more
    merged = module.state_dict() if apply == "merged" else load_file(tmp_path / "merge" / "merged.safetensors")
    assert_same_floats(merged, expected, atol=atol)


@ACCELERATORS
def test_multitask_module_search_on_gpu_keeps_tau_on_gpu(root, accelerator):
    tasks = fitted_tasks("hf", "32-true", root)
    base = pretrained("hf")
    model = start_from("hf", base)
    module = MultiTaskMergeModule(base, {t: tasks[t].source("inner_folder") for t in ("a", "b")}, model=model, k=K)
    loaders = {t: data("hf", 20 + i) for i, t in enumerate(("a", "b"))}
    result = module.search(trainer(accelerator=accelerator), loaders, lam=LAMS, normalize=False)
    assert {v.device.type for v in module.task_vector().values()} == {DEVICE_TYPE[accelerator]}
    expected = ties_merge(base, [tasks["a"].state, tasks["b"].state], k=K, lam=result.lam)
    assert_same_floats(model.state_dict(), expected, atol=1e-5)


class CoefficientDevice(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.devices = {pl_module.coefficients.device.type, *(b.device.type for b in pl_module.components.buffers())}


@ACCELERATORS
def test_learn_coefficients_trains_on_the_gpu(root, accelerator):
    tasks = fitted_tasks("hf", "32-true", root)
    base = pretrained("hf")
    probe = CoefficientDevice()
    result = learn_coefficients(
        start_from("hf", base), {t: tasks[t].source("inner_folder") for t in ("a", "b")},
        {t: data("hf", 30 + i) for i, t in enumerate(("a", "b"))}, k=K, granularity="task", max_epochs=1, lr=1e-9,
        holdout=0.0, trainer_kwargs={"accelerator": accelerator, "devices": 1, "callbacks": [probe],
                                     "enable_progress_bar": False, "enable_model_summary": False},
    )
    assert probe.devices == {DEVICE_TYPE[accelerator]}
    expected = ties_merge(base, [tasks["a"].state, tasks["b"].state], k=K, lam=1.0)
    assert_same_floats(result.state_dict, expected, atol=1e-5)
