"""Reliability of the I/O layer: outputs never destroy inputs or foreign files, writes survive
crashes (SIGKILL, full disk), and hostile files (escaping indexes, malformed safetensors) are refused.

Every test here fails on the code before issue 10.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_ties.io import (
    CheckpointError,
    atomic_dir,
    atomic_file,
    merge_to,
    open_source,
    save_hf_folder,
    save_lightning_checkpoint,
    save_safetensors,
)
from lightning_ties.io import atomic, tempfiles
from lightning_ties.report import write_text_atomic
from lightning_ties.io.errors import OutputWriteError, UnsafeOutputError

ROOT = Path(__file__).resolve().parents[2]


def as_dict(path) -> dict[str, torch.Tensor]:
    src = open_source(path)
    return {k: src.get(k) for k in src.keys()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_name(path: Path, pid: int, kind: str = "tmp") -> Path:
    """The temporary a run with ``pid`` on this host would leave beside ``path``."""
    return path.parent / f".{path.name}.lightning-ties-{tempfiles.HOST}-{pid}-0badc0de.{kind}"


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, list[Path]]:
    """A base and two fine-tuned safetensors files in their own folder."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    base = {"a": torch.zeros(8), "b": torch.ones(2, 3)}
    save_file(base, folder / "base.safetensors")
    models = []
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        save_file({k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, folder / f"ft{i}.safetensors")
        models.append(folder / f"ft{i}.safetensors")
    return folder / "base.safetensors", models


# ---- an output never overlaps an input -----------------------------------------------------------
def test_output_that_is_an_input_file_is_refused_even_with_overwrite(inputs):
    base, models = inputs
    before = base.read_bytes()
    for target in (base, models[1]):
        with pytest.raises(UnsafeOutputError, match=rf"output {target}.*is the input {target}"):
            merge_to(target, base, models, k=0.5, progress=False, overwrite=True)
    assert base.read_bytes() == before


def test_output_reached_through_a_symlink_or_hard_link_is_refused(inputs, tmp_path):
    base, models = inputs
    (tmp_path / "link.safetensors").symlink_to(models[0])
    os.link(models[1], tmp_path / "hard.safetensors")
    for target in ("link.safetensors", "hard.safetensors"):
        with pytest.raises(UnsafeOutputError, match="is the input"):
            merge_to(tmp_path / target, base, models, k=0.5, progress=False, overwrite=True)


def test_output_folder_that_is_an_input_folder_is_refused(tmp_path):
    for name in ("base", "ft"):
        save_hf_folder({"w": torch.full((4,), float(name == "ft"))}, tmp_path / name)
    (tmp_path / "ft" / "training_log.txt").write_text("precious")
    with pytest.raises(UnsafeOutputError, match=r"output .*ft is the input .*ft"):
        merge_to(tmp_path / "ft", tmp_path / "base", [tmp_path / "ft"], progress=False, overwrite=True)
    assert (tmp_path / "ft" / "training_log.txt").read_text() == "precious"


def test_output_folder_containing_the_inputs_is_refused(inputs, tmp_path):
    base, models = inputs
    with pytest.raises(UnsafeOutputError, match=r"is a folder that contains the input"):
        merge_to(tmp_path, base, models, k=0.5, progress=False, overwrite=True)
    with pytest.raises(UnsafeOutputError, match=r"is a folder that contains the input"):
        merge_to(base.parent, base, models, k=0.5, progress=False, overwrite=True)
    assert sorted(p.name for p in base.parent.iterdir()) == ["base.safetensors", "ft1.safetensors", "ft2.safetensors"]


def test_output_inside_an_input_folder_is_refused(tmp_path):
    save_hf_folder({"w": torch.zeros(4)}, tmp_path / "base")
    save_hf_folder({"w": torch.ones(4)}, tmp_path / "ft")
    with pytest.raises(UnsafeOutputError, match="lies inside the input folder"):
        merge_to(tmp_path / "ft" / "merged.safetensors", tmp_path / "base", [tmp_path / "ft"], progress=False)


def test_sinks_refuse_to_write_over_their_own_input(inputs):
    base, _ = inputs
    with pytest.raises(UnsafeOutputError, match="is the input"):
        save_safetensors(str(base), base)
    with pytest.raises(UnsafeOutputError, match="is the input"):
        save_lightning_checkpoint(str(base), base)


# ---- overwrite replaces only lightning-ties' own outputs -----------------------------------------
def test_overwrite_refuses_a_file_another_tool_wrote(inputs, tmp_path):
    base, models = inputs
    foreign = tmp_path / "out.safetensors"
    save_file({"x": torch.ones(1)}, foreign)
    ckpt = tmp_path / "out.ckpt"
    torch.save({"state_dict": {"x": torch.ones(1)}}, ckpt)
    for target in (foreign, ckpt):
        before = target.read_bytes()
        with pytest.raises(FileExistsError, match=rf"{target} already exists and was not written by lightning-ties"):
            merge_to(target, base, models, k=0.5, progress=False, overwrite=True)
        assert target.read_bytes() == before
    with pytest.raises(FileExistsError, match="not written by lightning-ties"):
        save_safetensors({"x": torch.zeros(1)}, foreign)  # its default overwrite=True too


def test_overwrite_refuses_a_folder_with_foreign_files(inputs, tmp_path):
    base, models = inputs
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"no \.lightning-ties\.json manifest"):
        merge_to(plain, base, models, k=0.5, progress=False, overwrite=True)
    merge_to(tmp_path / "ours", base, models, k=0.5, progress=False)
    (tmp_path / "ours" / "notes.txt").write_text("added by the user")
    with pytest.raises(FileExistsError, match=r"files lightning-ties did not write there: .*ours/notes.txt"):
        merge_to(tmp_path / "ours", base, models, k=0.5, progress=False, overwrite=True)
    assert (plain / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ours" / "notes.txt").read_text() == "added by the user"


def test_overwrite_replaces_earlier_outputs_of_every_kind(inputs, tmp_path):
    base, models = inputs
    for name in ("out", "out.safetensors", "out.ckpt"):
        merge_to(tmp_path / name, base, models, k=0.5, progress=False)
        if name == "out":  # the command writes its resolved config next to the merge
            write_text_atomic(tmp_path / "out" / "config.yaml", "method: ties\n")
        with pytest.raises(FileExistsError, match="pass overwrite=True"):
            merge_to(tmp_path / name, base, models, k=0.5, progress=False)
        merge_to(tmp_path / name, base, models, k=1.0, progress=False, overwrite=True)
        assert same(as_dict(tmp_path / name), as_dict(tmp_path / "out"))
    assert "lightning_ties" in torch.load(tmp_path / "out.ckpt", weights_only=True)
    marker = json.loads((tmp_path / "out" / ".lightning-ties.json").read_text())
    assert "model.safetensors" in marker["files"] and "merge_config.yaml" in marker["files"]


def test_a_file_output_never_replaces_a_folder(inputs, tmp_path):
    base, models = inputs
    merge_to(tmp_path / "out.safetensors", base, models, k=0.5, progress=False, output_format="folder")
    with pytest.raises(FileExistsError, match="is a folder"):
        merge_to(tmp_path / "out.safetensors", base, models, k=0.5, progress=False, overwrite=True)


# ---- crash-safe writes ---------------------------------------------------------------------------
def test_temporaries_sit_beside_the_output_with_a_recognisable_name(tmp_path):
    with atomic_file(tmp_path / "m.safetensors") as tmp:  # inside a private temporary folder beside it
        assert tmp.parent.parent == tmp_path and tmp.name == "m.safetensors"
        assert tmp.parent.name.startswith(f".m.safetensors.lightning-ties-{tempfiles.HOST}-{os.getpid()}-")
        assert tmp.parent.name.endswith(".tmp")
    with atomic_dir(tmp_path / "folder") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".folder.lightning-ties-")


