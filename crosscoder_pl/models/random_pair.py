"""A model pair with the real Gemma-2-2B dimensions and random weights, for dry runs of the papergrade shapes.

Nothing is downloaded: the architecture is a `Gemma2Config` with Gemma-2-2B's published sizes (d_model 2304,
vocabulary 256,000, 8 query / 4 key-value heads of 256, MLP 9216, 26 layers), the weights are random, and the
tokenizer is a local one (default: the embedded tiny pair's; its token ids are valid indices of the 256,000-row
embedding). Training reads the residual stream after block ``layer`` and never runs the blocks above it, so
``truncate=True`` builds blocks ``0..layer`` only: the language models then hold what the training forward
touches (the real pair holds all 26 blocks on the device: add them when sizing a GPU, see the bench).
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

from crosscoder_pl.models.pair import ModelPair, resolve_dtype, resolve_model_name

# google/gemma-2-2b's config.json (the dimensions that set memory and FLOPs, and the attention details).
GEMMA2_2B = {
    "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256_000, "max_position_embeddings": 8192,
    "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "tie_word_embeddings": True,
}


def gemma2_2b_config(layers: int | None = None) -> Gemma2Config:
    """Gemma-2-2B's architecture with ``layers`` decoder blocks (None: all 26)."""
    dims = dict(GEMMA2_2B)
    if layers is not None:
        if not 1 <= layers <= GEMMA2_2B["num_hidden_layers"]:
            raise ValueError(f"layers={layers} must be in 1..{GEMMA2_2B['num_hidden_layers']} (Gemma-2-2B's blocks)")
        dims["num_hidden_layers"] = layers
    return Gemma2Config(**dims)


def random_gemma2_pair(
    base: str = "random-gemma-2-2b:base",
    chat: str = "random-gemma-2-2b:chat",
    layer: int = 13,
    truncate: bool = True,
    tokenizer: str = "embedded-tiny:chat",
    dtype: str = "bfloat16",
    seed: int = 0,
) -> ModelPair:
    """Base and chat models of Gemma-2-2B's shape with independent random weights (``seed``, ``seed + 1``),
    in eval mode and frozen, on the CPU; ``base`` / ``chat``: the names the artifact records; ``tokenizer``: a
    local tokenizer (a directory or an embedded name)."""
    config = gemma2_2b_config(layer + 1 if truncate else None)
    if not 0 <= layer < GEMMA2_2B["num_hidden_layers"]:
        raise ValueError(f"layer={layer} is out of range for Gemma-2-2B's 26 decoder blocks (valid: 0..25)")
    torch_dtype = getattr(torch, resolve_dtype(dtype))
    models = []
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch_dtype)  # built in the target dtype: no float32 copy of 1.7B parameters
        for offset in (0, 1):
            torch.manual_seed(seed + offset)
            models.append(Gemma2ForCausalLM(config).eval().requires_grad_(False))
    finally:
        torch.set_default_dtype(default)
    path, _ = resolve_model_name(tokenizer)
    return ModelPair(models[0], models[1], AutoTokenizer.from_pretrained(path), layer, base, chat)
