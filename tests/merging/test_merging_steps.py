"""The steps of TIES-Merging on a 3-task x 5-entry example small enough to check by hand.

Given base = 1 everywhere and three fine-tuned models whose task vectors are

    tau_1 = [ 1.5, -2.0,  0.1,  1.0,  0.0]
    tau_2 = [-1.0,  0.3,  0.2, -3.0, -0.05]
    tau_3 = [ 2.0, -0.2, -0.6,  0.9, -0.1]

trim with k=0.4 keeps int(0.4 * 5) = 2 entries of each task (its two largest |tau|):

    trimmed_1 = [ 1.5, -2.0, 0, 0,    0]
    trimmed_2 = [-1.0,  0,   0, -3.0, 0]
    trimmed_3 = [ 2.0,  0,   0,  0.9, 0]

elect ("mass"): sums [2.5, -2.0, 0, -2.1, 0] -> signs [+, -, 0, -, 0]; the zeros have no
candidate, and the majority (sum of signs = -1) makes them -1: gamma = [+1, -1, -1, -1, -1].

disjoint mean: entry 0 averages the agreeing 1.5 and 2.0 (drops -1.0) -> 1.75; entry 1 -> -2.0;
entry 3 keeps only -3.0 (drops 0.9) -> -3.0: tau_m = [1.75, -2.0, 0, -3.0, 0].
lam = 0.5: theta = 1 + 0.5 * tau_m = [1.875, 0.0, 1.0, -0.5, 1.0].
"""

from __future__ import annotations

import pytest
import torch

from lightning_ties import ties_merge
from lightning_ties.merging import (
    disjoint_components,
    disjoint_merge,
    elect_sign,
    sign_score,
    task_vector,
    trim,
    trim_mask,
    top_magnitude_threshold,
)

BASE = torch.ones(5)
TAUS = torch.tensor(
    [
        [1.5, -2.0, 0.1, 1.0, 0.0],
        [-1.0, 0.3, 0.2, -3.0, -0.05],
        [2.0, -0.2, -0.6, 0.9, -0.1],
    ]
)
TRIMMED = torch.tensor(
    [
        [1.5, -2.0, 0.0, 0.0, 0.0],
        [-1.0, 0.0, 0.0, -3.0, 0.0],
        [2.0, 0.0, 0.0, 0.9, 0.0],
    ]
)
GAMMA = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0])
TAU_M = torch.tensor([1.75, -2.0, 0.0, -3.0, 0.0])


def fine_tuned_models() -> list[dict[str, torch.Tensor]]:
    return [{"w": BASE + tau} for tau in TAUS]


def test_task_vector_is_fine_tuned_minus_base_in_float32() -> None:
    ft = torch.tensor([1.5, 0.0], dtype=torch.bfloat16)
    tau = task_vector(torch.tensor([1.0, 1.0], dtype=torch.bfloat16), ft)
    assert tau.dtype == torch.float32
    assert tau.tolist() == [0.5, -1.0]


def test_trim_keeps_the_two_largest_magnitudes_of_each_task() -> None:
    assert torch.equal(trim(TAUS, k=0.4), TRIMMED)


def test_trim_with_k_one_keeps_everything() -> None:
    assert torch.equal(trim(TAUS, k=1.0), TAUS)


def test_trim_mask_keeps_first_ties_in_flat_order() -> None:
    # given four entries tied at |x| = 1 and k asking for two of them
    x = torch.tensor([1.0, -1.0, 0.5, 1.0, -1.0])
    threshold = top_magnitude_threshold(x, k=0.4)
    # then the first two ties (flat positions 0 and 1) are kept, the later ones dropped
    assert threshold.value == 1.0 and threshold.n_equal == 4 and threshold.ties_to_keep == 2
    assert trim_mask(x.abs(), threshold).tolist() == [True, True, False, False, False]


def test_elect_sign_mass_uses_majority_for_zero_sums() -> None:
    assert sign_score(TRIMMED).tolist() == pytest.approx([2.5, -2.0, 0.0, -2.1, 0.0])
    assert torch.equal(elect_sign(TRIMMED), GAMMA)


