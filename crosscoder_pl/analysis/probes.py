"""Forward passes over a probe batch, shared by the causal and splice-in analyses, in bounded memory.

A probe batch is ``input_ids [n_probes, seq]`` with ``attention_mask [n_probes, seq]`` (1 = token,
0 = padding, left or right). Each row starts with BOS at its first valid position. The crosscoder was
trained without BOS and padding, so only the other valid positions ("content" positions) are ever
encoded, edited or scored.

Memory. Next-token distributions are what make these analyses expensive: at a 256k vocabulary one
sequence of 128 positions has 128 MiB of float32 log-probs, and ``[n_probes, seq, vocab]`` for both
models tens of GiB. So no analysis holds them: a forward pass stops at the transformer's final hidden
state ``[batch, seq, d_model]`` (:func:`final_hidden`), and :func:`compare_positions` applies the LM head
to a few positions at a time and reduces them to per-position KL and NLL at once. The clean run keeps only
final hidden states; clean log-probs are recomputed from them, chunk by chunk (the head only, no body).
Chunk sizes follow a memory budget (:func:`memory_budget_bytes`): :func:`positions_per_chunk` for the head,
:func:`rows_per_chunk` for the sequences of one body forward.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.activations import content_mask, position_ids
from crosscoder_pl.hooks import edit_residual

log = logging.getLogger(__name__)

CPU_RAM_FRACTION = 0.25  # default budget on CPU: a quarter of the available RAM (the process holds the rest)
GPU_FREE_FRACTION = 0.5  # default budget on CUDA: half the free memory (the allocator fragments the rest)
# float32 [vocab] vectors alive per head position in compare_positions: clean log-probs, edited logits and
# log-probs, and kl_per_position's exp, difference and product; one spare.
HEAD_VECTORS_PER_POSITION = 8
# float32 values per token alive in one layer of a body forward (residual copies, q/k/v, MLP gates),
# as multiples of hidden_size and intermediate_size; attention weights add n_heads * seq. A rough bound.
BODY_HIDDEN_COPIES, BODY_MLP_COPIES = 12, 4


def pair_models(pair: Any) -> tuple[nn.Module, nn.Module]:
    """``(base, chat)`` of a model pair (anything with ``.base`` and ``.chat``), in crosscoder order."""
    return pair.base, pair.chat


def check_probes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Raise a ValueError naming the problem when a probe batch cannot be scored."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"probes must be input_ids [n_probes, seq] with a same-shape attention_mask, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    too_short = (content_mask(attention_mask).sum(-1) == 0).nonzero().flatten()
    if too_short.numel():
        raise ValueError(f"probes {too_short.tolist()} have no token after BOS: nothing to score")


# --- memory budget -------------------------------------------------------------------------------------


def memory_budget_bytes(budget_mb: float | None, device: torch.device | str) -> int:
    """``budget_mb`` in bytes; when None, derived from ``device``: half the free memory of a CUDA device,
    a quarter of the available RAM on CPU."""
    if budget_mb is not None:
        if budget_mb <= 0:
            raise ValueError(f"analysis.memory_budget_mb={budget_mb} must be positive (or null: from the device)")
        return int(budget_mb * 2**20)
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_FREE_FRACTION)
    else:
        budget = int(available_ram_bytes() * CPU_RAM_FRACTION)
    log.info("analysis memory budget: %.0f MiB (derived from %s memory)", budget / 2**20, device.type)
    return budget


def available_ram_bytes() -> int:
    """RAM the kernel can give without swapping (``MemAvailable``), else the free pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def positions_per_chunk(budget_bytes: int, vocab: int) -> int:
    """Positions whose next-token distributions :func:`compare_positions` may hold at once (at least 1)."""
    return max(1, budget_bytes // (HEAD_VECTORS_PER_POSITION * vocab * 4))


def rows_per_chunk(budget_bytes: int, model: nn.Module, seq: int) -> int:
    """Sequences of ``seq`` tokens per body forward (at least 1) so that one layer's activations fit."""
    config = model.config.get_text_config()
    per_token = (
        BODY_HIDDEN_COPIES * config.hidden_size
        + BODY_MLP_COPIES * getattr(config, "intermediate_size", 4 * config.hidden_size)
        + config.num_attention_heads * seq
    ) * 4
    return max(1, budget_bytes // (per_token * seq))


# --- forward passes --------------------------------------------------------------------------------------


def final_hidden(
    model: nn.Module,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    edit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The transformer's final (normed) hidden state ``[batch, seq, d_model]`` with block ``layer``'s output
    replaced by ``edit(h)``; the LM head is not applied (see :func:`head_logprobs`)."""
    device = next(model.parameters()).device
    mask = attention_mask.to(device)
    with edit_residual(model, layer, edit):
        # Same positions as the training data's extraction, so left padding gives the same residuals.
        return model.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        ).last_hidden_state


def head_logprobs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[n, vocab]`` float32 of final hidden states ``[n, d_model]``: the LM head
    and, for Gemma-2/3, the final logit soft-capping, in the order and dtype of the model's own forward."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float().log_softmax(-1)


def check_head(model: nn.Module, n_tokens: int = 4) -> None:
    """Raise a ValueError unless :func:`head_logprobs` of :func:`final_hidden` gives the model's own next-token
    distribution (an architecture that rescales its logits some other way would be scored wrongly)."""
    device = next(model.parameters()).device
    ids = torch.arange(1, n_tokens + 1, device=device)[None] % model.config.get_text_config().vocab_size
    mask = torch.ones_like(ids)
    ours = head_logprobs(model, final_hidden(model, 0, ids, mask, lambda h: h)[0])
    theirs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float().log_softmax(-1)
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"{type(model).__name__}: its logits are not lm_head(final hidden state) (with Gemma's soft-capping), "
            "so the chunked causal and splice-in analyses cannot score it; disable analysis.causal and analysis.splice"
        )


def compare_positions(
    model: nn.Module,
    clean: torch.Tensor,
    edited: Sequence[torch.Tensor],
    targets: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per position, clean vs edited next-token distributions, ``chunk`` positions at a time.

    Args:
        clean: clean final hidden states ``[n, d_model]``.
        edited: E edited final hidden states ``[n, d_model]`` at the same positions.
        targets: next-token ids ``[n]`` (any valid id where there is none), or None.
    Returns:
        ``KL(clean || edited_e)`` ``[E, n]``, and the targets' NLL ``[1 + E, n]`` (clean first) or None.
        Only ``chunk * vocab`` log-probs per distribution are ever alive.
    """
    n = clean.shape[0]
    kl = torch.empty(len(edited), n, device=clean.device)
    nll = None if targets is None else torch.empty(1 + len(edited), n, device=clean.device)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        reference = head_logprobs(model, clean[part])  # [c, vocab]
        index = None if targets is None else targets[part, None].to(clean.device)
        if nll is not None:
            nll[0, part] = -reference.gather(-1, index).squeeze(-1)
        for e, hidden in enumerate(edited):
            logprobs = head_logprobs(model, hidden[part])
            kl[e, part] = kl_per_position(reference, logprobs)
            if nll is not None:
                nll[1 + e, part] = -logprobs.gather(-1, index).squeeze(-1)
            del logprobs  # before the next distribution is built
    return kl, nll


def next_token_logprobs(
    model: nn.Module,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    edit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Log-probabilities ``[batch, seq, vocab]`` (float32) with block ``layer``'s output replaced by ``edit(h)``.

    Unchunked, the model's own forward: the reference the chunked analyses are tested against. Memory
    ``batch * seq * vocab``: not for real vocabularies.
    """
    device = next(model.parameters()).device
    with edit_residual(model, layer, edit):
        mask = attention_mask.to(device)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False).logits
    return logits.float().log_softmax(-1)


@dataclass
class CleanRun:
    """Unedited forward passes of both models on the probes.

    Attributes:
        residual: layer outputs ``[n_probes, seq, 2, d_model]`` (base, chat), on the base model's device.
        final: per model, final hidden states ``[n_probes, seq, d_model]`` on that model's device: the clean
            next-token distributions are ``head_logprobs`` of them, recomputed a chunk at a time.
    """

    residual: torch.Tensor
    final: tuple[torch.Tensor, torch.Tensor]


def clean_run(pair: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: int | None = None) -> CleanRun:
    """One forward pass per model, ``rows`` probes at a time (all when None), without the LM head."""
    residuals, finals = [], []
    for model in pair_models(pair):
        captured: list[torch.Tensor] = []

        def record(hidden: torch.Tensor, store: list[torch.Tensor] = captured) -> torch.Tensor:
            store.append(hidden)
            return hidden

        step = rows or input_ids.shape[0]
        parts = zip(input_ids.split(step), attention_mask.split(step))
        finals.append(torch.cat([final_hidden(model, pair.layer, ids, mask, record) for ids, mask in parts]))
        residuals.append(torch.cat(captured))
    device = residuals[0].device
    return CleanRun(torch.stack([r.to(device) for r in residuals], dim=2), (finals[0], finals[1]))


def encode_content(crosscoder: CrossCoder, residual: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Eval-mode codes ``[n_probes, seq, F]`` of paired residuals ``[n_probes, seq, 2, d_model]``.

    BOS and padding positions get all-zero codes (``where``, not a product: padded positions may hold
    non-finite values).
    """
    codes = crosscoder.encode(residual.to(crosscoder.W_dec))
    return torch.where(content.to(codes.device)[..., None], codes, 0.0)


def kl_per_position(clean: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``KL(clean || edited)`` of next-token distributions given as log-probs ``[..., vocab]``: ``[...]``.

    Clamped at 0: equal distributions sum to float noise (-3e-7 seen), and a KL is never negative."""
    return (clean.exp() * (clean - edited)).sum(-1).clamp_min(0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [rows, seq]`` over the positions where ``mask`` holds, per row: ``[rows]``."""
    mask = mask.to(values.device)
    return torch.where(mask, values, 0.0).sum(-1) / mask.sum(-1)
