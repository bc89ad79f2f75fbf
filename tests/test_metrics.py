"""VarianceExplained and FiringCounts against direct computations on planted data (fast: no Trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from crosscoder_pl.config import ConfigError, ObjectiveConfig
from crosscoder_pl.metrics import (
    FiringCounts,
    VarianceExplained,
    sweep_objective,
)


def direct_ve(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """docs/method.md "Metrics": pooled ratio of sums per model, in float64."""
    x, x_hat = x.double(), x_hat.double()
    return (1 - (x - x_hat).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2))).float()


def planted_pair(n: int = 300, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two models with different means and spreads; reconstructions of different quality per model."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.stack([torch.full((d,), 3.0), torch.linspace(-2.0, 5.0, d)])  # [2, d]
    x = torch.randn(n, 2, d, generator=g) * torch.tensor([1.0, 4.0])[:, None] + mean
    noise = torch.randn(n, 2, d, generator=g) * torch.tensor([0.3, 2.5])[:, None]
    return x, x + noise


def test_variance_explained_matches_the_direct_pooled_formula_over_uneven_chunks() -> None:
    x, x_hat = planted_pair()
    metric = VarianceExplained(2, 8)
    for chunk in (slice(0, 17), slice(17, 200), slice(200, 300)):
        metric.update(x[chunk], x_hat[chunk])
    ve = metric.compute()
    assert ve.shape == (2,)
    torch.testing.assert_close(ve, direct_ve(x, x_hat), rtol=1e-5, atol=1e-6)
    # Planted: base noise 0.3 vs spread 1 -> VE ~ 0.91; chat noise 2.5 vs spread 4 -> VE ~ 0.61.
    assert 0.85 < ve[0] < 0.96 and 0.5 < ve[1] < 0.7


def test_variance_explained_is_not_a_mean_of_per_token_or_per_chunk_ratios() -> None:
    x, x_hat = planted_pair()
    x[:100] *= 10  # the first chunk has 100x the variance of the rest
    metric = VarianceExplained(2, 8)
    per_chunk = []
    for chunk in (slice(0, 100), slice(100, 300)):
        metric.update(x[chunk], x_hat[chunk])
        per_chunk.append(direct_ve(x[chunk], x_hat[chunk]))
    pooled = metric.compute()
    torch.testing.assert_close(pooled, direct_ve(x, x_hat), rtol=1e-5, atol=1e-6)
    assert (pooled - torch.stack(per_chunk).mean(0)).abs().min() > 0.05


def test_variance_explained_planted_answers() -> None:
    x, _ = planted_pair()
    metric = VarianceExplained(2, 8)
    metric.update(x, x.clone())
    assert metric.compute().tolist() == [1.0, 1.0]  # perfect reconstruction
    metric.reset()
    metric.update(x, x.mean(0, keepdim=True).expand_as(x))
    torch.testing.assert_close(metric.compute(), torch.zeros(2), atol=1e-5, rtol=0)  # the mean explains nothing
    metric.reset()
    metric.update(x, 2 * x.mean(0, keepdim=True) - x)  # mirrored around the mean: error = 2 (x - mean)
    torch.testing.assert_close(metric.compute(), torch.full((2,), -3.0), atol=1e-4, rtol=0)


def test_variance_explained_states_are_sums() -> None:
    x, x_hat = planted_pair(n=50)
    metric = VarianceExplained(2, 8)
    metric.update(x, x_hat)
    assert metric.n == 50
    # One batch is summed in the input's precision (float32), the window in float64.
    torch.testing.assert_close(metric.sq_err, (x - x_hat).double().pow(2).sum((0, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(metric.sq_sum, x.double().pow(2).sum((0, 2)), rtol=1e-5, atol=0)
    torch.testing.assert_close(metric.sum, x.double().sum(0), rtol=1e-5, atol=1e-5)


def test_firing_counts_count_positive_codes_per_latent() -> None:
    codes = torch.tensor([
        [0.0, 1.5, 0.0, 2.0],
        [0.0, 0.2, 0.0, 0.0],
        [0.0, 3.0, 1e-8, 0.0],
    ])
    metric = FiringCounts(4)
    metric.update(codes[:2])
    metric.update(codes[2:])
    assert metric.compute().tolist() == [0, 3, 1, 1]
    assert metric.tokens == 3
    assert float((metric.compute() == 0).double().mean()) == 0.25  # dead fraction over this window


def test_sweep_objective_against_the_direct_formula_and_its_bounds() -> None:
    """``(ve_base + ve_chat) / 2 - penalty * max(0, dead_frac - max_dead_frac)``; the limits 0 and 1 and a zero
    penalty are valid settings, anything outside is refused before training."""
    metrics = {"val/ve_base": 0.9, "val/ve_chat": 0.5, "val/dead_frac": 0.25}
    for max_dead, penalty in ((0.1, 10.0), (0.25, 3.0), (0.0, 2.0), (1.0, 5.0), (0.1, 0.0)):
        want = (0.9 + 0.5) / 2 - penalty * max(0.0, 0.25 - max_dead)
        objective = ObjectiveConfig(max_dead_frac=max_dead, penalty=penalty)  # a valid setting
        assert sweep_objective(metrics, objective) == pytest.approx(want, abs=1e-12)
    assert sweep_objective({**metrics, "val/dead_frac": 0.0}, ObjectiveConfig(max_dead_frac=0.0, penalty=7.0)) == pytest.approx(0.7, abs=1e-12)
    for key in metrics:
        assert math.isnan(sweep_objective({k: v for k, v in metrics.items() if k != key}, ObjectiveConfig()))
    for max_dead, penalty in ((-0.01, 1.0), (1.01, 1.0), (0.5, -0.5)):
        with pytest.raises(ConfigError, match=r"objective\.(max_dead_frac|penalty)=-?[0-9.]+ must be a number"):
            ObjectiveConfig(max_dead_frac=max_dead, penalty=penalty)
