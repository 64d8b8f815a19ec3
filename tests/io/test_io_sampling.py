"""The global trim's sample read from files without reading them whole, and the read paths
(``get_strided``, ``get_into``) never taken through a wrapper that changes what ``get`` returns."""

from __future__ import annotations

import mmap
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_ties.core.keys import MatchedSource
from lightning_ties.io import CheckpointError, merge_to
from lightning_ties.io.readers import SafetensorsSource
from lightning_ties.io.safetensors_file import SafetensorsFile
from lightning_ties.io.validate import CommonRowsSource
from lightning_ties.merging import thresholds
from lightning_ties.merging.sources import StateDictSource, read_strided

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int64, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first, stride", [(0, 1), (3, 7), (1280, 1281), (4, 100000), (10**6, 5)])
def test_a_strided_read_from_a_file_equals_the_whole_tensor_strided(tmp_path, dtype, first, stride):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "w": torch.randn(301, 977, generator=g) * 50, "z": torch.randn(7, generator=g)}
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for key in tensors:
        got = f.get_strided(key, first, stride)
        strided = f.get(key).reshape(-1)[first::stride]
        want = torch.empty(strided.shape, dtype=strided.dtype).copy_(strided)  # the bytes compared: NaN too
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_a_strided_read_of_a_file_truncated_since_its_header_was_read_is_an_error_not_a_crash(tmp_path):
    save_file({"w": torch.ones(1000)}, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    os.truncate(tmp_path / "m.safetensors", 2000)
    with pytest.raises(CheckpointError, match="ended early"):
        f.get_strided("w", 0, 3)
    with pytest.raises(ValueError, match="stride >= 1"):
        f.get_strided("w", 0, 0)


def test_a_file_system_that_cannot_map_files_gets_the_same_sample_from_a_whole_read(tmp_path, monkeypatch):
    save_file({"w": torch.arange(1000.0)}, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")

    def cannot_map(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap raises on a file system without it

    monkeypatch.setattr(mmap, "mmap", cannot_map)
    assert f.get_strided("w", 3, 100).tolist() == [3.0, 103.0, 203.0, 303.0, 403.0, 503.0, 603.0, 703.0, 803.0, 903.0]


def test_wrappers_that_change_what_get_returns_are_never_bypassed(tmp_path):
    save_file({"emb": torch.arange(12.0).reshape(4, 3)}, str(tmp_path / "ft.safetensors"))
    base = StateDictSource({"emb": torch.zeros(3, 3)})
    rows = CommonRowsSource(SafetensorsSource([tmp_path / "ft.safetensors"]), base)
    assert read_strided(rows, "emb", 0, 4).tolist() == [0.0, 4.0, 8.0]  # base's 3 rows, not the file's 4
    renamed = MatchedSource(SafetensorsSource([tmp_path / "ft.safetensors"]), {"model.emb": "emb"})
    assert read_strided(renamed, "model.emb", 1, 5).tolist() == [1.0, 6.0, 11.0]


def test_a_vocabulary_of_another_size_merges_with_common_rows_when_its_tensors_are_read_into_buffers(tmp_path):
    # tensors over 1 MiB are read into reused buffers (get_into): through CommonRowsSource that
    # read the fine-tuned model's own rows (1003) into a buffer sized for base's (1000) and failed
    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(1000, 512, generator=g), "w": torch.randn(64, 64, generator=g)}
    for rows, name in ((1003, "more"), (990, "fewer")):
        ft = {"emb": torch.randn(rows, 512, generator=g), "w": base["w"] + 0.1}
        save_file(base, str(tmp_path / "base.safetensors"))
        save_file(ft, str(tmp_path / f"{name}.safetensors"))
        out = tmp_path / f"out-{name}.safetensors"
        merge_to(out, tmp_path / "base.safetensors", [tmp_path / f"{name}.safetensors"], "task_arithmetic", lam=1.0,
                 common_rows=True, progress=False)
        merged = load_file(str(out))["emb"]
        kept = min(rows, 1000)
        assert merged.shape == (1000, 512)
        assert torch.allclose(merged[:kept], ft["emb"][:kept], atol=1e-6) and torch.equal(merged[kept:], base["emb"][kept:])


def test_the_global_trim_s_sample_reads_no_tensor_of_a_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(thresholds, "_MIN_BRACKETED", 1 << 12)
    monkeypatch.setattr(thresholds, "_SAMPLE", 1 << 8)
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(128, 64, generator=g) for i in range(4)}
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "a", "b")]
    for i, path in enumerate(paths):
        save_file({k: v + 0.01 * i * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(path))
    whole_reads: list[str] = []
    sampling: list[bool] = []
    get, sample_brackets = SafetensorsFile.get, thresholds.ThresholdFinder.sample_brackets

    def counting_get(self, name, into=None):
        whole_reads.append(name) if sampling and sampling[-1] else None
        return get(self, name, into)

    def sampled(self, *args, **kwargs):
        sampling.append(True)
        try:
            brackets = sample_brackets(self, *args, **kwargs)
            assert all(b is not None for b in brackets)  # the sample was taken
            return brackets
        finally:
            sampling.append(False)

    monkeypatch.setattr(SafetensorsFile, "get", counting_get)
    monkeypatch.setattr(thresholds.ThresholdFinder, "sample_brackets", sampled)
    merge_to(tmp_path / "out.safetensors", paths[0], paths[1:], "ties", k=0.2, progress=False)
    assert sampling and whole_reads == []  # the old sample read every tensor of every file whole
    monkeypatch.setattr(SafetensorsFile, "get", get)
    in_memory = [load_file(str(p)) for p in paths]
    merge_to(tmp_path / "whole.safetensors", in_memory[0], in_memory[1:], "ties", k=0.2, progress=False)
    from_files, from_memory = load_file(str(tmp_path / "out.safetensors")), load_file(str(tmp_path / "whole.safetensors"))
    assert from_files.keys() == from_memory.keys() and all(torch.equal(from_files[k], from_memory[k]) for k in from_files)
