"""Exact TIES on W ranks: each rank merges its flat ranges, and the pieces are the one process's bits.

Given a model cut into per-key flat ranges (uneven, some empty, some keys whole on one rank),
every rank merges only what it holds, agreeing with the others through ``Collectives``
(counts, a sample, tie counts, a sign sum, the one tensor an SVD factors). Then the pieces,
put back in flat order, equal ``merged_task_vector`` / ``ties_merge`` in one process bit for
bit. The real thing runs on gloo (2 and 3 processes, ``distributed`` marker); the same rank
function runs on W threads of one process for the hypothesis properties.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import RangeSource, run_gloo, run_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ties.merging import (
    SINGLE_PROCESS,
    MagnitudeSelector,
    MergeOptions,
    MergeSpec,
    TaskVectorMerger,
    keep_count,
    merged_task_vector,
    ties_merge,
    top_magnitude_threshold,
)
from lightning_ties.merging.steps import scale

SHAPES = {"a": (3000,), "b": (40, 30), "c": (7,), "d": (24, 20)}
#: per world size, per key: each rank's flat range (uneven; empty; whole on one rank; split 3 ways)
LAYOUTS = {
    2: {"a": [(0, 1700), (1700, 3000)], "b": [(0, 0), (0, 1200)], "c": [(0, 7), (0, 0)], "d": [(0, 100), (100, 480)]},
    3: {
        "a": [(0, 0), (0, 1234), (1234, 3000)],
        "b": [(0, 400), (400, 401), (401, 1200)],
        "c": [(0, 0), (0, 7), (0, 0)],
        "d": [(0, 50), (50, 300), (300, 480)],
    },
}
#: name -> options or spec; the TIES family exactly, the SVD and closed-form methods through the gathered tensor
CASES = {
    "ties": MergeOptions("ties", k=0.3),
    "ties_count_max": MergeOptions("ties", k=0.2, params={"sign": "count", "merge": "max"}),
    "ties_per_tensor": MergeOptions("ties", k=0.3, scope="per_tensor"),
    "ties_no_trim": MergeOptions("ties_no_trim"),
    "magnitude_prune": MergeOptions("magnitude_prune", k=0.4, scope="global"),
    "dare": MergeOptions("dare", params={"p": 0.3, "seed": 5}),
    "dare_ties": MergeOptions("dare_ties", params={"p": 0.5, "seed": 2}),
    "task_arithmetic": MergeOptions("task_arithmetic"),
    "tsv": MergeOptions("tsv"),
    "iso_c": MergeOptions("iso_c"),
    "iso_cts": MergeOptions("iso_cts"),
    "wudi": MergeOptions("wudi"),
    "ace": MergeOptions("ace"),
    "average": MergeOptions("average"),
    "ties_no_elect": MergeOptions("ties_no_elect", k=0.3),
    "ties_plain_mean": MergeOptions("ties_plain_mean", k=0.3),
}
#: registered methods no case above merges across ranks, and why
NOT_ACROSS_RANKS = {"regmean": "needs each task's data on whole weights: the sharded callback refuses it, naming it"}


def grid_models(seed: int, n_tasks: int = 3, dtype: torch.dtype = torch.float32):
    """Base and task vectors on a grid of quarters: many exact ties at every threshold, exact
    zero sign scores (contested entries), and a negative majority sign that only shows globally
    (the start of ``a`` leans positive, the rest negative)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randint(-8, 8, s, generator=g) / 4).to(dtype) for k, s in SHAPES.items()}
    fts = []
    for _ in range(n_tasks):
        ft = {}
        for key, b in base.items():
            step = torch.randint(0, 5, b.shape, generator=g) / 4
            negative = torch.rand(b.shape, generator=g) < 0.5
            if key == "a":
                negative[:600] = torch.rand(600, generator=g) < 0.2
                negative[600:] = torch.rand(2400, generator=g) < 0.7
            ft[key] = (b.float() + torch.where(negative, -step, step)).to(dtype)
        fts.append(ft)
    return base, fts


def rank_shards(layout: dict[str, list[tuple[int, int]]], rank: int) -> dict[str, tuple[int, int]]:
    return {key: ranges[rank] for key, ranges in layout.items()}


