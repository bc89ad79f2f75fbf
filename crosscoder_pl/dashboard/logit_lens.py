"""Logit lens of decoder vectors: the tokens each model's decoder vector of a latent promotes and suppresses.

For latent j and model m, ``logits[j, m] = W_U[m] (g_m * d_jm)``: ``d_jm`` the decoder vector in raw activation
units (the folded ``W_dec[j, m]``), ``W_U[m]`` model m's unembedding ``[vocab, d_model]`` and ``g_m`` the gain of
its final norm (Gemma: ``1 + weight``; Llama: ``weight``; a LayerNorm's weight, with ``d`` centred first).

Final norm, our choice: apply its elementwise gain, not its division by the RMS. The final norm reads the
whole residual ``x``; adding ``d`` changes the logits by ``W_U (g * d) / rms(x)`` to first order (neglecting the
change of ``rms`` itself). ``1 / rms(x)`` is one positive number per token: it scales all logits alike and
cannot change which tokens are promoted, so we leave it out rather than pick an arbitrary ``x``. The gain
cannot be left out: Gemma's gains vary by orders of magnitude across dimensions, and ``W_U d`` alone
ranks tokens by directions the model itself damps. Gemma's final logit soft-capping ``c tanh(z / c)`` acts
on whole logits, not on one vector's contribution, and is monotone: left out too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crosscoder_pl.crosscoder import CrossCoder

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f")


@dataclass
class LogitLens:
    """Per model m (0 base, 1 chat) and latent: ``top_ids / top_values [2, F, k]`` (largest logits, descending),
    ``bottom_ids / bottom_values [2, F, k]`` (smallest, ascending); ``norm``: how each model's final norm was
    applied, in words."""

    top_ids: torch.Tensor
    top_values: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_values: torch.Tensor
    norm: list[str]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the last hidden state before the LM head (None if the model has none we know)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def norm_gain(model: nn.Module, d_model: int) -> tuple[torch.Tensor, bool, str]:
    """``(gain [d_model], centre, description)`` of the model's final norm (see the module doc).

    RMS norms (no bias): the gain is the norm applied to a vector of ones (RMS 1), which gives Gemma's
    ``1 + weight`` and Llama's ``weight`` without knowing the convention. LayerNorm: its weight, and the
    vector is centred first (LayerNorm subtracts the mean); its bias is no part of any latent's effect.
    """
    norm = final_norm(model)
    device = next(model.parameters()).device
    if norm is None:
        return torch.ones(d_model, device=device), False, "no final norm found: W_U d"
    weight = getattr(norm, "weight", None)
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        gain = weight.detach().float() if weight is not None else torch.ones(d_model, device=device)
        return gain, True, f"{type(norm).__name__} weight, vector centred: W_U (w * (d - mean d))"
    with torch.no_grad():
        gain = norm(torch.ones(1, d_model, device=device, dtype=next(norm.parameters()).dtype)).float()[0]
    return gain, False, f"{type(norm).__name__} gain (norm of a ones vector), no RMS division: W_U (g * d)"


@torch.inference_mode()
def logit_lens(crosscoder: CrossCoder, models: tuple[nn.Module, nn.Module], k: int = 10,
               memory_budget_mb: float = 256.0) -> LogitLens:
    """The ``k`` most promoted and suppressed tokens of every latent's decoder vector, in each model.

    ``models``: (base, chat). ``[chunk, vocab]`` logits alive at a time, ``chunk`` set by ``memory_budget_mb``.
    """
    decoder = crosscoder.decoder(normalised=False).detach()  # [F, 2, d] raw units
    names = ("top_ids", "top_values", "bottom_ids", "bottom_values")
    per_model: list[list[torch.Tensor]] = []
    notes = []
    for m, model in enumerate(models):
        unembed = model.get_output_embeddings().weight.detach().float()  # [vocab, d], converted once
        gain, centre, note = norm_gain(model, unembed.shape[1])
        notes.append(note)
        vocab = unembed.shape[0]
        k_here = min(k, vocab)
        chunk = max(1, int(memory_budget_mb * 2**20 // (4 * vocab * 3)))
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, crosscoder.n_latents, chunk):
            d = decoder[start : start + chunk, m].to(unembed.device).float()  # [c, d]
            if centre:
                d = d - d.mean(-1, keepdim=True)
            logits = (d * gain) @ unembed.T  # [c, vocab]
            top_values, top_ids = logits.topk(k_here, dim=-1)
            bottom_values, bottom_ids = logits.topk(k_here, dim=-1, largest=False)
            parts.append(tuple(t.cpu() for t in (top_ids, top_values, bottom_ids, bottom_values)))
        per_model.append([torch.cat(column) for column in zip(*parts)])
    stacked = {name: torch.stack([model_parts[i] for model_parts in per_model]) for i, name in enumerate(names)}
    return LogitLens(**stacked, norm=notes)
