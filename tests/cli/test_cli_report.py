"""Reports: report.json round-trips, the Markdown/CSV tables, normalized scores, valid PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from lightning_ties.report import ResultRow, RunReport, SearchCurve, print_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_report() -> RunReport:
    report = RunReport("t", tasks=["a", "b"], metric="accuracy", split="test")
    report.add_row(ResultRow("base (pretrained)", "base", "reference", {"a": 0.5, "b": 0.6}))
    report.add_row(ResultRow("fine-tuned (own task)", "finetuned", "reference", {"a": 1.0, "b": 0.8}))
    report.add_row(ResultRow("ties (searched)", "ties", "searched on val", {"a": 0.75, "b": 0.8}, k=0.2, lam=1.1))
    report.searches.append(
        SearchCurve(
            "ties",
            [{"k": 0.2, "lam": lam, "objective": 0.7 + 0.01 * i} for i, lam in enumerate([0.9, 1.0, 1.1])],
            chosen_k=0.2,
            chosen_lam=1.1,
        )
    )
    report.fill_normalized()
    return report


def test_normalized_is_the_mean_of_per_task_ratios_to_the_finetuned_row():
    report = small_report()
    # ties: (0.75 / 1.0 + 0.8 / 0.8) / 2 = 0.875 ; base: (0.5 + 0.75) / 2 = 0.625
    assert report.rows[2].normalized == pytest.approx(0.875)
    assert report.rows[0].normalized == pytest.approx(0.625)
    assert report.rows[2].mean == pytest.approx(0.775)


def test_report_json_round_trips_exactly():
    report = small_report()
    text = report.to_json()
    again = RunReport.from_json(text)
    assert again == report
    assert again.to_json() == text
    assert json.loads(text)["rows"][2]["mean"] == pytest.approx(0.775)


def test_nan_scores_are_written_as_strict_json_null():
    report = RunReport("t", ["a"], [ResultRow("x", "ties", "r", {"a": 0.5}, normalized=math.nan)])
    assert json.loads(report.to_json())["rows"][0]["normalized"] is None


def test_a_row_scoring_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match="row 'x' scores tasks"):
        RunReport("t", ["a"]).add_row(ResultRow("x", "ties", "r", {"zzz": 1.0}))


def test_markdown_and_csv_tables_hold_every_row_and_task():
    report = small_report()
    md = report.markdown()
    assert "| model | k | lam | a | b | mean | normalized |" in md
    assert "| ties (searched) | 0.20 | 1.10 | 75.0 | 80.0 | 77.5 | 87.5 |" in md
    rows = list(csv.DictReader(io.StringIO(report.csv())))
    ties = {r["task"]: float(r["accuracy"]) for r in rows if r["model"] == "ties (searched)"}
    assert ties == {"a": 0.75, "b": 0.8, "mean": pytest.approx(0.775), "normalized": pytest.approx(0.875)}


def test_continual_rows_may_score_a_prefix_of_the_tasks():
    report = RunReport("t", ["a", "b", "c"])
    report.add_row(ResultRow("fine-tuned", "finetuned", "reference", {"a": 1.0, "b": 1.0, "c": 1.0}))
    report.add_row(ResultRow("ties after 2 tasks", "ties", "searched", {"a": 0.5, "b": 1.0}))
    report.fill_normalized()
    assert report.rows[1].normalized == pytest.approx(0.75)
    assert report.table_cells()[1][1][5] == "-"  # task c not seen yet


def test_write_report_creates_valid_pngs_and_the_text_files(tmp_path):
    from matplotlib.image import imread

    paths = write_report(small_report(), tmp_path)
    assert sorted(p.name for p in paths) == ["per_task.png", "report.json", "report.md", "results.csv", "search.png"]
    for name in ("search.png", "per_task.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert RunReport.from_json((tmp_path / "report.json").read_text()) == small_report()
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_terminal_table_shows_every_row(capsys):
    print_table(small_report())
    out = capsys.readouterr().out
    assert "ties (searched)" in out and "fine-tuned (own task)" in out and "77.5" in out


def test_learned_coefficients_are_drawn_as_a_heat_map(tmp_path):
    from matplotlib.image import imread

    report = small_report()
    report.extra["learned"] = {
        "coefficients": {"a": {"body.0.": 1.0, "body.2.": 0.8}, "b": {"body.0.": 1.2, "body.2.": 0.9}}
    }
    paths = write_report(report, tmp_path)
    assert tmp_path / "coefficients.png" in paths
    assert imread(tmp_path / "coefficients.png").ndim == 3
    assert not (write_report(small_report(), tmp_path / "plain") and (tmp_path / "plain" / "coefficients.png").exists())


def test_there_is_one_coefficient_plot():
    from lightning_ties import report
    from lightning_ties.evaluation.plots import plot_coefficients
    from lightning_ties.lightning import plot_coefficients as from_lightning

    assert report.plot_coefficients is plot_coefficients is from_lightning