def merge_pieces(collectives, seed: int, dtype_name: str, cases: list[str], bracket: bool = False) -> dict:
    """One rank's pieces of every case (what each rank sends back to the test)."""
    dtype = getattr(torch, dtype_name)
    base, fts = grid_models(seed, dtype=dtype)
    shards = rank_shards(LAYOUTS[collectives.world_size], collectives.rank)
    out: dict = {"reads": {}}
    for name in cases:
        sources = [RangeSource(sd, shards, f"model[{i}]") for i, sd in enumerate([base, *fts])]
        merger = TaskVectorMerger(sources[0], sources[1:], CASES[name], collectives=collectives, shards=shards)
        if bracket:  # a sampled bracket on this small model: the gathered sample, one counting pass
            merger.finder.min_bracketed, merger.finder.sample_size = 1000, 512
        out[name] = {key: tau.clone() for key, tau in merger}
        if name == "ties":
            out["ties_components"] = dict(
                TaskVectorMerger(sources[0], sources[1:], CASES[name], collectives=collectives, shards=shards).components()
            )
            out["thresholds"] = merger.thresholds
        out["reads"][name] = {i: dict(s.reads) for i, s in enumerate(sources)}
    return out


def assert_pieces_equal_one_process(results: list[dict], seed: int, dtype: torch.dtype, cases: list[str]) -> None:
    world = len(results)
    base, fts = grid_models(seed, dtype=dtype)
    layout = LAYOUTS[world]
    for name in cases:
        expected = merged_task_vector(base, fts, CASES[name])
        for key, ranges in layout.items():
            flat = expected[key].reshape(-1)
            for rank, (start, stop) in enumerate(ranges):
                piece = results[rank][name][key]
                if (start, stop) == (0, flat.numel()):
                    assert piece.shape == expected[key].shape, (name, key, rank)
                assert piece.numel() == stop - start, (name, key, rank)
                same = torch.equal(piece.reshape(-1).view(torch.int32), flat[start:stop].view(torch.int32))
                assert same, (name, key, rank, (piece.reshape(-1) - flat[start:stop]).abs().max())
                # a rank never reads a key it holds nothing of
                if stop == start:
                    assert all(key not in reads for reads in results[rank]["reads"][name].values()), (name, key, rank)
    if "ties" in cases:
        one = TaskVectorMerger(base, fts, CASES["ties"])
        shares = dict(one.components())
        assert all(r["thresholds"] == one.thresholds for r in results)
        merged = ties_merge(base, fts, k=0.3)
        for key, ranges in layout.items():
            for rank, (start, stop) in enumerate(ranges):
                got = results[rank]["ties_components"][key].reshape(len(fts), -1)
                assert torch.equal(got, shares[key].reshape(len(fts), -1)[:, start:stop]), key
                # theta = base + lam * tau_m on the piece: ties_merge's bits
                theta = scale(base[key].reshape(-1)[start:stop], results[rank]["ties"][key].reshape(-1), 1.0).to(dtype)
                assert torch.equal(theta, merged[key].reshape(-1)[start:stop]), key


def selector_pieces(collectives, seed: int, dtype_name: str) -> list:
    """Each rank observes its slices of a tie-heavy vector; thresholds from the all-summed counts."""
    values = tie_heavy(seed, getattr(torch, dtype_name))
    cuts = [0, 0, 5000, 5001, 9000, values.numel()]  # rank r observes every W-th slice (uneven, one empty)
    mine = [values[a:b] for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])) if i % collectives.world_size == collectives.rank]
    found = []
    for k in (0.05, 0.3, 0.77, 1.0):
        m = keep_count(k, values.numel())
        for bracket in (None, "around"):
            exact = values.float().abs().kthvalue(values.numel() - m + 1).values if m else None
            lo_hi = None
            if bracket and exact is not None:
                lo_hi = (float(exact) * 0.999, float(exact) * 1.001)
            sel = MagnitudeSelector(m, torch.float32, lo_hi, reduce=collectives.all_sum)
            while not sel.done:
                for piece in mine:
                    sel.observe(piece.float())
                sel.next_pass()
            found.append((k, bracket, sel.result(), sel.used_bracket))
    return found


def tie_heavy(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-40, 41, (12000,), generator=g) / 16).to(dtype)


def assert_selector_is_kthvalue(results: list[list], seed: int, dtype: torch.dtype) -> None:
    mags = tie_heavy(seed, dtype).float().abs()
    n = mags.numel()
    for found in zip(*results):
        assert all(f[2] == found[0][2] for f in found)  # every rank: the same threshold
        k, bracket, result, used_bracket = found[0]
        m = keep_count(k, n)
        value = mags.kthvalue(n - m + 1).values
        assert result.value == float(value), (k, bracket)
        assert result.n_greater == int((mags > value).sum()) and result.n_equal == int((mags == value).sum())
        assert result.n_equal > 1 and used_bracket == (bracket is not None), (k, bracket)


