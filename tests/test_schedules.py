"""k annealing, the L1 coefficient's warm-up and lr decay against a direct formula at every step (fast: no Trainer)."""

from __future__ import annotations

import pytest

from crosscoder_pl.schedules import k_at, l1_warmup, lr_factor


def linear_k(step: int, k: int, k_start: int, anneal_steps: int) -> int:
    """docs/method.md "k annealing", written independently: interpolate, clamp after the end."""
    fraction = min(step / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    return round(k_start * (1 - fraction) + k * fraction)


@pytest.mark.parametrize(
    ("k", "k_start", "anneal_steps"), [(100, 1000, 500), (32, 128, 7), (4, 40, 30), (5, 5, 10), (32, 128, 1)]
)
def test_k_is_linear_from_k_start_to_k_then_constant(k, k_start, anneal_steps) -> None:
    steps = range(0, 2 * anneal_steps + 3)
    assert [k_at(s, k, k_start, anneal_steps) for s in steps] == [linear_k(s, k, k_start, anneal_steps) for s in steps]


def test_k_planted_values() -> None:
    assert [k_at(s, 100, 1000, 500) for s in (0, 1, 250, 499, 500, 501, 10**6)] == [1000, 998, 550, 102, 100, 100, 100]
    # Rounding, not truncation: 128 - 96 * 3 / 7 = 86.857...
    assert k_at(3, 32, 128, 7) == 87


@pytest.mark.parametrize("anneal_steps", [0, -3])
def test_no_annealing_means_k_from_the_first_step(anneal_steps) -> None:
    assert [k_at(s, 32, 128, anneal_steps) for s in (0, 1, 5)] == [32, 32, 32]


def linear_lr(step: int, total: int, decay_frac: float) -> float:
    """docs/method.md "Loss and optimiser": 1 until total - decay, then linear to 0 at ``total``, 0 after."""
    decay = decay_frac * total
    if decay == 0:
        return 1.0
    return min(1.0, max(0.0, (total - step) / decay))


@pytest.mark.parametrize(("total", "decay_frac"), [(1000, 0.2), (50, 0.2), (7, 0.3), (10, 1.0)])
def test_lr_factor_matches_the_formula_at_every_step(total, decay_frac) -> None:
    for step in range(total + 5):
        assert lr_factor(step, total, decay_frac) == pytest.approx(linear_lr(step, total, decay_frac), abs=1e-12), step


def test_lr_factor_planted_values() -> None:
    assert [lr_factor(s, 1000, 0.2) for s in (0, 799, 800, 900, 950, 1000, 1200)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.5, 0.25, 0.0, 0.0]
    )
    assert lr_factor(0, 10, 1.0) == 1.0 and lr_factor(5, 10, 1.0) == pytest.approx(0.5)


def test_no_decay_keeps_the_lr_at_every_step_even_past_the_end() -> None:
    assert [lr_factor(s, 100, 0.0) for s in (0, 50, 99, 100, 150)] == [1.0] * 5


def test_one_step_annealing_and_one_step_decay() -> None:
    # The shortest schedules still start at k_start / decay to 0 (not skipped as if they were empty).
    assert [k_at(s, 32, 128, 1) for s in (0, 1, 2)] == [128, 32, 32]
    assert [lr_factor(s, 10, 0.1) for s in (8, 9, 10, 11)] == [1.0, 1.0, 0.0, 0.0]  # decay over 1 step
    assert [lr_factor(s, 5, 0.1) for s in (4, 5)] == [1.0, 0.0]  # decay over half a step


@pytest.mark.parametrize(("step", "total", "frac", "want"), [
    (0, 1000, 0.05, 0.0), (25, 1000, 0.05, 0.5), (49, 1000, 0.05, 0.98), (50, 1000, 0.05, 1.0),
    (999, 1000, 0.05, 1.0), (0, 1000, 0.0, 1.0), (3, 10, 1.0, 0.3),
    (0, 10, 0.05, 0.0), (1, 10, 0.05, 1.0),  # half a warm-up step: step 0 still at 0
])
def test_l1_warmup_is_linear_from_zero(step: int, total: int, frac: float, want: float) -> None:
    assert l1_warmup(step, total, frac) == pytest.approx(want)
