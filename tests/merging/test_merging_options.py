"""MergeOptions: one frozen, validated recipe built at the entry points and passed inward."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from lightning_ties.merging import MergeOptions, TaskVectorMerger, merge, merged_task_vector, ties_merge
from lightning_ties.merging.registry import METHODS

BASE = {"enc.w": torch.zeros(4), "head.w": torch.zeros(2)}
MODELS = [
    {"enc.w": torch.tensor([1.0, -2.0, 0.5, 3.0]), "head.w": torch.ones(2)},
    {"enc.w": torch.tensor([-1.0, 1.0, 2.0, 0.25]), "head.w": -torch.ones(2)},
]


def test_defaults_are_resolved_from_the_registry() -> None:
    opts = MergeOptions("ties")
    assert (opts.k, opts.lam, opts.scope) == (0.2, 1.0, "global")
    assert opts.method_params == {"k": 0.2, "scope": "global", "sign": "mass", "merge": "mean"}
    assert opts.spec.k == 0.2 and opts.spec.sign == "mass"
    dare = MergeOptions("dare", params={"p": 0.5})
    assert dare.k is None and dare.scope is None and dare.spec.p == 0.5 and dare.lam == 0.4


def test_options_are_frozen_and_hashable() -> None:
    opts = MergeOptions("ties", k=0.3, exclude="head")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.k = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        opts.params["sign"] = "count"  # type: ignore[index]
    assert opts == MergeOptions("ties", k=0.3, exclude="head") and hash(opts) == hash(MergeOptions("ties", k=0.3, exclude="head"))
    assert opts.replace(k=0.1).k == 0.1 and opts.k == 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "tiez"}, r"unknown merge method 'tiez'; choose one of"),
        ({"params": {"sgn": "count"}}, r"method 'ties' has no parameter\(s\) \['sgn'\]; its parameters are \['k', 'merge', 'scope', 'sign'\]"),
        ({"params": {"sign": "bogus"}}, r"method 'ties': unknown sign 'bogus'; choose one of 'mass', 'count', 'normfrac', 'normmass'"),
        ({"params": {"merge": "median"}}, r"unknown merge 'median'; choose one of 'mean', 'sum', 'max', 'task_mean'"),
        ({"scope": "layer"}, r"unknown scope 'layer'; choose one of 'global', 'per_tensor'"),
        ({"k": 1.5}, r"k must be in \(0, 1\] \(the fraction of each task vector kept\), got 1.5"),
        ({"k": True}, r"k must be in \(0, 1\]"),
        ({"lam": float("nan")}, r"lam must be a finite number"),
        ({"method": "dare", "params": {"p": 1.0}}, r"method 'dare': p must be in \[0, 1\)"),
        ({"method": "dare", "params": {"seed": 1.5}}, r"seed must be an integer >= 0"),
        ({"method": "task_arithmetic", "k": 0.2}, r"method 'task_arithmetic' has no parameter\(s\) \['k'\]"),
        ({"method": "iso_cts", "params": {"common_fraction": 2}}, r"common_fraction must be in \[0, 1\]"),
        ({"params": {"k": 0.2}}, r"pass k as MergeOptions field"),
        ({"method": "average", "lam": 0.5}, r"method 'average' has no lam to set"),
    ],
)
def test_a_bad_value_fails_at_construction_naming_it(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MergeOptions(**kwargs)


def test_patterns_are_compiled_once_and_a_bad_one_is_named() -> None:
    opts = MergeOptions("ties", include=["^enc"], exclude="head")
    assert all(isinstance(p, re.Pattern) for p in (*opts.include, *opts.exclude))
    with pytest.raises(ValueError, match=r"exclude\[1\]='\(' is not a valid regular expression"):
        MergeOptions("ties", exclude=["ok", "("])
    with pytest.raises(ValueError, match=r"include='\[' is not a valid regular expression"):
        ties_merge(BASE, MODELS, include="[")


def test_every_registered_method_builds_options_with_its_defaults() -> None:
    for name, method in METHODS.items():
        opts = MergeOptions(name)
        assert opts.method_params == method.parameters()
        if method.needs_data:
            with pytest.raises(ValueError, match="needs each task's validation data"):
                opts.spec  # noqa: B018


def test_options_drive_the_engine_like_the_keywords() -> None:
    # given the same recipe as keywords and as options
    opts = MergeOptions("ties", k=0.5, lam=0.7, params={"merge": "sum"}, exclude="head")
    by_keywords = ties_merge(BASE, MODELS, k=0.5, lam=0.7, merge="sum", exclude="head")
    by_options = merge(BASE, MODELS, opts)
    # then the merge and its report are the same
    for key in by_keywords:
        assert torch.equal(by_keywords[key], by_options[key])
    assert by_options.report.params == by_keywords.report.params == {"k": 0.5, "scope": "global", "sign": "mass", "merge": "sum"}
    tau = merged_task_vector(BASE, MODELS, opts)
    assert tau.report.method == "ties" and list(tau) == ["enc.w"]
    assert torch.equal(dict(TaskVectorMerger(BASE, MODELS, opts))["enc.w"], tau["enc.w"])
    # and options come alone: the same knob twice is an error, not a silent choice
    with pytest.raises(ValueError, match="inside MergeOptions"):
        merge(BASE, MODELS, opts, k=0.2)
    with pytest.raises(ValueError, match="inside MergeOptions"):
        TaskVectorMerger(BASE, MODELS, opts, exclude="enc")


def test_k_reaches_the_trim_as_a_named_field() -> None:
    # k given by name to the entry point is the k the engine's spec trims with
    merger = TaskVectorMerger(BASE, MODELS, MergeOptions.from_keywords("ties", k=0.25, exclude="head"))
    assert merger.spec.k == 0.25
    dict(merger)
    assert [t.kept for t in merger.thresholds] == [1, 1]  # int(0.25 * 4 merged entries) per task