def test_elect_sign_count_is_the_sign_of_the_vote() -> None:
    # votes per entry: [+1 -1 +1, -1, 0, -1 +1, 0] = [1, -1, 0, 0, 0]; majority 0 -> +1
    assert sign_score(TRIMMED, "count").tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    assert elect_sign(TRIMMED, "count").tolist() == [1.0, -1.0, 1.0, 1.0, 1.0]


def test_disjoint_merge_variants() -> None:
    assert torch.allclose(disjoint_merge(TRIMMED, GAMMA, "mean"), TAU_M)
    assert torch.allclose(disjoint_merge(TRIMMED, GAMMA, "sum"), torch.tensor([3.5, -2.0, 0.0, -3.0, 0.0]))
    assert torch.allclose(disjoint_merge(TRIMMED, GAMMA, "max"), torch.tensor([2.0, -2.0, 0.0, -3.0, 0.0]))
    assert torch.allclose(
        disjoint_merge(TRIMMED, GAMMA, "task_mean"), torch.tensor([3.5 / 3, -2.0 / 3, 0.0, -1.0, 0.0])
    )


def test_disjoint_merge_without_election_averages_every_non_zero_value() -> None:
    # entry 0: (1.5 - 1 + 2) / 3; entry 3: (-3 + 0.9) / 2
    expected = torch.tensor([2.5 / 3, -2.0, 0.0, -2.1 / 2, 0.0])
    assert torch.allclose(disjoint_merge(TRIMMED, None, "mean"), expected)


