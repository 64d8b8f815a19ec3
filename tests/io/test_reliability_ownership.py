"""One ownership rule for every output (issue 18): replace only what our manifest lists, unchanged.

A name, a metadata key or a file layout proves nothing; a manifest entry with the same size and
sha256 does. Every test here fails on the code before issue 18.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_ties.cli import main
from lightning_ties.cli.common import prepare_output_dir
from lightning_ties.config import ConfigError
from lightning_ties.io import TaskVectorStore, merge_to, save_hf_folder, save_lightning_checkpoint, save_safetensors
from lightning_ties.report import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inputs(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g)}
    save_file(base, "base.safetensors")
    save_file({"w": base["w"] + 0.1 * torch.randn(4, 4, generator=g)}, "a.safetensors")
    return tmp_path


def merge_yaml(tmp_path: Path, output: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"base": "base.safetensors", "models": ["a.safetensors"], "output": output}))
    return path


# ---- content, not names ---------------------------------------------------------------------------------
def test_user_weights_saved_into_our_folder_under_our_names_are_not_replaced(inputs):
    merge_to("merged", "base.safetensors", ["a.safetensors"], k=0.5, progress=False)
    save_file({"w": torch.full((4, 4), 7.0)}, "merged/model.safetensors")  # the user's own weights, our file name
    mine = Path("merged/model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"merged/model.safetensors, changed since lightning-ties wrote it"):
        merge_to("merged", "base.safetensors", ["a.safetensors"], k=0.5, progress=False, overwrite=True)
    assert Path("merged/model.safetensors").read_bytes() == mine


def test_a_file_of_ours_edited_or_renamed_is_no_longer_ours(inputs):
    save_safetensors({"w": torch.ones(2)}, "x.safetensors")
    Path("x.safetensors").rename("y.safetensors")
    with pytest.raises(FileExistsError, match="not listed in"):
        save_safetensors({"w": torch.zeros(2)}, "y.safetensors", overwrite=True)
    save_lightning_checkpoint({"w": torch.ones(2)}, "m.ckpt")
    with open("m.ckpt", "ab") as f:
        f.write(b"user's appended notes")
    with pytest.raises(FileExistsError, match="changed since lightning-ties wrote it"):
        save_lightning_checkpoint({"w": torch.zeros(2)}, "m.ckpt", overwrite=True)


@pytest.mark.parametrize("legacy", ["merge_method metadata", "learned_merge.json", "merge_config.yaml"])
def test_old_version_heuristics_no_longer_make_a_file_or_folder_ours(inputs, legacy):
    if legacy == "merge_method metadata":
        save_file({"w": torch.ones(2)}, "old.safetensors", metadata={"merge_method": "ties"})
        target, write = Path("old.safetensors"), lambda: save_safetensors({"w": torch.zeros(2)}, "old.safetensors")
    else:
        Path("old").mkdir()
        save_file({"w": torch.ones(2)}, "old/model.safetensors")
        extra = "{}" if legacy == "learned_merge.json" else "library_version: 0.1.0\n"
        Path("old", legacy).write_text(extra)
        target, write = Path("old/model.safetensors"), lambda: save_hf_folder({"w": torch.zeros(2)}, "old", overwrite=True)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="not written by lightning-ties"):
        write()
    assert target.read_bytes() == before


# ---- the command's outputs ----------------------------------------------------------------------------------
def test_the_merge_config_sidecar_never_replaces_a_users_file_and_is_checked_before_work(inputs, capsys):
    sidecar = Path("out.safetensors.config.yaml")
    sidecar.write_text("my own notes\n")
    assert main(["merge", str(merge_yaml(inputs, "out.safetensors")), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "out.safetensors.config.yaml" in err and "not written by lightning-ties" in err
    assert not Path("out.safetensors").exists()  # refused before any work
    assert main(["merge", str(merge_yaml(inputs, "out.safetensors")), "overwrite=true", "--quiet"]) == 2
    assert sidecar.read_text() == "my own notes\n"


def test_a_merge_rerun_replaces_its_own_sidecar_only_with_overwrite(inputs, capsys):
    config = str(merge_yaml(inputs, "out.safetensors"))
    assert main(["merge", config, "--quiet"]) == 0
    assert main(["merge", config, "--quiet"]) == 2 and "overwrite=true" in capsys.readouterr().err
    assert main(["merge", config, "overwrite=true", "--quiet"]) == 0


@pytest.mark.parametrize("name", ["results.csv", "report.md", "report.json", "config.yaml", "merged.safetensors"])
def test_a_runs_output_folder_keeps_the_users_files_even_with_overwrite(tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text("the user's own file\n")
    with pytest.raises(ConfigError, match=rf"output_dir: .*{name} already exists and was not written by lightning-ties"):
        prepare_output_dir(str(out), True, ["merged.safetensors"])
    assert (out / name).read_text() == "the user's own file\n"


def test_a_runs_own_reports_are_replaced_with_overwrite_only(tmp_path):
    out = tmp_path / "run"
    write_text_atomic(out / "results.csv", "ours\n")
    (out / "notes.txt").write_text("unrelated file of the user: fine")
    with pytest.raises(ConfigError, match="overwrite=true"):
        prepare_output_dir(str(out), False)
    assert prepare_output_dir(str(out), True) == out


def test_the_evaluate_config_does_not_ship_overwrite_true():
    assert yaml.safe_load((ROOT / "configs" / "evaluate.yaml").read_text()).get("overwrite") is not True


# ---- the callback's save_dir and the task store -----------------------------------------------------------
def test_the_save_dir_checker_refuses_a_users_files_before_training(tmp_path):
    from lightning_ties.io.ownership import check_folder_outputs

    save_dir = tmp_path / "save"
    save_dir.mkdir()
    torch.save({"state_dict": {}}, save_dir / "merged.ckpt")
    with pytest.raises(FileExistsError, match=r"merged.ckpt already exists and was not written by lightning-ties"):
        check_folder_outputs(save_dir, ["search.json", "search.csv", "merged.ckpt"])
    assert check_folder_outputs(tmp_path / "fresh", ["search.json"]) == tmp_path / "fresh"


def test_a_task_store_in_a_folder_holding_the_users_base_file_refuses_before_work(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    save_file({"w": torch.ones(2)}, root / "base.safetensors")
    before = (root / "base.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="base.safetensors already exists and was not written by lightning-ties"):
        TaskVectorStore(root).save_base({"w": torch.zeros(2)})
    assert (root / "base.safetensors").read_bytes() == before


def test_the_manifest_lists_size_and_sha256(tmp_path):
    save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    entry = json.loads((tmp_path / ".lightning-ties.json").read_text())["files"]["m.safetensors"]
    assert entry["size"] == (tmp_path / "m.safetensors").stat().st_size and len(entry["sha256"]) == 64


def test_a_foreign_manifest_in_the_way_is_refused_before_anything_is_placed(tmp_path):
    (tmp_path / ".lightning-ties.json").write_text('{"files": ["a", "b"]}')  # another tool's, or an old marker
    with pytest.raises(ValueError, match=r"\.lightning-ties\.json is not a lightning-ties manifest with content hashes"):
        write_text_atomic(tmp_path / "report.md", "x")
    assert not (tmp_path / "report.md").exists()


def test_a_folder_another_rank_creates_during_the_check_is_not_taken_for_a_file(tmp_path, monkeypatch) -> None:
    # every rank checks save_dir while rank 0 creates it: the folder may appear between two looks
    from lightning_ties.io.errors import UnsafeOutputError
    from lightning_ties.io.ownership import check_writable

    folder = tmp_path / "save"
    real_is_dir = Path.is_dir

    def is_dir_then_created(self: Path) -> bool:
        seen = real_is_dir(self)
        if self == folder:
            folder.mkdir(exist_ok=True)  # rank 0, right after this rank looked
        return seen

    monkeypatch.setattr(Path, "is_dir", is_dir_then_created)
    assert check_writable(folder / "base.safetensors") == folder / "base.safetensors"
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafeOutputError, match="exists and is not a folder"):
        check_writable(tmp_path / "file" / "base.safetensors")


def test_a_run_without_overwrite_never_replaces_what_another_run_wrote_meanwhile(tmp_path, monkeypatch, capsys):
    # the up-front check passes on an empty folder; another run then finishes into it (its files in the manifest,
    # ours to replace only with overwrite): with overwrite=false every write checks again and refuses
    from lightning_ties.cli import common
    from lightning_ties.cli import evaluate as workflow
    from lightning_ties.demo.models import DigitsNet

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = DigitsNet(num_classes=2, hidden=8, depth=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, "base.safetensors")
    for t in ("parity", "ge5"):
        save_file({k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in net.state_dict().items()},
                  f"{t}.safetensors")
    config = {
        "base": "base.safetensors", "tasks": {t: f"{t}.safetensors" for t in ("parity", "ge5")},
        "model": {"target": "lightning_ties.demo.models:DigitsNet", "args": {"num_classes": 2, "hidden": 8, "depth": 1}},
        "data": {"target": "lightning_ties.demo.data:dataloaders", "args": {"tasks": ["parity", "ge5"], "seed": 0}},
        "heads": [r"^head\."], "split": "test", "output_dir": "out", "overwrite": False, "logger": "none",
    }
    Path("evaluate.yaml").write_text(yaml.safe_dump(config))

    def check_then_another_run_finishes(*args, **kwargs):
        out = common.prepare_output_dir(*args, **kwargs)
        write_text_atomic(out / "config.yaml", "the other run\n", overwrite=False)
        write_text_atomic(out / "report.json", "{}\n", overwrite=False)
        return out

    monkeypatch.setattr(workflow, "prepare_output_dir", check_then_another_run_finishes)
    assert main(["evaluate", "evaluate.yaml", "--quiet"]) == 1
    assert "config.yaml already exists" in capsys.readouterr().err
    assert Path("out/config.yaml").read_text() == "the other run\n" and Path("out/report.json").read_text() == "{}\n"


def test_reports_plots_and_the_demos_checkpoints_written_without_overwrite_refuse_an_existing_file(tmp_path):
    from lightning_ties.demo.models import DigitsNet
    from lightning_ties.demo.run import save_checkpoints
    from lightning_ties.report import ResultRow, RunReport, write_report

    report = RunReport("t", ["a"], [ResultRow("base", "base", "reference", {"a": 0.5})])
    write_report(report, tmp_path, plots=True)  # ours: replaced with overwrite, refused without
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert "per_task.png" in before
    with pytest.raises(FileExistsError, match="report.json already exists"):
        write_report(report, tmp_path, plots=True, overwrite=False)
    (tmp_path / "report.json").unlink()
    (tmp_path / "report.md").unlink()
    (tmp_path / "results.csv").unlink()
    with pytest.raises(FileExistsError, match="per_task.png already exists"):
        write_report(report, tmp_path, plots=True, overwrite=False)
    assert (tmp_path / "per_task.png").read_bytes() == before["per_task.png"]
    net = DigitsNet(num_classes=2, hidden=8, depth=1)
    save_checkpoints(tmp_path, net, {"a": net.state_dict()})
    with pytest.raises(FileExistsError, match="base.safetensors already exists"):
        save_checkpoints(tmp_path, net, {"a": net.state_dict()}, overwrite=False)


@pytest.mark.parametrize("name", [".lightning-ties.json", ".m.safetensors.lightning-ties.lock"])
def test_an_output_named_as_our_bookkeeping_is_refused_before_any_write(tmp_path, name):
    # the manifest's lock is the lock of an output named .lightning-ties.json: its writer waited on itself for ever
    from lightning_ties.io.errors import UnsafeOutputError

    for write in (lambda p: save_safetensors({"w": torch.ones(2)}, p), lambda p: write_text_atomic(p, "x"),
                  lambda p: merge_to(p, {"w": torch.ones(2)}, [{"w": torch.zeros(2)}], progress=False)):
        with pytest.raises(UnsafeOutputError, match=f"keeps the name '{name}' for its own bookkeeping"):
            write(tmp_path / "fresh" / name)
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []
