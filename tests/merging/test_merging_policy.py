"""One home per policy in merging: the pattern compiler, the report constructor, renamed names."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_ties.merging import MergedTaskVector, MergeReport, merged_task_vector, ties_merge
from lightning_ties.merging.plan import compile_patterns, plan_merge
from lightning_ties.merging.sources import StateDictSource

BASE = {"enc.w": torch.zeros(3), "head.w": torch.zeros(2)}
MODELS = [{"enc.w": torch.tensor([1.0, -2.0, 0.5]), "head.w": torch.ones(2)}]


# ---- patterns ---------------------------------------------------------------------------------
def test_bad_include_regex_is_a_value_error_naming_the_argument_and_pattern() -> None:
    with pytest.raises(ValueError, match=r"^include='\(' is not a valid regular expression \(missing \)"):
        ties_merge(BASE, MODELS, include="(")
    with pytest.raises(ValueError, match=r"^exclude\[1\]='\[' is not a valid regular expression"):
        ties_merge(BASE, MODELS, exclude=["head", "["])


def test_compile_patterns_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match=r"heads: expected a regular expression \(a string\) or a list of them, got 3"):
        compile_patterns([3], "heads")  # type: ignore[list-item]


def test_compile_patterns_is_the_only_regex_compiler_in_merging() -> None:
    from pathlib import Path

    import lightning_ties.merging as merging

    users = sorted(p.name for p in Path(merging.__file__).parent.glob("*.py") if "re.compile(" in p.read_text())
    assert users == ["plan.py"]


# ---- reports ----------------------------------------------------------------------------------
def test_report_from_plan_copies_what_the_plan_decided() -> None:
    base = StateDictSource(BASE, "base")
    plan = plan_merge(base, [StateDictSource(MODELS[0], "a")], exclude="head")
    report = MergeReport.from_plan(plan, "ties", {"k": 0.5}, ["a"], thresholds=[0.5], lam=None)
    assert report.merged_keys == ["enc.w"] and "head.w" in report.skipped
    assert report.to_dict()["params"] == {"k": 0.5} and report.thresholds == [0.5]
    plan.merge_keys.append("x")  # the report is a snapshot, not a view of the plan
    assert report.merged_keys == ["enc.w"]
    applied = report.with_lam(0.7)
    assert (applied.lam, report.lam, applied.merged_keys) == (0.7, None, ["enc.w"])


def test_merge_results_carry_a_report_built_from_the_plan() -> None:
    merged = ties_merge(BASE, MODELS, k=0.5, lam=0.5, exclude="head")
    assert merged.report.method == "ties" and merged.report.lam == 0.5
    assert merged.report.merged_keys == ["enc.w"] and merged.report.params["k"] == 0.5
    assert merged.report.thresholds == [2.0]  # int(0.5 * 3) = 1 entry kept: the largest, |-2.0|


# ---- names ------------------------------------------------------------------------------------
def test_the_0_1_deprecated_alias_is_gone_everywhere() -> None:
    # given the one name of the merged task vector
    tau = merged_task_vector(BASE, MODELS)
    assert type(tau) is MergedTaskVector
    # then the 0.1 alias ``TaskVector`` exists nowhere (package, engine, top level)
    import lightning_ties
    import lightning_ties.merging as merging
    from lightning_ties.merging import engine

    for module in (merging, engine, lightning_ties):
        with pytest.raises(AttributeError, match="has no attribute 'TaskVector'"):
            module.TaskVector  # noqa: B018
    assert not hasattr(merging, "DEPRECATED_NAMES")


def test_every_public_name_of_merging_is_defined_once() -> None:
    # a function or class of merging is defined in one module only (kernels' fused merge is not ``ties_merge``)
    import importlib
    import pkgutil

    import lightning_ties.merging as merging

    defined: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(merging.__path__):
        module = importlib.import_module(f"lightning_ties.merging.{info.name}")
        for name, value in vars(module).items():
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__ and callable(value):
                defined.setdefault(name, []).append(info.name)
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    assert not twice, twice
