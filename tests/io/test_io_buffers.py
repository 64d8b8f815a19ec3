"""Large tensors are read into one reused buffer per source, never under a tensor someone still holds.

``RecentTensorCache`` reads tensors over a size (1 MiB; lowered here) into a buffer it keeps,
so the next large one lands in memory already mapped instead of fresh pages. Given files with
several large tensors, the reads give the file's values, reuse the memory when nobody kept the
previous tensor, and take new memory when a view of it is still alive (a write in flight); a
whole ``merge_to`` with every tensor over the lowered size writes the same bytes as with none.
"""

from __future__ import annotations

import filecmp

import pytest
import torch
from safetensors.torch import save_file

from lightning_ties.io import merge_to, open_source, stream
from lightning_ties.io.stream import RecentTensorCache, WriteBehind


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("buffers")
    g = torch.Generator().manual_seed(0)
    shapes = {"emb": (300, 16), "a.weight": (64, 16), "a.bias": (64,), "head": (300, 16), "norm": (16,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = []
    for i in range(4):
        tensors = {k: v + torch.randn(v.shape, generator=g) * 0.01 if i else v for k, v in base.items()}
        tensors["half"] = (torch.randn(200, 8, generator=g)).bfloat16()
        (root / f"m{i}").mkdir()
        save_file(tensors, str(root / f"m{i}" / "model.safetensors"))
        paths.append(root / f"m{i}")
    return paths


def test_large_tensors_reuse_one_buffer_when_nobody_holds_the_last_one(folders, monkeypatch):
    monkeypatch.setattr(stream, "_REUSED_BUFFER_BYTES", 1000)
    source = open_source(folders[1])
    cache = RecentTensorCache(source)
    # when two large tensors are read one after the other, the first let go of
    first = cache.get("emb")
    assert torch.equal(first, source.get("emb"))
    pointer = first.data_ptr()
    del first
    second = cache.get("head")
    # then the second has the file's values in the first one's memory
    assert torch.equal(second, source.get("head")) and second.data_ptr() == pointer
    # and small tensors and other dtypes come as they are
    assert torch.equal(cache.get("norm"), source.get("norm"))
    assert torch.equal(cache.get("half"), source.get("half")) and cache.get("half").dtype == torch.bfloat16


def test_a_tensor_still_held_is_never_overwritten(folders, monkeypatch):
    monkeypatch.setattr(stream, "_REUSED_BUFFER_BYTES", 1000)
    source = open_source(folders[1])
    cache = RecentTensorCache(source)
    # given a view of the first large tensor kept past the next read (as a write in flight keeps it)
    kept = cache.get("emb").reshape(-1)[5:]
    expected = kept.clone()
    # when the next large tensor is read
    second = cache.get("head")
    # then the kept view still holds its values, and the new tensor its own
    assert torch.equal(kept, expected)
    assert torch.equal(second, source.get("head"))
    assert second.data_ptr() != kept.data_ptr() - 5 * 4


def test_a_write_behind_of_a_large_base_tensor_is_not_overwritten(folders, monkeypatch, tmp_path):
    monkeypatch.setattr(stream, "_REUSED_BUFFER_BYTES", 1000)
    source = open_source(folders[0])
    cache = RecentTensorCache(source)
    written = {}
    writer = WriteBehind(lambda key, t: written.__setitem__(key, t.clone()))
    try:
        for key in ("emb", "head", "a.weight", "emb"):
            writer(key, cache.get(key))
        writer.wait()
    finally:
        writer.close()
    for key, value in written.items():
        assert torch.equal(value, source.get(key)), key


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="ties", k=0.3),
        dict(method="ties", k=0.3, scope="per_tensor"),
        dict(method="ties", k=0.3, exclude=["emb"]),  # a large base tensor written as it is
        dict(method="dare_ties", p=0.5),
        dict(method="tsv"),
    ],
)
def test_merge_to_writes_the_same_bytes_with_every_tensor_read_into_reused_buffers(folders, tmp_path, monkeypatch, kwargs):
    base, *models = folders
    merge_to(tmp_path / "fresh", base, models, progress=False, **kwargs)
    monkeypatch.setattr(stream, "_REUSED_BUFFER_BYTES", 1000)
    merge_to(tmp_path / "reused", base, models, progress=False, **kwargs)
    names = sorted(p.name for p in (tmp_path / "fresh").iterdir())
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "fresh", tmp_path / "reused", names, shallow=False)
    assert (mismatch, errors) == ([], [])
