"""Splice-in evaluation (DESIGN.md): how well the models run on the crosscoder's reconstruction.

Per model, the layer output at content positions (not BOS, not padding: the crosscoder never saw
them) is replaced by (a) its reconstruction ``crosscoder(x)[m]`` and (b) zeros. Reported, pooled over
tokens: KL(clean || spliced) over content positions; next-token cross-entropy (clean, spliced, zero)
over content positions whose next token is valid; the CE increase; and the fraction of the
zero-ablation gap recovered ``(CE_zero - CE_splice) / (CE_zero - CE_clean)`` (nan when the gap is not
positive). Cost: one clean and two edited forward passes per model over the probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from crosscoder_pl.analysis.probes import (
    check_probes,
    clean_run,
    content_mask,
    kl_per_position,
    next_token_logprobs,
    pair_models,
)
from crosscoder_pl.analysis.taxonomy import check_eval_mode
from crosscoder_pl.crosscoder import MODEL_ORDER, CrossCoder

log = logging.getLogger(__name__)


@torch.inference_mode()
def splice_evaluation(
    crosscoder: CrossCoder, pair: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, dict[str, float]]:
    """``{"base": {...}, "chat": {...}}`` with ce_clean, ce_splice, ce_zero, ce_increase, kl_splice,
    frac_recovered for probes ``input_ids, attention_mask [n_probes, seq]``."""
    check_eval_mode(crosscoder)
    check_probes(input_ids, attention_mask)
    content = content_mask(attention_mask)
    # Position t is scored for CE when it is content and token t + 1 exists.
    scored = content[:, :-1] & attention_mask[:, 1:].bool()
    clean = clean_run(pair, input_ids, attention_mask)
    recon = crosscoder(clean.residual.to(crosscoder.W_dec))  # [P, S, 2, d]
    results = {}
    for m, (name, model) in enumerate(zip(MODEL_ORDER, pair_models(pair))):
        run = partial(next_token_logprobs, model, pair.layer, input_ids, attention_mask)
        spliced, zeroed = run(_replace(content, recon[:, :, m])), run(_replace(content, 0.0))
        ce = {
            label: _cross_entropy(logprobs, input_ids, scored)
            for label, logprobs in (("clean", clean.logprobs[m]), ("splice", spliced), ("zero", zeroed))
        }
        kl = kl_per_position(clean.logprobs[m], spliced)
        results[name] = {
            "ce_clean": ce["clean"],
            "ce_splice": ce["splice"],
            "ce_zero": ce["zero"],
            "ce_increase": ce["splice"] - ce["clean"],
            "kl_splice": float(kl[content.to(kl.device)].mean()),
            "frac_recovered": _fraction_recovered(ce["clean"], ce["splice"], ce["zero"], name),
        }
    return results


def _replace(content: torch.Tensor, value: torch.Tensor | float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Edit that puts ``value`` (``[P, S, d]`` or a scalar) at content positions and keeps the rest."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        new = value.to(hidden) if isinstance(value, torch.Tensor) else value
        return torch.where(content.to(hidden.device)[..., None], new, hidden)

    return edit


def _cross_entropy(logprobs: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> float:
    """Mean next-token CE over the ``scored [P, S-1]`` positions of ``logprobs [P, S, V]``."""
    targets = input_ids[:, 1:].to(logprobs.device)
    nll = -logprobs[:, :-1].gather(-1, targets[..., None]).squeeze(-1)
    return float(nll[scored.to(nll.device)].mean())


def _fraction_recovered(clean: float, splice: float, zero: float, name: str) -> float:
    gap = zero - clean
    if gap <= 0:
        log.warning("%s: zero-ablation CE %.4f is not above clean CE %.4f; gap recovered is nan", name, zero, clean)
        return float("nan")
    return (zero - splice) / gap
