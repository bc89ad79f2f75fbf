"""What a latent's two decoder vectors say about it: their relative norm and their angle.

Used by the taxonomy (classes by Δnorm), the causal validation (Δnorm and cosine of the latents it tests),
the dashboards and the card. Formulas and sources: docs/method.md, "Taxonomy".
"""

from __future__ import annotations

import torch

from crosscoder_pl.crosscoder import CrossCoder


def delta_norm(crosscoder: CrossCoder) -> torch.Tensor:
    """Relative decoder norm ``[F]`` in [0, 1] (nan where both decoder vectors are zero).

    ``Δnorm_j = 0.5 * ((n[j, chat] - n[j, base]) / max(n[j, chat], n[j, base]) + 1)`` with the norms measured in
    the normalised space (Minder et al. 2025): 0 = base-only, 1 = chat-only.
    """
    norms = crosscoder.decoder_norms().detach().float()
    base, chat = norms[:, 0], norms[:, 1]
    return 0.5 * ((chat - base) / torch.maximum(chat, base) + 1)


def decoder_cosine(crosscoder: CrossCoder) -> torch.Tensor:
    """Cosine between each latent's base and chat decoder vectors ``[F]`` (scale-free: raw = normalised)."""
    w = crosscoder.W_dec.detach().float()
    return torch.nn.functional.cosine_similarity(w[:, 0], w[:, 1], dim=-1)
