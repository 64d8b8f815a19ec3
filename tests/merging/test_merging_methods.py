"""The method registry against direct formulas; keys, heads, bad input, in-place application."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ties import average_merge, merge, task_arithmetic, ties_merge
from lightning_ties.merging import (
    METHODS,
    MergeSpec,
    TaskVectorMerger,
    apply_task_vector,
    describe_methods,
    disjoint_merge,
    elect_sign,
    get_method,
    method_task_vector,
    trim,
)


def random_models(n_tasks: int = 3, seed: int = 0, numel: int = 400):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(numel // 20, 20, generator=g), "b": torch.randn(7, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_tasks)]
    return base, fts


def stacked_taus(base, fts, key):
    return torch.stack([ft[key] - base[key] for ft in fts])


def test_registry_lists_every_method_with_its_parameters() -> None:
    expected = {"ties", "task_arithmetic", "average", "ties_no_trim", "ties_no_elect", "ties_plain_mean",
                "magnitude_prune", "dare", "dare_ties"}  # fmt: skip
    assert expected <= set(METHODS)
    assert get_method("ties").parameters() == {"k": 0.2, "scope": "global", "sign": "mass", "merge": "mean"}
    table = describe_methods()
    assert all(name in table for name in expected)


def test_average_is_the_mean_of_the_fine_tuned_weights() -> None:
    _, fts = random_models()
    merged = average_merge(fts)
    for key in fts[0]:
        torch.testing.assert_close(merged[key], torch.stack([ft[key] for ft in fts]).mean(0))


def test_task_arithmetic_is_base_plus_lam_times_the_sum() -> None:
    base, fts = random_models()
    merged = task_arithmetic(base, fts, lam=0.3)
    for key in base:
        torch.testing.assert_close(merged[key], base[key] + 0.3 * stacked_taus(base, fts, key).sum(0))


def test_magnitude_prune_sums_per_tensor_trimmed_task_vectors() -> None:
    base, fts = random_models()
    merged = merge(base, fts, "magnitude_prune", lam=0.5, k=0.3)
    for key in base:
        expected = base[key] + 0.5 * trim(stacked_taus(base, fts, key).flatten(1), 0.3).sum(0).reshape(base[key].shape)
        torch.testing.assert_close(merged[key], expected)


def test_ties_no_trim_is_ties_with_k_one() -> None:
    base, fts = random_models()
    a = method_task_vector(base, fts, "ties_no_trim")
    b = method_task_vector(base, fts, "ties", k=1.0)
    assert all(torch.equal(a[key], b[key]) for key in base)


def test_ties_no_elect_averages_all_non_zero_trimmed_values() -> None:
    base, fts = random_models()
    tau = method_task_vector(base, fts, "ties_no_elect", k=0.4, scope="per_tensor")
    for key in base:
        trimmed = trim(stacked_taus(base, fts, key).flatten(1), 0.4)
        expected = trimmed.sum(0) / (trimmed != 0).sum(0).clamp(min=1)
        torch.testing.assert_close(tau[key].reshape(-1), expected)


def test_ties_plain_mean_divides_agreeing_values_by_the_number_of_tasks() -> None:
    base, fts = random_models(n_tasks=4)
    tau = method_task_vector(base, fts, "ties_plain_mean", k=0.4, scope="per_tensor")
    for key in base:
        trimmed = trim(stacked_taus(base, fts, key).flatten(1), 0.4)
        gamma = elect_sign(trimmed)
        expected = (trimmed * (trimmed * gamma > 0)).sum(0) / 4
        torch.testing.assert_close(tau[key].reshape(-1), expected)


def dare_deltas(base, fts, p: float, seed: int) -> dict[str, torch.Tensor]:
    """Each task's dropped-and-rescaled task vector (DARE's sparsify step alone)."""
    merger = TaskVectorMerger(base, fts, MergeSpec("dare", p=p, sign=None, merge="sum", seed=seed))
    return dict(merger.components())


def test_dare_drops_with_probability_p_and_rescales_survivors() -> None:
    base, fts = random_models(n_tasks=2, numel=20_000)
    deltas = dare_deltas(base, fts, p=0.7, seed=5)
    for key in base:
        taus = stacked_taus(base, fts, key)
        kept = deltas[key] != 0
        torch.testing.assert_close(deltas[key][kept], taus[kept] / 0.3)
        if key == "w":  # 20000 draws per task: the kept share is 0.3 within a few standard errors
            share = kept.float().mean(dim=tuple(range(1, kept.dim())))
            assert torch.all((share - 0.3).abs() < 5 * math.sqrt(0.3 * 0.7 / 20_000))
        # and the dare method is their sum, scaled by lam
        merged = merge(base, fts, "dare", lam=0.5, p=0.7, seed=5)
        torch.testing.assert_close(merged[key], base[key] + 0.5 * deltas[key].sum(0))


def test_dare_is_reproducible_per_seed_and_independent_of_chunking() -> None:
    base, fts = random_models(numel=2000)
    spec = MergeSpec("dare", p=0.5, sign=None, merge="sum", seed=1)
    a = dict(TaskVectorMerger(base, fts, spec))
    b = dict(TaskVectorMerger(base, fts, spec, chunk_size=3))
    c = dict(TaskVectorMerger(base, fts, MergeSpec("dare", p=0.5, sign=None, merge="sum", seed=2)))
    assert torch.equal(a["w"], b["w"])
    assert not torch.equal(a["w"], c["w"])


def test_dare_ties_elects_and_disjoint_merges_the_dare_vectors() -> None:
    base = {"w": torch.zeros(3000)}
    fts = [{"w": torch.randn(3000, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    deltas = dare_deltas(base, fts, p=0.6, seed=9)["w"]
    tau = method_task_vector(base, fts, "dare_ties", p=0.6, seed=9)
    torch.testing.assert_close(tau["w"], disjoint_merge(deltas, elect_sign(deltas), "mean"))


def test_tau_applied_for_many_lams_equals_fresh_merges() -> None:
    base, fts = random_models()
    tau = method_task_vector(base, fts, "ties", k=0.3)
    for lam in (0.8, 1.3):
        again = ties_merge(base, fts, k=0.3, lam=lam)
        applied = tau.apply(base, lam)
        assert all(torch.equal(applied[key], again[key]) for key in base)
        assert applied.report.lam == lam


def test_apply_task_vector_writes_into_the_module_in_place() -> None:
    torch.manual_seed(0)
    base_model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fts = []
    for _ in range(2):
        ft = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        ft.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            ft[0].weight.add_(torch.randn(3, 4))
        fts.append(ft)
    base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
    tau = method_task_vector(base_sd, fts, "ties", k=0.5)
    target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    weight = target[0].weight
    pointer = weight.data_ptr()
    result = apply_task_vector(base_sd, tau, lam=0.7, out=target)
    assert target[0].weight is weight and weight.data_ptr() == pointer
    torch.testing.assert_close(weight.detach(), base_sd["0.weight"] + 0.7 * tau["0.weight"])
    assert torch.equal(target[1].num_batches_tracked, base_sd["1.num_batches_tracked"])
    assert result["0.weight"].data_ptr() == pointer


def test_components_sum_to_the_merged_task_vector() -> None:
    base, fts = random_models(n_tasks=4)
    for scope in ("global", "per_tensor"):
        merger = TaskVectorMerger(base, fts, MergeSpec(k=0.3, scope=scope))
        tau = dict(TaskVectorMerger(base, fts, MergeSpec(k=0.3, scope=scope)))
        for key, deltas in merger.components():
            assert deltas.shape == (4, *base[key].shape)
            torch.testing.assert_close(deltas.sum(0), tau[key])


# ---- keys -------------------------------------------------------------------------------


def model_with_heads():
    base = {"enc.w": torch.zeros(4), "enc.b": torch.zeros(2), "head.w": torch.zeros(3)}
    ft1 = {"enc.w": torch.ones(4), "enc.b": torch.ones(2), "head.w": torch.ones(5)}
    ft2 = {"enc.w": torch.ones(4), "enc.b": torch.ones(2), "extra": torch.ones(1)}
    return base, [ft1, ft2]


def test_head_like_keys_come_from_base_with_a_warning_and_a_report() -> None:
    base, fts = model_with_heads()
    with pytest.warns(UserWarning, match="head.w") as record:
        merged = ties_merge(base, fts, k=1.0)
    assert "shape" in str(record[0].message) or "missing" in str(record[0].message)
    assert torch.equal(merged["head.w"], base["head.w"])
    assert "missing from model[1]" in merged.report.skipped["head.w"]
    assert "not in base" in merged.report.skipped["extra"] and "extra" not in merged
    assert merged.report.merged_keys == ["enc.w", "enc.b"]
    assert torch.equal(merged["enc.w"], torch.ones(4))


def test_different_shapes_are_reported() -> None:
    base, fts = model_with_heads()
    fts[1]["head.w"] = torch.ones(7)
    with pytest.warns(UserWarning, match="shape differs"):
        merged = ties_merge(base, fts, k=1.0)
    assert "shape differs: base (3,) vs model[0] (5,)" in merged.report.skipped["head.w"]


def test_include_and_exclude_choose_the_merged_keys() -> None:
    base, fts = random_models()
    merged = ties_merge(base, fts, k=1.0, include=r"^w$")
    assert merged.report.merged_keys == ["w"]
    assert torch.equal(merged["b"], base["b"])
    assert not torch.equal(merged["w"], base["w"])
    merged = ties_merge(base, fts, k=1.0, exclude=["^w"])
    assert merged.report.merged_keys == ["b"] and torch.equal(merged["w"], base["w"])


def test_include_naming_a_mismatched_key_is_an_error() -> None:
    base, fts = model_with_heads()
    with pytest.raises(ValueError, match=r"keys selected by include cannot be merged:\n  head.w: missing"):
        ties_merge(base, fts, include=["enc", "head"])


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan"), "0.2"])
def test_k_outside_zero_one_is_refused(k) -> None:
    base, fts = random_models()
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\]"):
        ties_merge(base, fts, k=k)


def test_empty_model_list_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        ties_merge({"w": torch.zeros(2)}, [])
    with pytest.raises(ValueError, match="no models to merge"):
        average_merge([])


@pytest.mark.parametrize(
    ("models", "message"),
    [("ft.safetensors", r"got the single path 'ft.safetensors': pass \['ft.safetensors'\]"),
     ({"w": torch.ones(2)}, r"got one dict: pass it in a list"), (3, "got int$")],
)
def test_one_model_in_place_of_the_list_is_refused_naming_it(tmp_path, models, message) -> None:
    # a path would be iterated into its characters, a state dict into its keys: an error about something else
    from lightning_ties.io import merge_to

    with pytest.raises(ValueError, match=message):
        ties_merge({"w": torch.zeros(2)}, models)
    with pytest.raises(ValueError, match=message):
        average_merge(models)
    with pytest.raises(ValueError, match=message):
        merge_to(tmp_path / "out.safetensors", {"w": torch.zeros(2)}, models, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_any_collection_of_models_is_a_model_list(tmp_path) -> None:
    from lightning_ties.io import merge_to, open_source

    base, tasks = {"w": torch.zeros(4)}, {"a": {"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}, "b": {"w": torch.ones(4)}}
    want = ties_merge(base, list(tasks.values()), k=0.5)["w"]
    assert torch.equal(ties_merge(base, tasks.values(), k=0.5)["w"], want)
    assert torch.equal(ties_merge(base, (m for m in tasks.values()), k=0.5)["w"], want)
    merge_to(tmp_path / "m.safetensors", base, tasks.values(), k=0.5, progress=False)  # worked before the list check
    assert torch.equal(open_source(tmp_path / "m.safetensors").get("w"), want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sign": "majority"}, "method 'ties': unknown sign 'majority'; choose one of 'mass', 'count'"),
        ({"merge": "median"}, "unknown merge 'median'"),
        ({"scope": "layer"}, "unknown scope 'layer'"),
    ],
)
def test_unknown_choices_are_refused_with_the_options(kwargs, message) -> None:
    base, fts = random_models()
    with pytest.raises(ValueError, match=message):
        ties_merge(base, fts, **kwargs)


def test_unknown_method_and_parameter_are_refused() -> None:
    base, fts = random_models()
    with pytest.raises(ValueError, match="unknown merge method 'tie'; choose one of"):
        merge(base, fts, "tie")
    with pytest.raises(ValueError, match=r"method 'dare' has no parameter\(s\) \['k'\]"):
        merge(base, fts, "dare", k=0.2)


@pytest.mark.parametrize("method", ["ties", "ties_per_tensor", "task_arithmetic", "average"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_task_vectors_are_refused_naming_tensor_and_model(method: str, bad: float) -> None:
    base, fts = random_models()
    fts[2]["b"][3] = bad
    params = {"scope": "per_tensor"} if method == "ties_per_tensor" else {}
    with pytest.raises(ValueError, match=r"model\[2\].*'b'.*NaN or Inf"):
        merge(base, fts, method.replace("_per_tensor", ""), **params)


def test_a_method_without_lam_refuses_one_and_defaults_apply() -> None:
    base, fts = {"w": torch.zeros(2)}, [{"w": torch.ones(2)}, {"w": -torch.ones(2)}]
    with pytest.raises(ValueError, match="'average' has no lam to set"):
        merge(base, fts, "average", lam=0.5)
    assert get_method("task_arithmetic").resolve_lam(None) == 0.4
    assert get_method("ties").resolve_lam(1.7) == 1.7
