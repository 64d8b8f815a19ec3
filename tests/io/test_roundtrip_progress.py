"""merge_to's bar counts bytes of merged output (its ETA holds when tensor sizes vary)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tqdm import tqdm as real_tqdm

import lightning_ties.io.stream as stream
from lightning_ties.io import merge_to

BARS: list[real_tqdm] = []


class RecordingBar(real_tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = False
        kwargs["file"] = open("/dev/null", "w")
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []
        BARS.append(self)

    def update(self, n=1):
        self.steps.append(n)
        return super().update(n)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stream, "tqdm", RecordingBar)
    BARS.clear()
    base = {"big": torch.zeros(64, 32), "small": torch.zeros(3), "half": torch.zeros(10, dtype=torch.float16),
            "count": torch.zeros(2, dtype=torch.long)}
    save_file(base, "base.safetensors")
    save_file({k: v + 1 for k, v in base.items()}, "ft.safetensors")
    return 64 * 32 * 4 + 3 * 4 + 10 * 2  # the merged (floating) tensors' bytes, as written


@pytest.mark.parametrize("method, params, passes", [
    ("ties", {"k": 0.5}, 2),  # global trim: a thresholds pass reads every tensor first
    ("ties", {"k": 0.5, "scope": "per_tensor"}, 1),
    ("task_arithmetic", {}, 1),
    ("tsv", {}, 1),
])
def test_the_bar_total_is_the_bytes_of_the_merged_output(files, method, params, passes):
    merge_to("out.safetensors", "base.safetensors", ["ft.safetensors"], method, progress=True, **params)
    (bar,) = BARS
    assert bar.unit == "B" and bar.total == passes * files and bar.n == bar.total
    assert max(bar.steps) >= 64 * 32 * 4 > 10 * max(s for s in bar.steps if s < 64 * 32 * 4)  # big tensors weigh more


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "ace", "wudi"])
def test_per_tensor_methods_show_their_preparation_in_bytes(monkeypatch, method):
    import tqdm.auto

    from lightning_ties.core.merger import Merger

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    BARS.clear()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3))
    tasks = {t: {k: v + 0.1 * torch.randn_like(v) for k, v in base.state_dict().items()} for t in ("a", "b")}
    merger = Merger(base, tasks, method=method)
    merger.task_vector()
    (bar,) = BARS
    assert bar.desc.startswith(f"preparing {method}") and bar.unit == "B"
    assert bar.total == bar.n == sum(v.numel() * 4 for v in base.state_dict().values())


def test_trim_methods_read_base_without_a_preparation_bar(monkeypatch):
    import tqdm.auto

    from lightning_ties.core.merger import Merger

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    BARS.clear()
    base = torch.nn.Linear(4, 2)
    Merger(base, {t: base.state_dict() for t in ("a", "b")}, method="ties").task_vector()
    assert BARS == []
