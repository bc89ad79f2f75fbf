"""Summary statistics of per-latent results, where some latents have no value (nan)."""

from __future__ import annotations

import math

import torch


def nan_median(values: torch.Tensor) -> float:
    """The usual median (mean of the two middle values) of the non-nan entries; nan when there are none."""
    values = values[~values.isnan()].double()
    return float(values.quantile(0.5)) if values.numel() else math.nan
