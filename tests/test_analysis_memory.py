"""Chunked causal and splice-in analyses: same figures as the unchunked computation, bounded peak memory."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_analysis_causal import BOS, LAYER, crosscoder, probes, tiny_pair
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder_pl.analysis.causal import causal_validation
from crosscoder_pl.analysis.probes import (
    check_head,
    content_mask,
    kl_per_position,
    memory_budget_bytes,
    next_token_logprobs,
    positions_per_chunk,
)
from crosscoder_pl.analysis.splice import splice_evaluation
from crosscoder_pl.crosscoder import CrossCoder

TINY_MB = 1e-4  # 100 bytes: one sequence per forward, one position per head chunk
HUGE_MB = 1e6  # everything at once
# Chunking changes only batch shapes (BLAS blocking): float32 rounding, well inside these tolerances.
RTOL, ATOL = 1e-4, 1e-7


def test_causal_chunked_equals_unchunked() -> None:
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    tiny = causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=None, memory_budget_mb=TINY_MB)
    huge = causal_validation(cc, pair, ids, mask, torch.arange(8), latents_per_batch=None, memory_budget_mb=HUGE_MB)
    assert tiny.kl.count_nonzero() > 10
    torch.testing.assert_close(tiny.kl, huge.kl, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(tiny.pearson, huge.pearson, rtol=RTOL, atol=1e-5, equal_nan=True)


def reference_splice(cc: CrossCoder, pair: SimpleNamespace, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """CE and KL figures of splice-in computed without any chunking, from the models' own logits."""
    with torch.inference_mode():
        content = content_mask(mask)
        scored = content[:, :-1] & mask[:, 1:].bool()
        captured = {}
        clean = {}
        for name, model in (("base", pair.base), ("chat", pair.chat)):
            clean[name] = next_token_logprobs(model, LAYER, ids, mask, lambda h, n=name: captured.setdefault(n, h))
        recon = cc(torch.stack([captured["base"], captured["chat"]], dim=2))
        out = {}
        for m, (name, model) in enumerate((("base", pair.base), ("chat", pair.chat))):
            spliced = next_token_logprobs(model, LAYER, ids, mask, lambda h: torch.where(content[..., None], recon[:, :, m], h))
            zeroed = next_token_logprobs(model, LAYER, ids, mask, lambda h: torch.where(content[..., None], 0.0, h))

            def ce(logprobs: torch.Tensor) -> float:
                nll = -logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                return float(nll[scored].mean())

            out[name] = {"ce_clean": ce(clean[name]), "ce_splice": ce(spliced), "ce_zero": ce(zeroed),
                         "kl_splice": float(kl_per_position(clean[name], spliced)[content].mean())}
    return out


@pytest.mark.parametrize("budget_mb", [TINY_MB, HUGE_MB])
def test_splice_chunked_equals_the_unchunked_definition(budget_mb: float) -> None:
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask = probes(pair.base)
    chunked = splice_evaluation(cc, pair, ids, mask, memory_budget_mb=budget_mb)
    expected = reference_splice(cc, pair, ids, mask)
    for name in ("base", "chat"):
        assert expected[name]["kl_splice"] > 1e-3  # the reconstruction changes the outputs
        for key, value in expected[name].items():
            assert chunked[name][key] == pytest.approx(value, rel=RTOL, abs=1e-6), (name, key)


def test_budget_sizes_the_chunks() -> None:
    assert memory_budget_bytes(2.0, "cpu") == 2 * 2**20
    assert memory_budget_bytes(None, "cpu") > 0  # from the available RAM
    assert positions_per_chunk(8 * 1000 * 4 * 5, vocab=1000) == 5
    assert positions_per_chunk(1, vocab=256_000) == 1
    with pytest.raises(ValueError, match=r"analysis.memory_budget_mb=0 must be positive"):
        memory_budget_bytes(0, "cpu")


def test_a_head_that_rescales_logits_is_refused(monkeypatch) -> None:
    model = tiny_pair(identical=True).base
    check_head(model)
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: SimpleNamespace(logits=2 * forward(*a, **k).logits))
    with pytest.raises(ValueError, match="not lm_head"):
        check_head(model)


# --- a 256,000-token vocabulary --------------------------------------------------------------------------

VOCAB_256K, N_PROBES, SEQ, BUDGET_MB = 256_000, 4, 32, 32
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def exact_rss_accounting() -> bool:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, returned to the kernel on free:
    resident memory then follows what is alive instead of what the heap once reached. False off glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except OSError:
        return False


def peak_rss_reset() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def big_vocab_pair() -> SimpleNamespace:
    config = Gemma2Config(vocab_size=VOCAB_256K, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                          attn_implementation="eager", final_logit_softcapping=None)  # Gemma-3 style head
    torch.manual_seed(0)
    base = Gemma2ForCausalLM(config).eval()
    chat = Gemma2ForCausalLM(config).eval()
    return SimpleNamespace(base=base, chat=chat, layer=0, base_id="big/base", chat_id="big/chat")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_analyses_at_a_256k_vocabulary_stay_within_the_budget() -> None:
    """Peak resident memory while both analyses run, above what was resident before: the budget plus a fixed
    overhead (about 20 MiB measured), far below the unchunked code's several [n_probes, seq, vocab] tensors."""
    if not exact_rss_accounting():
        pytest.skip("needs glibc's mallopt for resident memory to track live tensors")
    pair = big_vocab_pair()
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB_256K, (N_PROBES, SEQ))
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    cc = CrossCoder(16, 32, k=4, threshold=0.0).fold()
    with torch.no_grad():
        cc.W_dec.mul_(10)
    cc.eval()
    gc.collect()
    before = rss_kib("VmRSS")
    peak_rss_reset()
    causal = causal_validation(cc, pair, ids, mask, torch.arange(2), latents_per_batch=None, memory_budget_mb=BUDGET_MB)
    splice = splice_evaluation(cc, pair, ids, mask, memory_budget_mb=BUDGET_MB)
    growth_mib = (rss_kib("VmHWM") - before) / 1024
    # 125 MiB: the unchunked code kept this for both models at once, plus the ablated batch's.
    one_model_logprobs_mib = N_PROBES * SEQ * VOCAB_256K * 4 / 2**20
    print(f"peak RSS growth {growth_mib:.0f} MiB; [n_probes, seq, vocab] float32 = {one_model_logprobs_mib:.0f} MiB")
    assert causal.kl.count_nonzero() > 0 and splice["base"]["kl_splice"] > 0
    assert growth_mib < one_model_logprobs_mib / 2
