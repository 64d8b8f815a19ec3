"""The command end to end on tiny configs: merge, search and evaluate, in-process and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ties import merge, task_arithmetic, ties_merge
from lightning_ties.cli import main
from lightning_ties.config import SearchConfig, load_config
from lightning_ties.demo.models import DigitsNet
from lightning_ties.io import open_source, save_safetensors
from lightning_ties.pytorch_lightning import MultiTaskMergeModule
from lightning_ties.pytorch_lightning.scoring import TaskScorer, make_trainer, quiet_lightning
from lightning_ties.report import RunReport

ROOT = Path(__file__).resolve().parents[2]
TASKS = {"parity": 2, "ge5": 2}
HIDDEN = 8
HEAD = r"^head\."


def body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A base DigitsNet and two 'fine-tuned' ones: body + seeded noise, each with its own 2-class head."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    base = DigitsNet(num_classes=10, hidden=HIDDEN)
    paths = {"base": save_safetensors(base.state_dict(), folder / "base.safetensors")}
    for i, (task, classes) in enumerate(TASKS.items()):
        gen = torch.Generator().manual_seed(i + 1)
        state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in body(base.state_dict()).items()}
        head = torch.nn.Linear(HIDDEN, classes)
        state.update({"head.weight": head.weight.detach(), "head.bias": head.bias.detach()})
        paths[task] = save_safetensors(state, folder / f"{task}.safetensors")
    return paths


def search_config(tmp: Path, ckpts: dict[str, Path], **extra) -> Path:
    cfg = {
        "base": str(ckpts["base"]),
        "tasks": {t: str(ckpts[t]) for t in TASKS},
        "model": {"target": "lightning_ties.demo.models:DigitsNet", "args": {"num_classes": 10, "hidden": HIDDEN}},
        "data": {"target": "lightning_ties.demo.data:dataloaders", "args": {"tasks": list(TASKS), "seed": 0}},
        "heads": [HEAD],
        "method": "ties",
        "search": {"k": [0.2], "lam": [0.5, 1.0]},
        "output_dir": str(tmp / "search"),
        **extra,
    }
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def as_dict(path: Path) -> dict[str, torch.Tensor]:
    src = open_source(path)
    return {k: src.get(k) for k in src.keys()}


# ---- merge ---------------------------------------------------------------------------------------------
def test_merge_writes_what_the_engine_computes_and_saves_the_resolved_config(tmp_path, checkpoints, capsys):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(checkpoints["base"]),
                "models": [str(checkpoints[t]) for t in TASKS],
                "exclude": [HEAD],
                "output": str(tmp_path / "out.safetensors"),
            }
        )
    )
    assert main(["merge", str(cfg), "method=task_arithmetic", "method.lam=0.7", "--quiet"]) == 0
    merged = as_dict(tmp_path / "out.safetensors")
    base = as_dict(checkpoints["base"])
    expected = task_arithmetic(base, [as_dict(checkpoints[t]) for t in TASKS], lam=0.7, exclude=HEAD)
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key
    assert torch.equal(merged["head.weight"], base["head.weight"])  # heads come from base
    resolved = tmp_path / "out.safetensors.config.yaml"
    saved = yaml.safe_load(resolved.read_text())
    assert saved["method"] == {"name": "task_arithmetic", "lam": 0.7}
    assert "merged 2 model(s) with task_arithmetic" in capsys.readouterr().out

    # the saved config re-runs the same merge exactly
    assert main(["merge", str(resolved), f"output={tmp_path / 'again.safetensors'}", "--quiet"]) == 0
    again = as_dict(tmp_path / "again.safetensors")
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_merge_refuses_to_overwrite_unless_asked(tmp_path, checkpoints, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    args = ["merge", str(tmp_path / "m.yaml")]
    (tmp_path / "m.yaml").write_text(
        yaml.safe_dump(
            {
                "base": str(checkpoints["base"]),
                "models": [str(checkpoints["parity"])],
                "exclude": [HEAD],
                "output": str(out),
            }
        )
    )
    assert main(args) == 1
    assert out.read_bytes() == b"keep me"
    assert "exists" in capsys.readouterr().err
    # a file lightning-ties did not write is never replaced, even with overwrite=true
    assert main([*args, "overwrite=true", "--quiet"]) == 1
    assert out.read_bytes() == b"keep me"
    assert "not written by lightning-ties" in capsys.readouterr().err
    out.unlink()
    assert main(args + ["--quiet"]) == 0
    first = out.read_bytes()
    assert main([*args, "overwrite=true", "--quiet"]) == 0  # our own output is replaced
    assert out.read_bytes() == first


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_ties", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_merge_as_a_subprocess_and_its_one_line_errors(tmp_path, checkpoints):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "base": str(checkpoints["base"]),
                "models": [str(checkpoints[t]) for t in TASKS],
                "exclude": [HEAD],
                "output": str(tmp_path / "merged"),
            }
        )
    )
    ok = run_cli("merge", str(cfg), "method.k=0.5", "--quiet")
    assert ok.returncode == 0, ok.stderr
    expected = ties_merge(as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in TASKS], k=0.5, exclude=HEAD)
    merged = as_dict(tmp_path / "merged")
    assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in expected.items())
    assert (tmp_path / "merged" / "config.yaml").is_file()

    bad = run_cli("merge", str(cfg), "method.kk=0.5")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "method.kk" in bad.stderr and "Traceback" not in bad.stderr


# ---- search and evaluate ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory, checkpoints) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("search")
    assert main(["search", str(search_config(tmp, checkpoints)), "--quiet"]) == 0
    return tmp / "search", str(tmp / "search.yaml")


def test_search_writes_every_report_file_the_config_and_the_model(searched):
    out, _ = searched
    for name in (
        "report.json",
        "report.md",
        "results.csv",
        "search.png",
        "per_task.png",
        "config.yaml",
        "merged.safetensors",
    ):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("metrics.csv"))  # the CSV logger of the evaluation Trainer
    report = RunReport.from_json((out / "report.json").read_text())
    assert RunReport.from_json(report.to_json()) == report
    assert [r.method for r in report.rows] == ["base", "finetuned", "ties"]
    curve = report.searches[0]
    assert sorted(p["lam"] for p in curve.points) == [0.5, 1.0] and curve.chosen_k == 0.2


def test_searched_model_file_is_the_chosen_ties_merge(searched, checkpoints):
    out, _ = searched
    report = json.loads((out / "report.json").read_text())
    row = report["rows"][2]
    expected = ties_merge(
        as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in TASKS], k=row["k"], lam=row["lam"], exclude=HEAD
    )
    merged = as_dict(out / "merged.safetensors")
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key


def test_saved_search_config_reloads_to_the_same_config(searched):
    out, path = searched
    assert load_config(SearchConfig, out / "config.yaml") == load_config(SearchConfig, path)


def test_evaluate_scores_the_saved_merge_like_the_search_did(searched, checkpoints, tmp_path):
    out, _ = searched
    cfg = yaml.safe_load(Path(out.parent / "search.yaml").read_text())
    for key in ("method", "search"):
        cfg.pop(key)
    cfg.update(
        {
            "checkpoints": {"best": str(out / "merged.safetensors")},
            "output_dir": str(tmp_path / "eval"),
            "split": "test",
        }
    )
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["evaluate", str(tmp_path / "evaluate.yaml"), "--quiet", "logger=none"]) == 0
    evaluated = RunReport.from_json((tmp_path / "eval" / "report.json").read_text())
    searched_report = RunReport.from_json((out / "report.json").read_text())
    assert evaluated.rows[2].scores == pytest.approx(searched_report.rows[2].scores)
    assert evaluated.rows[1].scores == pytest.approx(searched_report.rows[1].scores)  # fine-tuned reference


def evaluate_config(tmp: Path, ckpts: dict[str, Path], checkpoints: dict[str, Path]) -> Path:
    cfg = yaml.safe_load(search_config(tmp, ckpts).read_text())
    for key in ("method", "search"):
        cfg.pop(key)
    cfg.update(checkpoints={n: str(p) for n, p in checkpoints.items()}, output_dir=str(tmp / "eval"), logger="none")
    path = tmp / "evaluate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_evaluate_refuses_a_checkpoint_that_does_not_fit_the_model_before_any_work(tmp_path, checkpoints, capsys):
    # lacking body.0.*, a checkpoint was scored with each task's own fine-tuned body.0 (keys it lacks
    # became per-task heads); one of another architecture failed only after the scoring, naming the tasks' files
    base = as_dict(checkpoints["base"])
    headless = save_safetensors(body(base), tmp_path / "headless.safetensors")  # per-task heads may be absent
    partial = save_safetensors({k: v for k, v in base.items() if "body.0." not in k}, tmp_path / "p.safetensors")
    wide = save_safetensors(DigitsNet(num_classes=10, hidden=HIDDEN + 4).state_dict(), tmp_path / "w.safetensors")
    cfg = str(evaluate_config(tmp_path, checkpoints, {"headless": headless}))
    shape = tuple(base["body.0.weight"].shape)
    for name, path, problem in [
        ("partial", partial, f"'body.0.weight' {shape} missing"),
        ("wide", wide, f"'body.0.weight' is {(HIDDEN + 4, shape[1])}, the model's is {shape}"),
    ]:
        assert main(["evaluate", cfg, f"checkpoints.{name}={path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"checkpoints.{name}={str(path)!r}" in err and problem in err, err
        assert not (tmp_path / "eval").exists()  # refused before any scoring or output
    assert main(["evaluate", cfg, "--quiet"]) == 0
    rows = RunReport.from_json((tmp_path / "eval" / "report.json").read_text()).rows
    assert rows[2].scores == rows[0].scores  # the base's body, each task with its own head: the base's scores


def test_the_scorer_refuses_weights_lacking_a_key_outside_the_heads(checkpoints):
    tasks = {t: str(checkpoints[t]) for t in TASKS}
    partial = {k: v for k, v in as_dict(checkpoints["base"]).items() if not k.startswith("body.0.")}
    with quiet_lightning():
        module = MultiTaskMergeModule(str(checkpoints["base"]), tasks, model=DigitsNet(hidden=HIDDEN), heads=HEAD)
        scorer = TaskScorer(module, make_trainer(), tasks)
        with pytest.raises(ValueError, match=r"weights to score: 2 key\(s\) of the model outside its per-task heads"):
            scorer.score_weights({}, partial)


def test_search_config_errors_are_named_before_any_work(tmp_path, checkpoints, capsys):
    cfg = search_config(tmp_path, checkpoints)
    assert main(["search", str(cfg), "model.target=lightning_ties.demo.models:NoSuchNet"]) == 2
    assert "model.target" in capsys.readouterr().err
    assert main(["search", str(cfg), "data.args.tasks=[parity]"]) == 2
    assert "no 'val' dataloader for task(s) ['ge5']" in capsys.readouterr().err
    assert main(["search", str(cfg), "tasks.ge5=/no/such.safetensors"]) == 2
    assert "tasks.ge5" in capsys.readouterr().err


def test_search_over_several_methods_saves_the_chosen_methods_merge(tmp_path, checkpoints):
    cfg = search_config(tmp_path, checkpoints, search={"k": [0.2], "lam": [0.5, 1.0], "methods": ["ties", "tsv"]})
    assert main(["search", str(cfg), "--quiet"]) == 0
    out = tmp_path / "search"
    report = RunReport.from_json((out / "report.json").read_text())
    assert sorted(curve.method for curve in report.searches) == ["ties", "tsv"]  # one curve per method
    row = report.rows[2]
    assert row.method in ("ties", "tsv")
    params = {"k": row.k} if row.method == "ties" else {}
    expected = merge(as_dict(checkpoints["base"]), [as_dict(checkpoints[t]) for t in TASKS], method=row.method,
                     lam=row.lam, exclude=HEAD, **params)
    merged = as_dict(out / "merged.safetensors")
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key
