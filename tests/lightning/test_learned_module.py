"""Learned merging coefficients: LearnedMergeModule and learn_coefficients on tiny models."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties import merged_task_vector, task_arithmetic, ties_merge
from lightning_ties.lightning.learned import (
    LearnedMergeModule,
    TaskComponents,
    default_group,
    group_keys,
    learn_coefficients,
)
from lightning_ties.merging import MergeSpec

import conftest

QUIET = {**conftest.QUIET, "num_sanity_val_steps": 0}


class Net(nn.Module):
    """Two 'layers' (groups layers.0. and layers.2.) and a head."""

    def __init__(self, n_out: int = 3, n_in: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def fine_tuned(base: nn.Module, seed: int, n_out: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items() if not k.startswith("head.")}
    out["head.weight"] = torch.randn(n_out, 6, generator=g)
    out["head.bias"] = torch.randn(n_out, generator=g)
    return out


def labelled(n_out: int, seed: int, n: int = 40, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, n_out, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    base = Net(n_out=3)
    tasks = {"a": fine_tuned(base, 1, n_out=3), "b": fine_tuned(base, 2, n_out=2)}
    loaders = {"a": labelled(3, 10), "b": labelled(2, 11)}
    return base, tasks, loaders


def body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


# ---- groups -------------------------------------------------------------------------------
def test_default_group_is_the_block_prefix():
    assert default_group("encoder.layer.11.output.dense.weight") == "encoder.layer.11."
    assert default_group("embeddings.LayerNorm.weight") == "embeddings."
    assert default_group("bias") == "bias"


def test_group_patterns_take_precedence_and_must_match():
    keys = ["enc.0.w", "enc.1.w", "enc.2.w", "emb.w"]
    groups, index = group_keys(keys, "layer", [r"enc\.[01]\."])
    assert groups == ["enc.0.", "enc.1.", "enc.2.", "emb."] and index == [0, 1, 2, 3]
    groups, index = group_keys(keys, "layer", [r"enc\.\d+"])  # one pattern, per-match labels
    assert index == [0, 1, 2, 3]
    groups, index = group_keys(keys, "layer", [r"enc\."])  # all encoder blocks in one group
    assert groups == ["enc.", "emb."] and index == [0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"group pattern\(s\) \['dec'\] match no merged key"):
        group_keys(keys, "layer", ["dec"])
    assert group_keys(keys, "task")[1] == [0, 0, 0, 0]
    assert group_keys(keys, "tensor")[1] == [0, 1, 2, 3]


# ---- components ---------------------------------------------------------------------------
def test_trimmed_components_are_stored_sparsely_and_sum_to_tau_m(setup):
    base, tasks, _ = setup
    module = LearnedMergeModule(base, tasks, {"a": labelled(3, 0)}, k=0.2, holdout=0.0)
    tau = merged_task_vector(base, list(tasks.values()), MergeSpec(k=0.2), exclude=r"^head\.")
    comps = module.components
    assert set(comps.layouts) == {"sparse"}
    nnz = sum(int(torch.count_nonzero(comps.stacked(k))) for k in tau)
    assert nnz <= 0.4 * sum(t.numel() for t in tau.values())  # each task keeps k=20%
    # float32 value + int32 index per kept entry, plus one count per task and key
    assert comps.nbytes() == 8 * nnz + 8 * 2 * len(tau)
    for key, t in tau.items():
        torch.testing.assert_close(comps.stacked(key).sum(0), t, atol=1e-6, rtol=0)


def test_dense_components_when_sparse_saves_nothing():
    comps = TaskComponents(2)
    comps.add("w", torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]]))
    assert comps.layouts == ["dense"]
    torch.testing.assert_close(comps.merged("w", torch.ones(3), torch.tensor([2.0, -1.0])), torch.tensor([3.0, 4.0, 6.0]))
    torch.testing.assert_close(comps.stacked("w"), torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]]))


def test_keys_no_task_changes_stay_base_and_outside_the_graph(setup):
    base, tasks, loaders = setup
    untouched = {t: {**sd, "layers.0.weight": base.state_dict()["layers.0.weight"].clone()} for t, sd in tasks.items()}
    module = LearnedMergeModule(base, untouched, loaders, k=0.2, holdout=0.0)
    assert module.components.layouts[module.components.keys.index("layers.0.weight")] == "empty"
    assert "layers.0.weight" not in module.merged_parameters()
    assert torch.equal(module.merged_state_dict()["layers.0.weight"], base.state_dict()["layers.0.weight"])
    assert torch.equal(module.components.stacked("layers.0.weight"), torch.zeros(2, 6, 4))


# ---- initialisation equals the chosen merge -------------------------------------------------
@pytest.mark.parametrize("granularity", ["task", "layer", "tensor"])
def test_first_forward_equals_ties_merge(setup, granularity):
    base, tasks, loaders = setup
    expected = ties_merge(base, list(tasks.values()), k=0.2, lam=1.0, exclude=r"^head\.")
    module = LearnedMergeModule(base, tasks, loaders, k=0.2, granularity=granularity, holdout=0.0)
    n_groups = {"task": 1, "layer": 2, "tensor": 4}[granularity]
    assert module.coefficients.shape == (2, n_groups)
    assert module.head_keys == ["head.weight", "head.bias"]
    merged = module.merged_state_dict(task="b")
    for key in module.plan.merge_keys:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    x = torch.randn(5, 4)
    want = functional_call(Net(n_out=2), {**body(expected), "head.weight": tasks["b"]["head.weight"],
                                          "head.bias": tasks["b"]["head.bias"]}, (x,))
    got = module.task_forward("b", (x, None), module.merged_parameters())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_separate_base_is_written_into_the_model_architecture(setup):
    base, tasks, loaders = setup
    architecture = Net(n_out=3)  # other random weights
    module = LearnedMergeModule(architecture, tasks, loaders, base=base.state_dict(), holdout=0.0)
    expected = ties_merge(base, list(tasks.values()), k=0.2, lam=1.0, exclude=r"^head\.")
    merged = module.merged_state_dict()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="has no parameter"):
        LearnedMergeModule(Net(), tasks, loaders, method="task_arithmetic", k=0.3)


def test_first_forward_equals_task_arithmetic_and_scaled_ties(setup):
    base, tasks, loaders = setup
    module = LearnedMergeModule(base, tasks, loaders, method="task_arithmetic", holdout=0.0)
    assert float(module.coefficients[0, 0]) == pytest.approx(0.4)  # the registry's default lam
    expected = task_arithmetic(base, list(tasks.values()), lam=0.4, exclude=r"^head\.")
    merged = module.merged_state_dict()
    for key in module.plan.merge_keys:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    module = LearnedMergeModule(base, tasks, loaders, k=0.5, lam=1.7, holdout=0.0)
    expected = ties_merge(base, list(tasks.values()), k=0.5, lam=1.7, exclude=r"^head\.")
    merged = module.merged_state_dict()
    for key in module.plan.merge_keys:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)


# ---- training -------------------------------------------------------------------------------
def test_only_coefficients_receive_gradients(setup):
    base, tasks, loaders = setup
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    module = LearnedMergeModule(base, tasks, loaders, k=0.2, granularity="layer", lr=0.05)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["coefficients"]
    comps_before = {k: module.components.stacked(k) for k in module.components.keys}
    heads_before = {t: module.head_state_dict(t) for t in module.tasks}
    seen = {}

    class GradProbe(Callback):
        def on_after_backward(self, trainer, pl_module):
            seen["coef"] = pl_module.coefficients.grad is not None and bool(pl_module.coefficients.grad.abs().sum() > 0)
            seen["others"] = [n for n, p in pl_module.named_parameters() if n != "coefficients" and p.grad is not None]

    pl.Trainer(max_epochs=2, callbacks=[GradProbe()], **QUIET).fit(module)
    assert seen == {"coef": True, "others": []}
    assert not torch.equal(module.coefficients.detach(), module.initial_coefficients)
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    for k, v in comps_before.items():
        assert torch.equal(module.components.stacked(k), v), k
    for t, head in heads_before.items():
        for k, v in head.items():
            assert torch.equal(module.head_state_dict(t)[k], v)


class Linear2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_training_moves_coefficients_towards_the_helpful_task():
    """Task a's vector is the true classifier, task b's its opposite: lam_a grows, lam_b shrinks."""
    base = Linear2()
    with torch.no_grad():
        base.fc.weight.zero_()
    u = torch.tensor([1.0, -2.0, 0.5])
    truth = torch.stack([-u, u])
    tasks = {"a": {"fc.weight": truth.clone()}, "b": {"fc.weight": -truth.clone()}}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = (x @ u > 0).long()
    loaders = {t: DataLoader(TensorDataset(x, y), batch_size=16) for t in tasks}
    result = learn_coefficients(base, tasks, loaders, method="task_arithmetic", lam=0.5, granularity="task",
                                lr=0.1, max_epochs=6, trainer_kwargs=QUIET)
    lam_a, lam_b = result.coefficients[:, 0].tolist()
    assert lam_a > 0.8 and lam_b < 0.2, (lam_a, lam_b)
    assert result.history[0]["stage"] == "init"
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["acc"] > 0.9


def test_entropy_objective_learns_without_labels(setup):
    base, tasks, _ = setup
    g = torch.Generator().manual_seed(3)
    unlabelled = {t: DataLoader(TensorDataset(torch.randn(32, 4, generator=g)), batch_size=8) for t in tasks}
    result = learn_coefficients(base, tasks, unlabelled, objective="entropy", granularity="layer", lr=0.05,
                                max_epochs=3, trainer_kwargs=QUIET)
    assert not torch.equal(result.coefficients, result.initial_coefficients)
    assert "a/acc" not in result.history[-1] and result.history[-1]["a/loss"] > 0
    with pytest.raises(ValueError, match="no labels.*objective='entropy'"):
        learn_coefficients(base, tasks, unlabelled, objective="ce", max_epochs=1, trainer_kwargs=QUIET)


def test_l2_pull_keeps_coefficients_near_init(setup):
    base, tasks, loaders = setup
    free = learn_coefficients(base, tasks, loaders, lr=0.1, max_epochs=3, holdout=0.0, trainer_kwargs=QUIET)
    pulled = learn_coefficients(base, tasks, loaders, lr=0.1, max_epochs=3, holdout=0.0, l2=100.0, trainer_kwargs=QUIET)
    drift = lambda r: float((r.coefficients - r.initial_coefficients).abs().sum())  # noqa: E731
    assert drift(pulled) < 0.5 * drift(free)


def test_user_validation_step_loss_is_the_objective():
    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x):
            return self.fc(x)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x).squeeze(-1), y)

    base = Regressor()
    with torch.no_grad():
        base.fc.weight.zero_()
        base.fc.bias.zero_()
    tasks = {"a": {"fc.weight": torch.tensor([[1.0, 2.0]]), "fc.bias": torch.tensor([0.0])}}
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([2.0, 4.0])  # the best coefficient is 2
    loaders = {"a": DataLoader(TensorDataset(x, y), batch_size=8)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = learn_coefficients(base, tasks, loaders, method="task_arithmetic", lam=1.0, granularity="task",
                                    objective="validation_step", lr=0.1, max_epochs=20, holdout=0.0,
                                    trainer_kwargs=QUIET)
    assert float(result.coefficients[0, 0]) == pytest.approx(2.0, abs=0.15)


# ---- export and results ------------------------------------------------------------------------
def test_export_equals_the_modules_functional_parameters(setup):
    base, tasks, loaders = setup
    module = LearnedMergeModule(base, tasks, loaders, k=0.2, granularity="tensor", lr=0.05)
    pl.Trainer(max_epochs=2, **QUIET).fit(module)
    final = module.final_coefficients()
    exported = module.merged_state_dict(task="a")
    fresh = Net(n_out=3)
    fresh.load_state_dict(exported, strict=True)
    x = torch.randn(7, 4)
    with torch.no_grad():
        want = module.task_forward("a", (x, None), module.merged_parameters(final))
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    result_table = module.coefficient_table()
    assert list(result_table) == ["a", "b"] and len(result_table["a"]) == 4
    report = module.report().to_dict()
    assert report["method"] == "learned" and report["params"]["coefficients"] == result_table


def test_learn_coefficients_picks_the_best_holdout_coefficients(setup):
    base, tasks, loaders = setup
    result = learn_coefficients(base, tasks, loaders, lr=0.05, max_epochs=4, trainer_kwargs=QUIET)
    scores = [h["loss"] for h in result.history]
    best = min(range(len(scores)), key=scores.__getitem__)
    assert len(scores) == 5  # the initial coefficients, then each epoch
    if best == 0:
        assert torch.equal(result.coefficients, result.initial_coefficients) and result.best_epoch is None
    else:
        assert result.best_epoch == result.history[best]["epoch"]
    net = Net(n_out=2)
    net.load_state_dict(result.task_state_dict("b"), strict=True)
    assert result.to_dict()["coefficients"] == result.coefficient_table()


def test_shared_output_model_uses_one_merged_model_for_every_task():
    torch.manual_seed(0)
    base = Net(n_out=3)
    tasks = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()} for t in ("a", "b")}
    module = LearnedMergeModule(base, tasks, {"a": labelled(3, 1), "b": labelled(3, 2)}, k=0.5, holdout=0.0)
    assert module.head_keys == [] and len(module.groups) == 3  # layers.0., layers.2., head.
    x = torch.randn(3, 4)
    params = module.merged_parameters()
    torch.testing.assert_close(module.task_forward("a", (x, None), params), module.task_forward("b", (x, None), params))


def test_result_saves_through_the_io_sinks_with_its_coefficients(setup, tmp_path):
    import json

    from safetensors import safe_open

    from lightning_ties.io import load_torch_file
    from lightning_ties.lightning.learned import plot_coefficients

    base, tasks, loaders = setup
    result = learn_coefficients(base, tasks, loaders, lr=0.05, max_epochs=1, trainer_kwargs=QUIET)
    want = result.task_state_dict("a")
    path = result.save(tmp_path / "a.safetensors", task="a")
    with safe_open(str(path), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in want.items())
        assert json.loads(f.metadata()["lightning_ties.learned"])["coefficients"] == result.coefficient_table()
    ckpt = load_torch_file(result.save(tmp_path / "a.ckpt", task="a"))
    assert torch.equal(ckpt["state_dict"]["head.weight"], want["head.weight"])
    assert ckpt["hyper_parameters"]["learned_merge"]["groups"] == result.groups
    folder = result.save(tmp_path / "merged", task="b")
    card = (folder / "README.md").read_text()
    assert "| task | layers.0 | layers.2 |" in card and f"{result.coefficients[1, 0]:.3f}" in card
    assert json.loads((folder / "learned_merge.json").read_text())["head_of"] == "b"
    from huggingface_hub import ModelCard

    hub_card = ModelCard.load(folder / "README.md")  # the io layer's one card writer: a Hub card
    assert "learned-merging-coefficients" in hub_card.data.tags and hub_card.data.library_name == "lightning-ties"
    assert hub_card.data.learned_groups == result.groups
    with pytest.raises(FileExistsError):
        result.save(folder)
    png = plot_coefficients(result.coefficient_table(), tmp_path / "lam.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---- checkpoints ----------------------------------------------------------------------------
class CoefficientsAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.coefficients = pl_module.coefficients.detach().clone()
        self.step = trainer.global_step


def test_resume_from_checkpoint_continues_training(setup, tmp_path):
    base, tasks, loaders = setup
    make = lambda: LearnedMergeModule(base, tasks, loaders, k=0.2, lr=0.05)  # noqa: E731
    first = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    opts = {**QUIET, "enable_checkpointing": True, "default_root_dir": tmp_path}
    pl.Trainer(max_epochs=2, callbacks=[ckpt], **opts).fit(first)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == {"coefficients", "initial_coefficients", "best_coefficients", "best_score"}
    torch.testing.assert_close(saved["state_dict"]["coefficients"], first.coefficients.detach())

    second, probe = make(), CoefficientsAtStart()
    trainer = pl.Trainer(max_epochs=4, callbacks=[probe], **opts)
    trainer.fit(second, ckpt_path=tmp_path / "last.ckpt")
    steps_per_epoch = len(first.train_dataloader()["a"])
    assert probe.step == 2 * steps_per_epoch and trainer.global_step == 4 * steps_per_epoch
    torch.testing.assert_close(probe.coefficients, first.coefficients.detach())
    assert len(second.history) == len(first.history) + 2
    assert not torch.equal(second.coefficients.detach(), first.coefficients.detach())

    other = LearnedMergeModule(base, tasks, loaders, k=0.2, granularity="tensor")
    with pytest.raises(ValueError, match="same tasks and granularity"):
        pl.Trainer(max_epochs=5, **opts).fit(other, ckpt_path=tmp_path / "last.ckpt")


# ---- bad input ----------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_message(setup):
    base, tasks, loaders = setup
    with pytest.raises(ValueError, match="unknown granularity 'block'"):
        LearnedMergeModule(base, tasks, loaders, granularity="block")
    with pytest.raises(ValueError, match=r"group pattern\(s\) \['decoder'\] match no merged key"):
        LearnedMergeModule(base, tasks, loaders, groups=["decoder"])
    with pytest.raises(ValueError, match="no dataloaders"):
        LearnedMergeModule(base, tasks, {})
    with pytest.raises(ValueError, match=r"dataloaders\['a'\] is empty"):
        LearnedMergeModule(base, tasks, {"a": DataLoader(TensorDataset(torch.empty(0, 4), torch.empty(0)))})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]"):
        LearnedMergeModule(base, tasks, {**loaders, "c": loaders["a"]})
    with pytest.raises(ValueError, match="unknown objective 'mse'"):
        LearnedMergeModule(base, tasks, loaders, objective="mse")
    with pytest.raises(ValueError, match="holdout must be"):
        LearnedMergeModule(base, tasks, loaders, holdout=1.5)
    with pytest.raises(ValueError, match=r"heads pattern\(s\) \['classifier'\] match no key"):
        LearnedMergeModule(base, tasks, loaders, heads="classifier")
    with pytest.raises(ValueError, match="task 'b' lacks head key"):
        LearnedMergeModule(base, {"a": tasks["a"], "b": body(tasks["b"])}, loaders)
    with pytest.raises(ValueError, match="pass model="):
        learn_coefficients(base.state_dict(), tasks, loaders)
    with pytest.raises(ValueError, match="cannot be split with holdout"):
        LearnedMergeModule(base, tasks, {"a": labelled(3, 0, n=1)}, holdout=0.2)


def test_a_method_without_per_task_shares_is_refused_before_any_work():
    from torch import nn

    from torch.utils.data import DataLoader, TensorDataset

    base = nn.Linear(2, 2)
    loader = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="iso_c.*no coefficients to learn.*tsv"):
        LearnedMergeModule(base, {"a": base.state_dict()}, {"a": loader}, method="iso_c", holdout=0.0)


def test_tied_embeddings_saved_under_one_name_are_learned_from_not_refused_as_a_missing_head(tmp_path):
    # save_pretrained keeps one name of a tied weight (no lm_head.weight in the files): the other entry points merge
    # such folders; the learned path took the absent name for a head every task lacks and refused them
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    tasks = {}
    for name in "ab":
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
        tasks[name] = str(tmp_path / name)
    x = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(1))
    loaders = {t: DataLoader([{"input_ids": row, "labels": row % 3} for row in x], batch_size=4) for t in tasks}
    module = LearnedMergeModule(LlamaForCausalLM(config), tasks, loaders, base=str(tmp_path / "base"), k=0.2,
                                granularity="task", objective="entropy", holdout=0.0)
    assert module.head_keys == []
    expected = ties_merge(str(tmp_path / "base"), list(tasks.values()), k=0.2, lam=1.0)
    merged = module.merged_state_dict()
    for key in module.plan.merge_keys:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert merged["lm_head.weight"] is not merged["model.embed_tokens.weight"]  # a state dict safetensors can save
