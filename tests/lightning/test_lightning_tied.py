"""Tied weights (``out.weight`` is ``emb.weight``) in the Lightning layer, under each Lightning package.

Given a LightningModule whose output layer shares the embedding's weight, when ``TiesMerging`` merges at fit end,
or ``MultiTaskMergeModule`` merges a base given as a module, as a state dict or as a file (which stores the tied
tensor under both names), then the tied tensor is merged once, as ``ties_merge`` merges it: the global trim's
threshold counts its entries once, and every weight equals ``ties_merge``'s. Copying each name on its own (the
code before) counted the embedding twice and gave another merge (up to 1.08 apart on this model).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties import ties_merge
from lightning_ties.io import save_safetensors


def _tied_class(pl):
    class Tied(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(32, 8)
            self.body = nn.Linear(8, 8)
            self.out = nn.Linear(8, 32, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.body(self.emb(x))))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    return Tied


def _data(seed: int) -> DataLoader:
    x = torch.randint(0, 32, (64,), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, (x * (seed + 2)) % 32), batch_size=16)


def _trainer(pl, **kwargs):
    return pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", **kwargs)


def _tuned(pl, tied, seed: int):
    model = tied()
    _trainer(pl).fit(model, _data(seed))
    return model


def test_the_callback_merges_a_tied_weight_once_as_ties_merge(lightning_package, tmp_path):
    pl, layer = lightning_package
    tied = _tied_class(pl)
    a, b = _tuned(pl, tied, 1), _tuned(pl, tied, 2)

    class Finetuned(pl.Callback):  # before TiesMerging's fit end: this run's fine-tuned weights
        def on_fit_end(self, trainer, pl_module):
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    seen, model = Finetuned(), tied()
    merging = layer.TiesMerging(tasks={"a": a, "b": b}, task="c", k=0.2, lam=1.0, save_dir=str(tmp_path / "s"))
    _trainer(pl, callbacks=[seen, merging], default_root_dir=tmp_path).fit(model, _data(3))
    c = tied()
    c.load_state_dict(seen.state)
    want = ties_merge(tied(), [a, b, c], k=0.2, lam=1.0)
    assert "tied to 'emb.weight'" in want.report.skipped["out.weight"]
    assert model.out.weight is model.emb.weight
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_the_merge_module_merges_a_tied_weight_once_from_a_module_a_state_dict_or_a_file(lightning_package, tmp_path):
    pl, layer = lightning_package
    tied = _tied_class(pl)
    base, a, b = tied(), _tuned(pl, tied, 1), _tuned(pl, tied, 2)
    want = ties_merge(base, [a, b], k=0.2, lam=1.0)
    save_safetensors(base.state_dict(), tmp_path / "base.safetensors")  # both names, two copies in the file
    for given in (base, base.state_dict(), str(tmp_path / "base.safetensors")):
        module = layer.MultiTaskMergeModule(given, {"a": a, "b": b}, model=tied())
        module.apply_merge(0.2, 1.0)
        assert module.model.out.weight is module.model.emb.weight
        for key, value in module.model.state_dict().items():
            assert torch.equal(value, want[key]), (type(given).__name__, key)


def test_a_base_read_back_from_its_file_on_resume_is_tied_as_the_module(lightning_package, tmp_path):
    # a resumed fit reads the captured base from save_dir/base.safetensors, which holds the tied tensor twice
    from lightning_ties.core.base_state import capture_base, clone_state

    pl, _ = lightning_package
    module = _tied_class(pl)()
    captured = clone_state(module)
    assert captured["out.weight"] is captured["emb.weight"]
    save_safetensors(captured, tmp_path / "base.safetensors")
    read = capture_base(str(tmp_path / "base.safetensors"), module, torch.device("cpu"))
    assert read["out.weight"] is read["emb.weight"] and torch.equal(read["emb.weight"], module.emb.weight)


def test_a_base_listing_a_tied_tensor_in_another_order_than_the_module_is_merged_once(lightning_package):
    # the base's own tie (second name in sorted order) and the module's (other order) once named each other: both
    # names were skipped as "tied", and the tensor was never merged
    pl, layer = lightning_package
    tied = _tied_class(pl)
    base, a, b = tied(), _tuned(pl, tied, 1), _tuned(pl, tied, 2)
    want = ties_merge(base, [a, b], k=0.2, lam=1.0)
    reordered = dict(sorted(base.state_dict().items()))  # out.weight after emb.weight... and body before both
    reordered = {"out.weight": reordered.pop("out.weight"), **reordered}
    module = layer.MultiTaskMergeModule(reordered, {"a": a, "b": b}, model=tied())
    module.apply_merge(0.2, 1.0)
    assert not torch.equal(module.model.emb.weight, base.emb.weight)
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_weights_to_score_may_hold_a_tied_tensor_under_one_name(lightning_package, tmp_path):
    from lightning_ties.pytorch.scoring import check_weights

    pl, layer = lightning_package
    tied = _tied_class(pl)
    base, a = tied(), _tuned(pl, tied, 1)
    module = layer.MultiTaskMergeModule(base.state_dict(), {"a": a}, model=tied())
    one_name = {k: v for k, v in a.state_dict().items() if k != "out.weight"}  # as save_pretrained writes it
    check_weights(module, one_name)
    with pytest.raises(ValueError, match=r"'emb.weight' \(32, 8\) missing"):
        check_weights(module, {k: v for k, v in one_name.items() if k != "emb.weight"})
