"""Reliability of the engine (issue 10): numbers that are not numbers, tied weights, foreign checkpoints."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ties import merge, merge_to, task_arithmetic, ties_merge
from lightning_ties.merging import (
    MAX_LAM,
    StateDictSource,
    apply_task_vector,
    as_source,
    check_lam,
    get_method,
    method_task_vector,
    plan_merge,
)


def small_models(n_tasks: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_tasks)]
    return base, fts


# ---- lam --------------------------------------------------------------------------------------
@pytest.mark.parametrize("good", [0.0, 1, 0.4, -2.5, MAX_LAM, -MAX_LAM, torch.tensor(0.5)])
def test_check_lam_accepts_finite_numbers_in_range(good: object) -> None:
    assert check_lam(good) == float(good)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (float("nan"), "finite number, got nan"),
        (float("inf"), "finite number, got inf"),
        (-math.inf, "finite number, got -inf"),
        (1e39, r"lam=1e\+39 is out of range"),
        (MAX_LAM + 1, "out of range"),
        ("1.0", "real number .* got '1.0' of type str"),
        (True, "real number .* got True of type bool"),
        (None, "got None"),
    ],
)
def test_check_lam_refuses_what_is_not_a_usable_lam(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_lam(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39, "1.0"])
def test_every_engine_entry_point_refuses_a_bad_lam(bad: object, tmp_path: Path) -> None:
    base, fts = small_models()
    with pytest.raises(ValueError, match="lam"):
        ties_merge(base, fts, lam=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        task_arithmetic(base, fts, lam=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        merge(base, fts, "dare_ties", lam=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam"):
        get_method("average").resolve_lam(bad)  # type: ignore[arg-type]
    tau = method_task_vector(base, fts, "ties")
    with pytest.raises(ValueError, match="lam"):
        tau.apply(base, bad)  # type: ignore[arg-type]
    module = nn.Linear(4, 6)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="lam"):
        apply_task_vector({"weight": before["weight"], "bias": before["bias"]}, {"weight": torch.ones(6, 4)}, bad, out=module)  # type: ignore[arg-type]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())  # nothing written
    out = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="lam"):
        merge_to(out, base, fts, lam=bad, progress=False)  # type: ignore[arg-type]
    assert not out.exists()


# ---- tied weights -------------------------------------------------------------------------------
class Tied(nn.Module):
    """An embedding whose output projection is the same Parameter (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight


def tied_models(n_tasks: int = 3):
    torch.manual_seed(0)
    base = Tied()
    fts = []
    for _ in range(n_tasks):
        ft = copy.deepcopy(base)  # keeps the tie
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn_like(p))
        fts.append(ft)
    return base, fts


def test_sources_detect_tied_weights_by_storage() -> None:
    base, _ = tied_models()
    assert as_source(base).aliases == {"out.weight": "emb.weight"}
    t = torch.ones(3)
    assert StateDictSource({"a": t, "b": t, "c": t.clone(), "d": t[:2]}).aliases == {"b": "a"}


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_tied_weights_are_merged_once_and_stay_tied(scope: str) -> None:
    # Given a module whose state dict holds one tensor under two names, when merged, then it is
    # merged once (as an untied model holding it once would be) and both names get that tensor.
    base, fts = tied_models()
    result = ties_merge(base, fts, k=0.3, scope=scope)
    assert result["out.weight"] is result["emb.weight"]
    assert "emb.weight" in result.report.merged_keys and "out.weight" not in result.report.merged_keys
    assert "tied to 'emb.weight'" in result.report.skipped["out.weight"]
    assert result.report.aliases == {"out.weight": "emb.weight"}
    once = lambda m: {k: v for k, v in m.state_dict().items() if k != "out.weight"}  # noqa: E731
    expected = ties_merge(once(base), [once(ft) for ft in fts], k=0.3, scope=scope)
    for key, value in expected.items():
        assert torch.equal(result[key], value), key
    fresh = Tied()
    fresh.load_state_dict(result)
    assert fresh.out.weight is fresh.emb.weight and torch.equal(fresh.out.weight, expected["emb.weight"])


def test_apply_into_a_tied_module_writes_the_tensor_once() -> None:
    base, fts = tied_models()
    target = copy.deepcopy(base)
    # a tau_m that (wrongly) holds two values for the one tensor: the first name's wins, once
    tau = {"emb.weight": torch.full((10, 4), 1.0), "out.weight": torch.full((10, 4), -5.0)}
    result = apply_task_vector(base, tau, 0.5, out=target)
    assert target.out.weight is target.emb.weight
    assert torch.equal(target.emb.weight.detach(), base.emb.weight.detach() + 0.5)
    assert torch.equal(result["out.weight"], result["emb.weight"])



def test_merge_to_writes_the_merged_tied_tensor_under_both_names(tmp_path) -> None:
    from lightning_ties.io import merge_to, open_source

    base, fts = tied_models()
    merge_to(tmp_path / "merged.safetensors", base, fts, k=0.3, progress=False)
    written = open_source(tmp_path / "merged.safetensors")
    expected = ties_merge(base, fts, k=0.3)
    assert torch.equal(written.get("out.weight"), expected["emb.weight"])
    assert torch.equal(written.get("emb.weight"), expected["emb.weight"])

# ---- checkpoints of another architecture ------------------------------------------------------
def layered(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s) for k, s in shapes.items()}


BASE_SHAPES = {"l1.weight": (4, 4), "l1.bias": (4,), "l2.weight": (3, 4), "l2.bias": (3,), "step": ()}


def test_a_checkpoint_whose_shared_keys_mostly_differ_in_shape_is_refused() -> None:
    base = layered(BASE_SHAPES)
    ft = layered(BASE_SHAPES)
    foreign = layered({"l1.weight": (8, 8), "l1.bias": (8,), "l2.weight": (3, 8), "l2.bias": (3,)})
    with pytest.raises(ValueError, match="another architecture") as err:
        ties_merge(base, [ft, foreign])
    message = str(err.value)
    assert "model[1]" in message and "3 of the 4" in message and "'l1.weight'" in message
    assert "model[0]" not in message


def test_a_few_differing_keys_are_heads_taken_from_base_with_a_warning_naming_them() -> None:
    base = layered(BASE_SHAPES)
    ft = layered({**BASE_SHAPES, "l2.bias": (5,)})
    with pytest.warns(UserWarning, match=r"l2\.bias"):
        result = ties_merge(base, [ft, layered(BASE_SHAPES)])
    assert torch.equal(result["l2.bias"], base["l2.bias"])
    assert "shape differs" in result.report.skipped["l2.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False: the Lightning layer reports heads itself
        plan = plan_merge(as_source(base), [as_source(ft)], warn=False)
    assert "l2.bias" not in plan.merge_keys
