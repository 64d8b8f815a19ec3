"""MultiTaskMergeModule given its model as a factory, in one process, through a real Trainer of each package.

Given a base and task checkpoints as files and ``model=`` a function that builds the model, when the module is built,
then the model holds no parameter memory; when a Trainer evaluates (normalized: each task's own weights first) and
searches it, then Lightning's ``configure_model`` fills it from the base on the Trainer's device, and every score,
candidate and merged weight equals those of the module given the model built with its weights. Under
``ModelParallelStrategy`` each rank fills only its rows: tests/lightning/test_lightning_sharded_module.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties.io import save_safetensors


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 5)])
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def _files(folder) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(v.shape, generator=g) for k, v in Net().state_dict().items()}
    save_safetensors(base, folder / "base.safetensors")
    tasks = {}
    for t in ("a", "b"):
        save_safetensors({k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                         folder / f"{t}.safetensors")
        tasks[t] = str(folder / f"{t}.safetensors")
    return str(folder / "base.safetensors"), tasks, base


def _loaders() -> dict[str, DataLoader]:
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(5))
    return {t: DataLoader(TensorDataset(x, x[:, i : i + 3].argmax(1)), batch_size=8) for i, t in enumerate("ab")}


def test_a_factorys_model_is_filled_by_the_trainer_and_merges_as_the_built_one(lightning_package, tmp_path):
    pl, layer = lightning_package
    base_file, tasks, base = _files(tmp_path)
    built_net = Net()
    built_net.load_state_dict(base)
    options = dict(heads=r"^head\.", k=0.3, lam=0.8, exclude=r"^blocks\.0\.bias$")  # one key the merge leaves alone
    lazy = layer.MultiTaskMergeModule(base_file, tasks, model=Net, **options)
    built = layer.MultiTaskMergeModule(base_file, tasks, model=built_net, **options)
    assert all(p.is_meta for p in lazy.model.parameters())
    runs = {}
    for name, module in (("lazy", lazy), ("built", built)):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        scores = module.evaluate(trainer, _loaders(), normalize=True)
        result = module.search(trainer, _loaders(), k=[0.2, 0.5], lam=[0.5, 1.0])
        runs[name] = (scores, module.reference, [(c.k, c.lam, c.objective) for c in result.candidates],
                      {k: v.clone() for k, v in module.model.state_dict().items()})
    assert runs["lazy"][:3] == runs["built"][:3]
    assert len({c[2] for c in runs["built"][2]}) > 1  # the candidates' scores tell them apart
    for key, value in runs["built"][3].items():
        assert torch.equal(runs["lazy"][3][key], value), key
    assert torch.equal(lazy.model.blocks[0].bias, base["blocks.0.bias"])


def test_a_search_first_waits_for_configure_model_to_fill_the_model(lightning_package, tmp_path):
    # search without references as the first call: tau_m of the first k is not computed (nor the model filled,
    # whole on the CPU) before the Trainer has set the model up (under ModelParallelStrategy: sharded it)
    pl, layer = lightning_package
    base_file, tasks, _ = _files(tmp_path)
    seen = []

    class Spy(layer.MultiTaskMergeModule):
        def configure_model(self) -> None:
            seen.append(all(p.is_meta for p in self.model.parameters()))
            super().configure_model()

    module = Spy(base_file, tasks, model=Net, heads=r"^head\.")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    result = module.search(trainer, _loaders(), k=[0.2, 0.5], lam=[1.0], normalize=False)
    assert seen[0] is True and len(result.candidates) == 2


def _trainer(pl, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, **kwargs)


def test_a_search_resumed_whole_lets_the_trainer_set_the_model_up_before_writing_the_best(lightning_package,
                                                                                           tmp_path):
    # every candidate already scored (a checkpoint's search): no candidate's pass runs, yet the best must be written
    # where the Trainer puts the model (under ModelParallelStrategy: into its shards), not filled whole beforehand
    pl, layer = lightning_package
    base_file, tasks, _ = _files(tmp_path)
    first = layer.MultiTaskMergeModule(base_file, tasks, model=Net, heads=r"^head\.")
    done = first.search(_trainer(pl), _loaders(), k=[0.2, 0.5], lam=[0.5, 1.0], normalize=False)
    seen = []

    class Spy(layer.MultiTaskMergeModule):
        def configure_model(self) -> None:
            seen.append(all(p.is_meta for p in self.model.parameters()))
            super().configure_model()

    resumed = Spy(base_file, tasks, model=Net, heads=r"^head\.")
    resumed.search_result = done
    scored = []
    result = resumed.search(_trainer(pl), _loaders(), k=[0.2, 0.5], lam=[0.5, 1.0], normalize=False,
                            on_candidate=scored.append)
    assert scored == [] and len(result.candidates) == 4  # nothing scored again
    assert seen == [True]  # the Trainer set the model up (filled it) before the best was written
    assert resumed.current == first.current == (result.k, result.lam)
    assert resumed.last_scores == result.best.scores
    for key, value in first.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_trainer_that_runs_no_validation_batch_is_an_error_not_the_last_passs_scores(lightning_package, tmp_path):
    pl, layer = lightning_package
    base_file, tasks, _ = _files(tmp_path)
    module = layer.MultiTaskMergeModule(base_file, tasks, model=Net, heads=r"^head\.")
    before = module.evaluate(_trainer(pl), _loaders(), k=0.2, lam=1.0)
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"no validation batch \(limit_val_batches=0.*'a': \[3\]"):
        module.evaluate(_trainer(pl, limit_val_batches=0), _loaders(), k=0.5, lam=0.3)
    assert module.current == (0.2, 1.0) and module.last_scores == {}  # the merge in place is still the last scored
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in weights.items())
    empty = {t: DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=8)
             for t in "ab"}
    with pytest.raises(RuntimeError, match=r"'a': \[0\], 'b': \[0\]"):
        module.evaluate(_trainer(pl), empty, k=0.5, lam=0.3)
    assert module.evaluate(_trainer(pl), _loaders(), k=0.2, lam=1.0) == before