# ---- real processes (gloo) ----------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_ranks_merge_the_one_process_bits(world_size: int) -> None:
    cases = list(CASES)
    results = run_gloo(world_size, "test_merging_distributed:merge_pieces", 0, "float32", cases, timeout=90)
    assert_pieces_equal_one_process(results, 0, torch.float32, cases)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_gloo_selector_and_bf16_merge_with_a_sampled_bracket() -> None:
    # bf16 models, a bracket sampled over the ranks' pieces (gathered), on 3 processes
    cases = ["ties", "ties_per_tensor", "dare_ties"]
    results = run_gloo(3, "test_merging_distributed:merge_pieces", 4, "bfloat16", cases, True, timeout=90)
    assert_pieces_equal_one_process(results, 4, torch.bfloat16, cases)
    for dtype in ("float32", "bfloat16"):
        found = run_gloo(2, "test_merging_distributed:selector_pieces", 1, dtype, timeout=90)
        assert_selector_is_kthvalue(found, 1, getattr(torch, dtype))


# ---- W ranks as threads of this process (fast) --------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_ranks_merge_the_one_process_bits(world_size: int, dtype: str) -> None:
    cases = list(CASES)
    results = run_threads(world_size, merge_pieces, 3, dtype, cases, dtype == "bfloat16")
    assert_pieces_equal_one_process(results, 3, getattr(torch, dtype), cases)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thread_selector_threshold_is_kthvalue_of_the_concatenation(dtype: str) -> None:
    assert_selector_is_kthvalue(run_threads(3, selector_pieces, 2, dtype), 2, getattr(torch, dtype))


def split_merge(collectives, base, fts, spec, layout):
    shards = rank_shards(layout, collectives.rank)
    sources = [RangeSource(sd, shards, f"m{i}") for i, sd in enumerate([base, *fts])]
    return dict(TaskVectorMerger(sources[0], sources[1:], spec, collectives=collectives, shards=shards))


@st.composite
def split_models(draw):
    world = draw(st.integers(2, 3))
    n_tasks = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = {f"k{j}": torch.randint(-4, 4, (n,), generator=g) / 2 for j, n in enumerate(sizes)}
    fts = [{k: v + torch.randint(-3, 4, v.shape, generator=g) / 2 for k, v in base.items()} for _ in range(n_tasks)]
    layout = {}
    for key, n in zip(base, sizes):
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=world - 1, max_size=world - 1)))
        bounds = [0, *cuts, n]
        ranges = list(zip(bounds[:-1], bounds[1:]))
        order = draw(st.permutations(range(world)))  # ranks need not hold their pieces in rank order
        layout[key] = [ranges[order[r]] for r in range(world)]
    spec = MergeSpec(
        k=draw(st.sampled_from([0.1, 0.3, 0.5, 1.0])),
        scope=draw(st.sampled_from(["global", "per_tensor"])),
        sign=draw(st.sampled_from(["mass", "count"])),
        merge=draw(st.sampled_from(["mean", "sum", "max", "task_mean"])),
    )
    return world, base, fts, spec, layout


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_models())
def test_any_split_over_any_ranks_gives_the_one_process_bits(case) -> None:
    world, base, fts, spec, layout = case
    expected = dict(TaskVectorMerger(base, fts, spec))
    pieces = run_threads(world, split_merge, base, fts, spec, layout)
    for key, ranges in layout.items():
        flat = expected[key].reshape(-1)
        for rank, (start, stop) in enumerate(ranges):
            assert torch.equal(pieces[rank][key].reshape(-1), flat[start:stop]), (key, rank, spec)


# ---- what is checked, and what is cheap ---------------------------------------------------------
def test_one_process_with_whole_ranges_is_the_plain_merge_and_talks_to_nobody() -> None:
    base, fts = grid_models(0)
    shards = {k: (0, v.numel()) for k, v in base.items()}
    got = merged_task_vector(base, fts, CASES["ties"], collectives=SINGLE_PROCESS, shards=shards)
    expected = merged_task_vector(base, fts, CASES["ties"])
    assert all(torch.equal(got[k], expected[k]) and got[k].shape == expected[k].shape for k in expected)


def test_ranks_owning_whole_keys_need_only_the_small_collectives() -> None:
    # given two ranks that split the work by keys (merge_to on W processes), per-tensor TIES
    base, fts = grid_models(5)
    owner = {"a": 0, "b": 1, "c": 1, "d": 0}
    layout = {k: [(0, base[k].numel()) if owner[k] == r else (0, 0) for r in range(2)] for k in base}
    spec = MergeOptions("ties", k=0.3, scope="per_tensor")
    calls = []

    def run(collectives):
        out = split_merge(collectives, base, fts, spec, layout)
        calls.append(collectives.calls)
        return out

    pieces = run_threads(2, run)
    expected = merged_task_vector(base, fts, spec)
    for key in base:
        assert torch.equal(pieces[owner[key]][key], expected[key]) and pieces[1 - owner[key]][key].numel() == 0
    assert calls == [1, 1]  # the ranges' all_gather only: no key is split, so no count crosses ranks


