"""Step schedules of the training recipe: BatchTopK's k annealing, the L1 penalty's warm-up and the learning-rate decay."""

from __future__ import annotations


def k_at(step: int, k: int, k_start: int, anneal_steps: int) -> int:
    """k at optimiser step ``step``: linear from ``k_start`` (step 0) to ``k`` (step ``anneal_steps``), then ``k``."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return k
    return round(k_start + (k - k_start) * step / anneal_steps)


def l1_warmup(step: int, total_steps: int, warmup_frac: float) -> float:
    """Multiplier of the L1 coefficient: linear from 0 (step 0) to 1 over the first ``warmup_frac`` of
    ``total_steps``, then 1."""
    warmup_steps = warmup_frac * total_steps
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return step / warmup_steps


def lr_factor(step: int, total_steps: int, decay_frac: float) -> float:
    """Multiplier of the base lr: 1, then linear to 0 over the last ``decay_frac`` of ``total_steps``."""
    decay_steps = decay_frac * total_steps
    start = total_steps - decay_steps
    if decay_steps <= 0 or step < start:
        return 1.0
    return max(0.0, (total_steps - step) / decay_steps)
