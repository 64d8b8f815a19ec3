"""Race-free writes (issue 18): temporaries never followed through a planted link, one writer per
output and per task store (two real processes racing), stale temporaries of any name cleaned.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import secrets
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from lightning_ties.io import TaskVectorStore, open_source, save_safetensors
from lightning_ties.report import write_text_atomic

# What our temporaries are called (spelled out here, not imported: the tests also run on older code).
HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
TEMP = re.compile(r"\..+\.lightning-ties-[0-9a-f]{8}-\d+-[0-9a-f]{8}\.(tmp|old)")
VICTIM = b"the user's own file: never to be written through a link\n"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    return path


# ---- a link planted in a shared folder ------------------------------------------------------------
def test_a_link_planted_at_the_temporary_before_it_is_reopened_cannot_redirect_the_write(tmp_path, victim, monkeypatch):
    """The attacker wins every race: whenever our temporary's name is opened again, a link is there."""
    real_open = os.open

    def attacker_first(path, flags, *args, **kwargs):
        name = os.path.basename(os.fsdecode(path))
        if TEMP.fullmatch(name) and os.path.lexists(path) and not flags & os.O_EXCL:
            os.unlink(path)
            os.symlink(victim, path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", attacker_first)
    out = tmp_path / "shared" / "m.safetensors"
    out.parent.mkdir()
    for write in (lambda: save_safetensors({"w": torch.ones(64)}, out), lambda: write_text_atomic(out.parent / "r.md", "x")):
        try:
            write()
        except OSError:
            pass  # refusing is fine; writing through the link is not
    monkeypatch.undo()
    assert victim.read_bytes() == VICTIM


def test_a_link_planted_at_the_would_be_temporary_name_is_skipped(tmp_path, victim, monkeypatch):
    first, real_token = iter(["deadbeef"]), secrets.token_hex
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(first, None) or real_token(n))
    out = tmp_path / "m.safetensors"
    planted = out.parent / f".m.safetensors.lightning-ties-{HOST}-{os.getpid()}-deadbeef.tmp"
    os.symlink(victim, planted)
    save_safetensors({"w": torch.ones(4)}, out)
    assert victim.read_bytes() == VICTIM and planted.is_symlink()  # not followed, not removed (not ours)


# ---- killed writes' leftovers: any name in the folder -------------------------------------------------
def test_a_write_cleans_the_stale_temporaries_of_other_outputs_in_its_folder(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = tmp_path / f".other.safetensors.lightning-ties-{HOST}-{dead}-0badc0de.tmp"
    stale_dir = tmp_path / f".model.lightning-ties-{HOST}-{dead}-0badc0df.tmp"
    live = tmp_path / f".third.safetensors.lightning-ties-{HOST}-{alive}-0badc0de.tmp"
    lock = tmp_path / ".other.safetensors.lightning-ties.lock"
    stale.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    live.write_bytes(b"being written")
    lock.write_text(f"{HOST}-{dead}")
    foreign = tmp_path / ".notes.lightning-ties-zzzzzzzz-1-0badc0de.tmp"  # not our host pattern: kept
    foreign.write_bytes(b"?")
    save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    assert not stale.exists() and not stale_dir.exists() and not lock.exists()
    assert live.exists() and foreign.exists()


# ---- two real processes -----------------------------------------------------------------------------
def _save_after(barrier, path: str, value: float, queue) -> None:
    barrier.wait(timeout=60)
    try:
        save_safetensors({"w": torch.full((1 << 21,), value)}, path, overwrite=False)
        queue.put(("ok", value))
    except (RuntimeError, FileExistsError) as err:  # OutputBusyError is a RuntimeError
        queue.put(("refused", str(err)))


def _add_after(barrier, root: str, name: str, queue) -> None:
    store = TaskVectorStore(root, k=0.5)
    barrier.wait(timeout=60)
    store.add(name, {"w": torch.randn(1 << 18, generator=torch.Generator().manual_seed(len(name)))})
    queue.put(name)


def _race(target, args_per_process) -> list:
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(len(args_per_process)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, *args, queue)) for args in args_per_process]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.timeout(120)
def test_two_processes_writing_one_output_never_both_succeed(tmp_path):
    out = tmp_path / "m.safetensors"
    results = _race(_save_after, [(str(out), 1.0), (str(out), 2.0)])
    kinds = sorted(kind for kind, _ in results)
    assert kinds == ["ok", "refused"], results
    refusal = next(msg for kind, msg in results if kind == "refused")
    # the holder is named by pid once it has written it there, else "another process" (it took the lock a moment ago)
    assert str(out) in refusal and ("is being written by " in refusal or "already exists" in refusal)
    winner = next(v for kind, v in results if kind == "ok")
    assert torch.equal(open_source(out).get("w")[:2], torch.full((2,), winner))


@pytest.mark.timeout(120)
def test_two_processes_adding_to_one_store_both_land_in_the_index(tmp_path):
    root = tmp_path / "store"
    store = TaskVectorStore(root, k=0.5)
    store.save_base({"w": torch.zeros(1 << 18)})
    added = _race(_add_after, [(str(root), "first"), (str(root), "second")])
    assert sorted(added) == ["first", "second"]
    assert sorted(TaskVectorStore(root, k=0.5).names()) == ["first", "second"]


def test_the_base_of_a_store_holding_tasks_cannot_be_replaced(tmp_path):
    store = TaskVectorStore(tmp_path / "store", k=0.5)
    store.save_base({"w": torch.zeros(4)})
    store.save_base({"w": torch.zeros(4)})  # no task yet: replacing is harmless
    store.add("a", {"w": torch.ones(4)})
    with pytest.raises(FileExistsError, match=r"holds tasks \['a'\].*cannot be replaced"):
        store.save_base({"w": torch.ones(4)})
    assert torch.equal(store.base_state()["w"], torch.zeros(4))


def test_a_kill_between_the_fallback_renames_is_repaired_by_the_next_write_anywhere_in_the_folder(tmp_path):
    from lightning_ties.io import save_hf_folder

    out = tmp_path / "model"
    save_hf_folder({"w": torch.ones(2)}, out)
    old = tmp_path / f".model.lightning-ties-{HOST}-{dead_pid()}-0badc0de.old"
    os.rename(out, old)  # what a kill after "move the old one aside" leaves: the path is missing
    with pytest.warns(UserWarning, match="restored its earlier version"):
        save_safetensors({"w": torch.ones(2)}, tmp_path / "other.safetensors")  # another output, same folder
    assert torch.equal(open_source(out).get("w"), torch.ones(2)) and not old.exists()
