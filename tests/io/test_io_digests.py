"""Source digests remembered across runs (``lightning_ties.io.digests``): never stale, never in the way."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_ties.io import digests, merge_to
from lightning_ties.io.digests import sha256_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(digests.ENV, str(folder))
    monkeypatch.setattr(digests, "SETTLED_S", -1.0)  # every file counts as settled
    return folder


def no_hashing(monkeypatch):
    def refuse(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(digests, "_hash_file", refuse)


def test_a_settled_file_is_hashed_once_and_then_read_from_the_cache(tmp_path, cache, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == want
    (entry,) = cache.iterdir()
    assert json.loads(entry.read_text())["sha256"] == want
    with monkeypatch.context() as m:
        no_hashing(m)
        assert sha256_file(path) == want


@pytest.mark.parametrize("change", ["rewrite", "truncate", "replace"])
def test_a_file_changed_in_any_way_is_hashed_again_even_with_its_old_size_and_mtime(tmp_path, cache, change):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 4096)
    sha256_file(path)
    st = os.stat(path)
    if change == "rewrite":
        path.write_bytes(b"b" * 4096)
    elif change == "truncate":
        os.truncate(path, 100)
    else:
        (tmp_path / "g.bin").write_bytes(b"c" * 4096)
        os.replace(tmp_path / "g.bin", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time set back
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_written_just_now_is_not_remembered(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(digests, "SETTLED_S", 2.0)
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert not cache.exists() or not list(cache.iterdir())


@pytest.mark.parametrize("damage", ["garbage", "other_file", "bad_digest"])
def test_a_damaged_or_foreign_entry_is_ignored_and_replaced(tmp_path, cache, damage):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    sha256_file(path)
    (entry,) = cache.iterdir()
    record = json.loads(entry.read_text())
    if damage == "garbage":
        entry.write_text("{not json")
    elif damage == "other_file":
        entry.write_text(json.dumps({**record, "identity": [0, 0, 3, 0, 0], "sha256": "0" * 64}))
    else:
        entry.write_text(json.dumps({**record, "sha256": "not-hex" * 9 + "0"}))
    assert sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert json.loads(entry.read_text()) == record


def test_a_cache_that_cannot_be_written_or_is_off_costs_nothing_but_the_hash(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    monkeypatch.setattr(digests, "SETTLED_S", -1.0)
    (tmp_path / "not-a-folder").write_text("a user's file")
    monkeypatch.setenv(digests.ENV, str(tmp_path / "not-a-folder"))
    assert sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert (tmp_path / "not-a-folder").read_text() == "a user's file"
    monkeypatch.setenv(digests.ENV, "off")
    assert digests.cache_dir() is None
    assert sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    monkeypatch.delenv(digests.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digests.cache_dir() == tmp_path / "xdg" / "lightning-ties" / "sha256"


def test_a_second_merge_of_the_same_sources_records_their_digests_from_the_cache(tmp_path, cache):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"w": torch.full((8, 8), float(i))}, str(paths[-1]))
    merge_to(tmp_path / "first", paths[0], paths[1:], "ties", k=0.5, progress=False)

    def recorded(folder):
        return yaml.safe_load((folder / "merge_config.yaml").read_text())["provenance"]["sources"]

    assert recorded(tmp_path / "first")["base"]["files"] == {".": hashlib.sha256(paths[0].read_bytes()).hexdigest()}
    assert len(list(cache.iterdir())) == 3
    for entry in cache.iterdir():  # what the cache says is what the card records: nothing is hashed again
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "sha256": "ab" * 32}))
    merge_to(tmp_path / "second", paths[0], paths[1:], "ties", k=0.5, progress=False)
    second = recorded(tmp_path / "second")
    assert [second["base"]["files"]] + [m["files"] for m in second["models"]] == [{".": "ab" * 32}] * 3