def test_disjoint_components_are_each_tasks_share() -> None:
    deltas = disjoint_components(TRIMMED, GAMMA, "mean")
    expected = torch.tensor(
        [
            [0.75, -2.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, -3.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.allclose(deltas, expected)
    assert torch.allclose(deltas.sum(0), TAU_M)


def test_disjoint_components_refuse_max() -> None:
    with pytest.raises(ValueError, match="'max' has no per-task components"):
        disjoint_components(TRIMMED, GAMMA, "max")


def test_ties_merge_end_to_end_applies_lam() -> None:
    merged = ties_merge({"w": BASE}, fine_tuned_models(), k=0.4, lam=0.5)
    assert torch.allclose(merged["w"], torch.tensor([1.875, 0.0, 1.0, -0.5, 1.0]))
    assert merged.report.merged_keys == ["w"]


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_engine_matches_the_hand_computed_steps(scope: str) -> None:
    merged = ties_merge({"w": BASE}, fine_tuned_models(), k=0.4, lam=1.0, scope=scope)
    assert torch.allclose(merged["w"] - BASE, TAU_M)


# ---- the in-place kernel the engine runs, pinned to the plain steps above ---------------------
from lightning_ties.merging.steps import MERGE_FNS, ThresholdTrim, ties_chunk_, scale  # noqa: E402


def _hard_task_vectors(seed: int, n_tasks: int = 5, n: int = 240) -> torch.Tensor:
    """Task vectors with the awkward cases: ties at the trim threshold (values on a 0.5 grid),
    exact zeros, and a task that is another's negation (sign scores of exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    taus = torch.round(torch.randn(n_tasks, n, generator=g) * 2) / 2
    taus[torch.rand(n_tasks, n, generator=g) < 0.2] = 0.0
    taus[-1] = -taus[0]
    if seed % 2:  # a negative majority, so the contested entries must be re-merged with -1
        taus[1:-1] = -taus[1:-1].abs()
    return taus


def _run_kernel(taus: torch.Tensor, k: float, sign: str, merge: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's use of the kernel: chunk by chunk, then the majority fallback for contested entries."""
    n_tasks, n = taus.shape
    trim_step = ThresholdTrim([top_magnitude_threshold(row.cpu(), k) for row in taus], torch.float32)
    out, all_trimmed = torch.empty(n, device=taus.device), torch.empty(n_tasks, n, device=taus.device)
    total, contested = 0.0, []
    for start in range(0, n, chunk):
        scratch = taus[:, start : start + chunk].clone()  # the kernel overwrites its input
        trimmed = torch.empty_like(scratch)
        signs, cols = ties_chunk_(scratch, trim_step, out[start : start + chunk], trimmed, sign, merge)
        all_trimmed[:, start : start + chunk] = trimmed
        total += signs
        if cols is not None:
            contested.append(cols + start)
    if total < 0:
        for cols in contested:
            out[cols] = disjoint_merge(all_trimmed[:, cols], -torch.ones(cols.numel(), device=taus.device), merge)
    return out, all_trimmed


@pytest.mark.parametrize("merge", MERGE_FNS)
@pytest.mark.parametrize("sign", ["mass", "count"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [240, 17])
def test_in_place_kernel_equals_disjoint_merge_of_trim_and_elect_sign(merge: str, sign: str, seed: int, chunk: int) -> None:
    # given task vectors with threshold ties, zeros and exactly tied elections
    taus = _hard_task_vectors(seed)
    k = 0.3
    # when the kernel runs over the whole vector or over chunks of 17 columns
    out, trimmed = _run_kernel(taus, k, sign, merge, chunk)
    # then it equals the paper's three steps on the whole vector, exactly
    expected_trimmed = trim(taus, k)
    assert torch.equal(trimmed, expected_trimmed)
    assert torch.equal(out, disjoint_merge(expected_trimmed, elect_sign(expected_trimmed, sign), merge))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("merge", MERGE_FNS)
@pytest.mark.parametrize("sign", ["mass", "count"])
def test_in_place_kernel_on_the_gpu_equals_the_plain_steps_on_the_cpu(merge: str, sign: str) -> None:
    # the CPU test above, with the kernel run on the GPU (the engine's device path)
    taus = _hard_task_vectors(1)
    out, trimmed = _run_kernel(taus.cuda(), 0.3, sign, merge, 17)
    expected_trimmed = trim(taus, 0.3)
    assert torch.equal(trimmed.cpu(), expected_trimmed)
    assert torch.equal(out.cpu(), disjoint_merge(expected_trimmed, elect_sign(expected_trimmed, sign), merge))


def test_hard_task_vectors_do_exercise_ties_and_contested_entries() -> None:
    # guard for the test above: otherwise it would not test the rare branches
    for seed in (0, 1):
        taus = _hard_task_vectors(seed)
        threshold = top_magnitude_threshold(taus[0], 0.3)
        assert not threshold.keeps_all_ties  # some entries at the threshold are dropped
        trimmed = trim(taus, 0.3)
        score = sign_score(trimmed)
        assert bool(((score == 0) & (trimmed != 0).any(0)).any())  # contested entries exist
    assert float(elect_sign(trim(_hard_task_vectors(1), 0.3)).sum()) < 0  # and a negative majority


def test_threshold_trim_spends_its_tie_budget_in_stream_order() -> None:
    # given four entries tied at |x| = 1 of which the trim keeps two, streamed in two chunks
    x = torch.tensor([[1.0, 0.5, -1.0, 1.0, -1.0]])
    trim_step = ThresholdTrim([top_magnitude_threshold(x[0], 0.4)], torch.float32)
    first, second = trim_step(x[:, :2].clone()), trim_step(x[:, 2:].clone())
    # then the first two ties met are kept (positions 0 and 2), the later ones dropped
    assert torch.cat([first, second], 1).tolist() == [[1.0, 0.0, -1.0, 0.0, 0.0]]
    assert trim_step.tie_budget == [0] and trim_step.restart().tie_budget == [2]


def test_in_place_kernel_refuses_an_election_it_does_not_implement() -> None:
    taus = TAUS.clone()
    trim_step = ThresholdTrim([top_magnitude_threshold(row, 0.4) for row in taus], torch.float32)
    with pytest.raises(ValueError, match="'mass' or 'count', got sign='normfrac'"):
        ties_chunk_(taus, trim_step, torch.empty(5), torch.empty_like(taus), "normfrac")


def test_scale_is_base_plus_lam_times_tau_m() -> None:
    assert torch.equal(scale(BASE, TAU_M, 0.5), torch.tensor([1.875, 0.0, 1.0, -0.5, 1.0]))
