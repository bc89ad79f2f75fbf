"""torchmetrics for crosscoders: states are sums, so DDP synchronisation is exact."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric

from crosscoder_pl.config import ObjectiveConfig


class VarianceExplained(Metric):
    """Pooled variance explained per model over a window of tokens.

    ``VE_m = 1 - sum_n ||x_m - x̂_m||^2 / sum_n ||x_m - mean(x_m)||^2`` (docs/method.md "Metrics"): a ratio of sums over
    the whole window, not a mean of per-token ratios. ``compute()`` returns ``[n_models]``.
    """

    full_state_update = False

    def __init__(self, n_models: int, d_model: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # e.g. sync_on_compute=False for a computation one rank does alone
        # float64: the total variance is a difference of two large sums.
        self.add_state("sq_err", torch.zeros(n_models, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_sum", torch.zeros(n_models, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum", torch.zeros(n_models, d_model, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """``x``, ``x_hat``: ``[tokens, n_models, d_model]``."""
        # One batch sums fine in the input's precision; the window's running sums are float64.
        self.sq_err += (x - x_hat).pow(2).sum(dim=(0, 2)).double()
        self.sq_sum += x.pow(2).sum(dim=(0, 2)).double()
        self.sum += x.sum(0).double()
        self.n += x.shape[0]

    def compute(self) -> torch.Tensor:
        total_var = self.sq_sum - self.sum.pow(2).sum(-1) / self.n
        return (1 - self.sq_err / total_var).float()


class FiringCounts(Metric):
    """How many tokens each latent fired on over a window: ``compute()`` returns ``[F]`` counts.

    ``(counts == 0).mean()`` is the dead fraction over that window; ``counts / tokens`` the firing
    frequency used by the taxonomy.
    """

    full_state_update = False

    def __init__(self, n_latents: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", torch.zeros(n_latents, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        """``codes``: sparse latents ``[tokens, F]``."""
        self.counts += (codes > 0).sum(0)
        self.tokens += codes.shape[0]

    def compute(self) -> torch.Tensor:
        return self.counts


def sweep_objective(metrics: Mapping[str, float], objective: ObjectiveConfig) -> float:
    """What train.py returns to a sweeper (maximised): the mean held-out variance explained of the two models,
    ``(val/ve_base + val/ve_chat) / 2``, minus ``objective.penalty`` per unit of ``val/dead_frac`` above
    ``objective.max_dead_frac`` (a large dictionary that leaves latents dead scores below a smaller one that uses
    them all). nan when a metric is missing (no validation ran), which Optuna records as a failed trial."""
    try:
        ve = (metrics["val/ve_base"] + metrics["val/ve_chat"]) / 2
        dead = metrics["val/dead_frac"]
    except KeyError:
        return math.nan
    return float(ve - objective.penalty * max(0.0, dead - objective.max_dead_frac))
