"""The demo end to end in its reduced mode (seconds): table, reports, plots, the learned row, continual merging."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_ties.cli import main
from lightning_ties.report import RunReport

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "demo",
                "--fast",
                "--quiet",
                "tasks=[parity,ge5,mod3]",
                "methods=[average,task_arithmetic,ties,learned]",
                f"output_dir={out}",
            ]
        )
    assert code == 0
    return out, stdout.getvalue()


def test_demo_prints_the_table_with_reference_rows_and_every_method(demo_run):
    _, printed = demo_run
    for row in (
        "base (pretrained)",
        "fine-tuned (own task)",
        "average",
        "task_arithmetic (paper recipe)",
        "task_arithmetic (searched)",
        "ties (paper recipe)",
        "ties (searched)",
    ):
        assert row in printed, row
    assert "reports written to" in printed


def test_demo_writes_reports_plots_checkpoints_and_the_resolved_config(demo_run):
    out, _ = demo_run
    for name in ("report.json", "report.md", "results.csv", "config.yaml"):
        assert (out / name).is_file(), name
    for name in ("search.png", "per_task.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != ".lightning-ties.json") == [
        "base.safetensors",
        "ge5.safetensors",
        "mod3.safetensors",
        "parity.safetensors",
    ]
    assert "fast: true" in (out / "config.yaml").read_text()
    recorded = RunReport.from_json((out / "report.json").read_text()).config
    assert recorded["tasks"] == ["parity", "ge5", "mod3"] and recorded["fast"] is True


def test_demo_report_round_trips_and_its_numbers_are_consistent(demo_run):
    out, _ = demo_run
    report = RunReport.from_json((out / "report.json").read_text())
    assert RunReport.from_json(report.to_json()) == report
    by_name = {r.name: r for r in report.rows}
    finetuned = by_name["fine-tuned (own task)"]
    assert finetuned.normalized == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for r in report.rows for v in r.scores.values())
    # the paper recipe is TIES's k=0.2, lam=1 and task arithmetic's lam=0.4
    assert (by_name["ties (paper recipe)"].k, by_name["ties (paper recipe)"].lam) == (0.2, 1.0)
    assert by_name["task_arithmetic (paper recipe)"].lam == 0.4
    # the searched row is the best validation candidate of its curve
    curve = next(c for c in report.searches if c.method == "ties")
    top = max(p["objective"] for p in curve.points)
    assert (curve.chosen_k, curve.chosen_lam) in [(p["k"], p["lam"]) for p in curve.points if p["objective"] == top]


def test_demo_table_has_the_learned_row(demo_run):
    out, printed = demo_run
    report = RunReport.from_json((out / "report.json").read_text())
    assert any(r.method == "learned" for r in report.rows)
    assert set(report.extra["learned"]["coefficients"]) == {"parity", "ge5", "mod3"}
    assert (out / "coefficients.png").read_bytes().startswith(PNG_MAGIC)


def test_continual_demo_scores_the_growing_merge_after_each_task(tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                str(CONFIGS / "continual.yaml"),
                "--fast",
                "--quiet",
                "tasks=[parity,ge5,mod3]",
                "methods=[ties]",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    report = RunReport.from_json((tmp_path / "report.json").read_text())
    merged = [r for r in report.rows if r.method == "ties"]
    assert [sorted(r.scores) for r in merged] == [["ge5", "parity"], ["ge5", "mod3", "parity"]]
    assert (tmp_path / "task_store" / "index.json").is_file()
    assert "ties after 3 tasks" in capsys.readouterr().out


def test_demo_refuses_an_unknown_task_before_training(tmp_path, capsys):
    assert main(["demo", "--fast", "tasks=[parity,spin]", f"output_dir={tmp_path}"]) == 2
    assert "tasks: unknown demo task 'spin'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_full_demo_suite_fine_tuned_models_clearly_beat_the_base_on_their_own_tasks(tmp_path):
    # the full mode's training (what `make demo` runs), scored without the searches to stay quick
    assert main(["demo", "--quiet", "methods=[average]", "logger=none", f"output_dir={tmp_path}"]) == 0
    report = RunReport.from_json((tmp_path / "report.json").read_text())
    base, finetuned, average = report.rows
    for task in report.tasks:
        assert finetuned.scores[task] >= base.scores[task] + 0.02, task
    assert finetuned.mean >= base.mean + 0.05
    assert report.extra["timings"]["total_s"] < 120


def test_demo_reports_no_k_for_a_method_without_a_trim(tmp_path, capsys):
    code = main(["demo", "--fast", "tasks=[parity,ge5]", "methods=[task_arithmetic]", f"output_dir={tmp_path}"])

    assert code == 0
    printed = capsys.readouterr()
    said = printed.out + printed.err
    assert "task_arithmetic: searched" in said and "chose lam=" in said
    assert "k=None" not in said