def test_ranges_that_do_not_tile_a_key_are_refused_on_every_rank() -> None:
    base, fts = grid_models(0)
    layout = {k: [(0, v.numel()), (0, 0)] for k, v in base.items()}
    layout["a"] = [(0, 1500), (1400, 3000)]  # overlap
    with pytest.raises(ValueError, match=r"shards of 'a' do not tile its 3000 entries exactly \(rank 0: \[0, 1500\), rank 1: \[1400, 3000\)\)"):
        run_threads(2, split_merge, base, fts, MergeSpec(k=0.3), layout)


def test_shards_are_required_on_several_ranks_and_must_match_what_sources_return() -> None:
    base, fts = grid_models(0)
    with pytest.raises(ValueError, match="merging on 2 ranks needs shards"):
        run_threads(2, lambda c: TaskVectorMerger(base, fts, MergeSpec(), collectives=c))
    shards = {k: (0, v.numel()) for k, v in base.items()}
    shards["a"] = (0, 10)
    with pytest.raises(ValueError, match=r"shards of 'a' do not tile"):
        merged_task_vector(base, fts, MergeSpec(), shards=shards)
    two = {k: [(0, v.numel()), (0, 0)] for k, v in base.items()}
    two["a"] = [(0, 1000), (1000, 3000)]

    def whole_sources(collectives):  # sources that return whole tensors although the shard is a range
        return dict(TaskVectorMerger(base, fts, MergeSpec(), collectives=collectives, shards=rank_shards(two, collectives.rank)))

    with pytest.raises(ValueError, match=r"base returned 3000 entries for 'a', but its shard is the flat range \[\d+, \d+\)"):
        run_threads(2, whole_sources)


def test_every_registered_method_is_checked_across_ranks_or_said_why_not() -> None:
    from lightning_ties.merging.registry import METHODS

    assert set(METHODS) == {options.method for options in CASES.values()} | set(NOT_ACROSS_RANKS)


def test_norm_based_signs_are_refused_where_their_float_sums_would_depend_on_the_split() -> None:
    base, fts = grid_models(0)
    layout = {k: [(0, v.numel()), (0, 0)] for k, v in base.items()}
    with pytest.raises(ValueError, match=r"sign='normfrac' cannot merge across ranks here \(the global scope spans ranks\)"):
        run_threads(2, split_merge, base, fts, MergeSpec(k=0.3, sign="normfrac"), layout)
    # per tensor, with every tensor whole on one rank, it is exact
    spec = MergeSpec(k=0.3, sign="normmass", scope="per_tensor")
    pieces = run_threads(2, split_merge, base, fts, spec, layout)
    expected = dict(TaskVectorMerger(base, fts, spec))
    assert all(torch.equal(pieces[0][k], expected[k]) for k in expected)


def test_a_nan_on_one_rank_stops_every_rank_with_the_selectors_error() -> None:
    base, fts = grid_models(0)
    fts[1]["a"][2500] = float("nan")  # on rank 1's range only
    layout = LAYOUTS[2]
    errors = []

    def run(collectives):
        try:
            split_merge(collectives, base, fts, MergeSpec(k=0.3), layout)
        except ValueError as err:
            errors.append((collectives.rank, str(err)))

    run_threads(2, run)
    assert sorted(r for r, _ in errors) == [0, 1]
    messages = dict(errors)
    assert "task vector of m2 at 'a' holds NaN or Inf" in messages[1]
    assert "held by another rank holds NaN or Inf" in messages[0]


def test_top_magnitude_threshold_over_ranks_is_the_threshold_of_the_concatenation() -> None:
    values = tie_heavy(7, torch.float32)
    pieces = [values[:100], values[100:100], values[100:7000], values[7000:]]

    def run(collectives):
        return top_magnitude_threshold(pieces[collectives.rank :: collectives.world_size], 0.3, collectives)

    found = run_threads(3, run)
    assert found[0] == found[1] == found[2] == top_magnitude_threshold(values, 0.3)


def test_merging_never_imports_process_group_code() -> None:
    # the collectives are injected: no module of merging imports torch.distributed (nor Lightning)
    import ast
    from pathlib import Path

    import lightning_ties.merging as merging

    for path in Path(merging.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(("torch.distributed", "lightning", "pytorch_lightning"))]
            assert not bad, (path.name, bad)