def test_stale_temporaries_of_dead_runs_are_cleaned_by_the_next_write(tmp_path):
    out = tmp_path / "m.safetensors"
    dead, alive = stale_name(out, dead_pid()), stale_name(out, os.getppid())
    dead.write_bytes(b"x" * 1000)
    alive.write_bytes(b"still being written")
    folder_tmp = stale_name(tmp_path / "folder", dead_pid())
    folder_tmp.mkdir()
    (folder_tmp / "model.safetensors").write_bytes(b"half")
    save_safetensors({"w": torch.ones(2)}, out)
    save_hf_folder({"w": torch.ones(2)}, tmp_path / "folder")
    assert not dead.exists() and not folder_tmp.exists()
    assert alive.exists()  # another live process's temporary is never touched


def test_a_kill_between_the_fallback_renames_is_repaired_by_the_next_run(tmp_path):
    out = tmp_path / "model"
    save_hf_folder({"w": torch.ones(2)}, out)
    old = stale_name(out, dead_pid(), "old")
    os.rename(out, old)  # the state a kill after "move the old one aside" leaves
    with pytest.warns(UserWarning, match="restored its earlier version"):
        with pytest.raises(FileExistsError, match="pass overwrite=True"):
            save_hf_folder({"w": torch.zeros(2)}, out)
    assert torch.equal(as_dict(out)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replacing_a_folder_never_leaves_the_path_empty(tmp_path, monkeypatch):
    out = tmp_path / "model"
    save_hf_folder({"w": torch.ones(2)}, out)
    # The atomic exchange: at no moment is `out` missing (checked at every rename we make).
    seen = []
    real_exchange = atomic.exchange

    def watched(a, b):
        done = real_exchange(a, b)
        seen.append((done, out.exists()))
        return done

    monkeypatch.setattr(atomic, "exchange", watched)
    save_hf_folder({"w": torch.zeros(2)}, out, overwrite=True)
    assert seen == [(True, True)] and torch.equal(as_dict(out)["w"], torch.zeros(2))
    # The fallback (no renameat2): a failure renaming the new folder in puts the old one back.
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real_rename = os.rename

    def rename_fails_for_new(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename_fails_for_new)
    with pytest.raises(OutputWriteError, match=rf"cannot write {out}: simulated I/O error"):
        save_hf_folder({"w": torch.full((2,), 5.0)}, out, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(as_dict(out)["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_follow_the_umask(inputs, tmp_path):
    base, models = inputs
    old = os.umask(0o027)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
        save_lightning_checkpoint({"w": torch.ones(2)}, tmp_path / "m.ckpt")
        merge_to(tmp_path / "merged", base, models, k=0.5, progress=False)
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "m.safetensors") == 0o640
    assert mode(tmp_path / "m.ckpt") == 0o640
    assert mode(tmp_path / "merged") == 0o750
    assert {mode(p) for p in (tmp_path / "merged").iterdir()} == {0o640}


KILLED_MERGE = textwrap.dedent(
    """
    import sys, time
    from lightning_ties.io import merge_to, safetensors_file

    real = safetensors_file.SafetensorsWriter.write

    def slow(self, name, tensor):  # a big model's write, slowed so the kill lands mid-write
        real(self, name, tensor)
        time.sleep(0.05)

    safetensors_file.SafetensorsWriter.write = slow
    out, base, *models = sys.argv[1:]
    merge_to(out, base, models, k=0.5, progress=False, overwrite=True, hash_sources=False)
    """
)


def test_a_merge_killed_with_sigkill_leaves_the_earlier_output_and_the_next_run_cleans_up(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    base = {f"layer{i}.weight": torch.zeros(256, 256) for i in range(12)}  # 3 MB per model
    save_file(base, inputs / "base.safetensors")
    models = []
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        save_file({k: torch.randn(v.shape, generator=g) for k, v in base.items()}, inputs / f"ft{i}.safetensors")
        models.append(str(inputs / f"ft{i}.safetensors"))
    out = tmp_path / "merged"
    merge_to(out, inputs / "base.safetensors", models[:1], k=0.5, progress=False)
    before = as_dict(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MERGE, str(out), str(inputs / "base.safetensors"), *models],
        cwd=ROOT, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    temps: list[Path] = []
    while not temps and time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.lightning-ties-")]
        time.sleep(0.01)
    assert temps, f"the merge never started writing: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
    time.sleep(0.2)  # some tensors are written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert same(as_dict(out), before)  # the earlier output is intact
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".merged.") and p.suffix == ".tmp"] == temps
    merge_to(out, inputs / "base.safetensors", models, k=0.5, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "merged"]  # the stale temp and lock file are gone


FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys, torch
    from pathlib import Path
    from lightning_ties.io import merge_to, save_lightning_checkpoint, save_safetensors

    out = Path(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    big = {"w": torch.ones(1 << 19)}  # 2 MB of float32
    results = {}
    for name, write in [
        ("m.ckpt", lambda p: save_lightning_checkpoint(big, p)),
        ("m.safetensors", lambda p: save_safetensors(big, p)),
        ("folder", lambda p: merge_to(p, big, [big], progress=False)),
    ]:
        try:
            write(out / name)
            results[name] = "written"
        except Exception as err:
            results[name] = [type(err).__name__, getattr(err, "errno", None), str(err)]
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
    print(json.dumps({"results": results, "open_temps": [f for f in fds if "lightning-ties" in f]}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and /proc are Linux's")
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for name, result in report["results"].items():
        kind, code, message = result
        assert kind == "OutputWriteError" and code == errno.EFBIG, (name, result)
        assert f"cannot write {tmp_path / name}: File too large" in message
    assert report["open_temps"] == []  # the failed temporary is closed, not held open
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_while_writing_names_the_output(tmp_path, monkeypatch):
    def no_space(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_ties.io.safetensors_file.os.pwrite", no_space)
    with pytest.raises(OutputWriteError, match=rf"cannot write {tmp_path / 'm.safetensors'}: No space left on device; the disk is full"):
        save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- hostile files -------------------------------------------------------------------------------
def sharded_folder(tmp_path: Path, weight_map: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "entry",
    ["../outside/x.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", "a\\..\\x.safetensors"],
)
def test_an_index_naming_files_outside_its_folder_is_refused(tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"b": torch.ones(2)}, outside / "x.safetensors")
    folder = sharded_folder(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": entry})
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map entry 'b' -> .* is not a plain file name"):
        open_source(folder)


def test_an_index_entry_that_is_not_a_string_is_refused(tmp_path):
    folder = sharded_folder(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": ["x"]})
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map entry 'b' -> \['x'\] is not a file name"):
        open_source(folder)


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize(
    ("header", "nbytes", "message"),
    [
        ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12, "overlaps tensor 'a'"),
        ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8, "overlaps tensor"),
        ({"a": {**F32x2, "data_offsets": [8, 16]}}, 16, "8 unused bytes before tensor 'a'"),
        ({"a": {**F32x2, "data_offsets": [0, 8]}}, 12, "4 bytes after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "tensor 'a' .*non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "tensor 'a' .*non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, r"does not hold shape \(3,\)"),
        ({"a": {**F32x2, "data_offsets": [8, 0]}}, 8, r"byte range \[8, 0\)"),
        ({"a": {**F32x2, "data_offsets": [-8, 0]}}, 8, "two non-negative integers"),
        ({"a": {**F32x2, "data_offsets": ["0", "8"]}}, 8, "two non-negative integers"),
        ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
        ({"a": [1, 2]}, 8, "needs dtype, shape and data_offsets"),
        ({"__metadata__": {"k": 1}, "a": {**F32x2, "data_offsets": [0, 8]}}, 8, "__metadata__ must map names to strings"),
    ],
)
def test_malformed_safetensors_are_refused_naming_file_and_tensor(tmp_path, header, nbytes, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=rf"{path}: .*{message}"):
        open_source(path)


def test_a_well_formed_file_with_empty_tensors_is_accepted(tmp_path):
    """The guard against the checks above being too strict (zero-size tensors share an offset)."""
    header = {"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}, "a": {**F32x2, "data_offsets": [0, 8]}}
    path = raw_safetensors(tmp_path / "ok.safetensors", header, struct.pack("<2f", 1.0, 2.0))
    src = open_source(path)
    assert src.get("e").shape == (0, 3) and src.get("a").tolist() == [1.0, 2.0]
