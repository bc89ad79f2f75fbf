"""Splice-in evaluation: how well the models run on the crosscoder's reconstruction (docs/method.md
"Splice-in evaluation").

Per model, the layer output at content positions (not BOS, not padding: the crosscoder never saw
them) is replaced by (a) its reconstruction ``crosscoder(x)[m]`` and (b) zeros. Reported, pooled over
tokens: KL(clean || spliced) over content positions; next-token cross-entropy (clean, spliced, zero)
over content positions whose next token is valid; the CE increase; and the fraction of the
zero-ablation gap recovered ``(CE_zero - CE_splice) / (CE_zero - CE_clean)`` (nan when the gap is not
positive). Cost: one clean and two edited forward passes per model over the probes, a budgeted number
of sequences at a time; the LM head then runs on a budgeted number of positions at a time and each
position is reduced to its KL and NLLs at once (``probes.compare_positions``): memory does not grow with
``n_probes * seq * vocab``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.analysis.probes import (
    check_head,
    check_probes,
    clean_run,
    compare_positions,
    content_mask,
    final_hidden,
    memory_budget_bytes,
    pair_models,
    positions_per_chunk,
    rows_per_chunk,
)
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.names import MODELS

log = logging.getLogger(__name__)


@torch.inference_mode()
def splice_evaluation(
    crosscoder: CrossCoder,
    pair: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    memory_budget_mb: float | None = None,
) -> dict[str, dict[str, float]]:
    """``{"base": {...}, "chat": {...}}`` with ce_clean, ce_splice, ce_zero, ce_increase, kl_splice,
    frac_recovered for probes ``input_ids, attention_mask [n_probes, seq]``; ``memory_budget_mb``: working
    memory for the forwards (None: from the device, ``probes.memory_budget_bytes``)."""
    check_eval_mode(crosscoder)
    check_probes(input_ids, attention_mask)
    models = pair_models(pair)
    for model in models:
        check_head(model)
    content = content_mask(attention_mask)
    # Position t is scored for CE when it is content and token t + 1 exists.
    scored = content & torch.cat([attention_mask[:, 1:].bool(), torch.zeros_like(content[:, :1])], dim=1)
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # [P, S]; 0 where none
    budget = memory_budget_bytes(memory_budget_mb, next(models[0].parameters()).device)
    rows = min(rows_per_chunk(budget, model, input_ids.shape[1]) for model in models)
    clean = clean_run(pair, input_ids, attention_mask, rows)
    recon = crosscoder(clean.residual.to(crosscoder.W_dec))  # [P, S, 2, d]
    results = {}
    for m, (name, model) in enumerate(zip(MODELS, models)):
        chunk = positions_per_chunk(budget, model.config.get_text_config().vocab_size)
        kl = torch.zeros(content.shape)  # [P, S]: KL(clean || spliced)
        nll = torch.zeros(3, *content.shape)  # [clean / splice / zero, P, S]
        for part in torch.arange(input_ids.shape[0]).split(rows):
            ids, mask, where = input_ids[part], attention_mask[part], content[part]
            spliced = final_hidden(model, pair.layer, ids, mask, _replace(where, recon[part.to(recon.device), :, m]))
            zeroed = final_hidden(model, pair.layer, ids, mask, _replace(where, 0.0))
            row, pos = where.nonzero(as_tuple=True)
            at = (row.to(spliced.device), pos.to(spliced.device))
            reference = clean.final[m][part.to(spliced.device)][at]  # [n, d_model]
            shift, losses = compare_positions(model, reference, [spliced[at], zeroed[at]], targets[part][row, pos], chunk)
            kl[part[row], pos] = shift[0].cpu()
            nll[:, part[row], pos] = losses.cpu()
        ce = {label: float(nll[i][scored].mean()) for i, label in enumerate(("clean", "splice", "zero"))}
        results[name] = {
            "ce_clean": ce["clean"],
            "ce_splice": ce["splice"],
            "ce_zero": ce["zero"],
            "ce_increase": ce["splice"] - ce["clean"],
            "kl_splice": float(kl[content].mean()),
            "frac_recovered": _fraction_recovered(ce["clean"], ce["splice"], ce["zero"], name),
        }
    return results


def _replace(content: torch.Tensor, value: torch.Tensor | float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Edit that puts ``value`` (``[P, S, d]`` or a scalar) at content positions and keeps the rest."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        new = value.to(hidden) if isinstance(value, torch.Tensor) else value
        return torch.where(content.to(hidden.device)[..., None], new, hidden)

    return edit


def _fraction_recovered(clean: float, splice: float, zero: float, name: str) -> float:
    gap = zero - clean
    if gap <= 0:
        log.warning("%s: zero-ablation CE %.4f is not above clean CE %.4f; gap recovered is nan", name, zero, clean)
        return float("nan")
    return (zero - splice) / gap
