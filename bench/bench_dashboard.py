"""Throughput and memory of the dashboard's max-activation pass, and the size it would have at papergrade.

    python -m bench.bench_dashboard [--latents 1024] [--d-model 64] [--tokens 16384] [--l0 32] [--threads N]
    python -m bench.bench_dashboard --artifact outputs/<run>/artifact   # + online latency on that artifact's pair

Default: the demo's sizes (1,024 latents, d_model 64, 16,384 held-out tokens, k 32, top 20 per source).
Activations are random and the threshold is set so that L0 is ``--l0`` (the pass's cost depends on the sizes
and on how many latents fire, not on what they mean), half the tokens web, half chat. Prints the time of
the scan (encode + running top-N + histograms, one pass) in tokens/s, of the context windows, and the
process's peak memory above the inputs (ru_maxrss: measured once per process, so one size per run). Then
the projection at 73,728 latents (papergrade): state memory, per-chunk memory and scan time at the measured
rate of multiply-adds, and the size on disk of the dashboard from the bytes per latent measured here.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from crosscoder_pl.config import DashboardSettings
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.examples import scan
from crosscoder_pl.dashboard.offline import _windows, write_dashboard
from crosscoder_pl.data.activations import TokenTable

PAPERGRADE = {"latents": 73_728, "d_model": 2304, "tokens": 65_536, "vocab": 256_000}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def inputs(n_tokens: int, d_model: int, n_latents: int, l0: float, seq_len: int = 128) -> SimpleNamespace:
    """Random activations and their token table (sequences of ``seq_len``, alternately web and chat), and a
    random folded crosscoder whose threshold gives ``l0`` active latents per token on them."""
    generator = torch.Generator().manual_seed(0)
    n_seq = -(-n_tokens // (seq_len - 1))
    ids = torch.randint(3, 8000, (n_seq, seq_len), generator=generator)
    mask = torch.ones(n_seq, seq_len, dtype=torch.long)
    keep = torch.arange(seq_len).expand(n_seq, -1) > 0
    seq, pos = keep.nonzero(as_tuple=True)
    tokens = TokenTable(ids, mask, (torch.arange(n_seq) % 2).to(torch.int8), seq[:n_tokens], pos[:n_tokens])
    acts = torch.randn(n_tokens, 2, d_model, generator=generator)
    torch.manual_seed(0)
    cc = CrossCoder(d_model, n_latents, k=max(1, int(l0)), threshold=0.0).eval()
    with torch.no_grad():
        sample = cc.scores(cc.pre_acts(acts[:2048])).flatten()
        cc.threshold.fill_(float(sample.kthvalue(int(sample.numel() * (1 - l0 / n_latents))).values))
    return SimpleNamespace(acts=acts, tokens=tokens, cc=cc.fold().eval())


def fake_pair(d_model: int, vocab: int) -> SimpleNamespace:
    """Two one-layer Gemma-2 models: only their unembedding and final norm are used (logit lens)."""
    config = Gemma2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=d_model // 2)
    return SimpleNamespace(base=Gemma2ForCausalLM(config).eval(), chat=Gemma2ForCausalLM(config).eval(), tokenizer=None,
                           layer=0, base_id="random/base", chat_id="random/chat")


def online_latency(artifact: Path, repeats: int = 3) -> None:
    """Encode and intervene on a chat prompt with the artifact's crosscoder and model pair (built or cached)."""
    from omegaconf import OmegaConf

    from crosscoder_pl.config import ServerSettings
    from crosscoder_pl.dashboard.online import OnlineSession, Prompt
    from crosscoder_pl.models.pair import load_model_pair

    cfg = OmegaConf.load(artifact / "train_config.yaml").model_pair
    pair = load_model_pair(cfg.base, cfg.chat, cfg.layer, device="cpu", dtype="float32")
    session = OnlineSession(CrossCoder.from_pretrained(artifact), pair, ServerSettings())
    prompt = Prompt(messages=[{"role": "user", "content": "Can you explain how a crosscoder compares two models?"},
                              {"role": "assistant", "content": "Sure. It learns one dictionary for both."},
                              {"role": "user", "content": "Which latents are specific to the chat model?"}])
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = session.encode(prompt, latents=[0, 1, 2])
        last = encoded["top_latents"][-1]
        latent = last[0][0] if last else 0
        result = session.intervene(prompt, latent, "both", "ablate")
        total = time.perf_counter() - start
    print(f"\nonline, {artifact} ({cfg.base} / {cfg.chat}), chat prompt of {len(encoded['tokens'])} tokens:")
    print(f"  encode {encoded['seconds']:.3f} s + ablation of latent {latent} in both models {result['seconds']:.3f} s "
          f"= {total:.3f} s (KL base {result['models']['base']['kl']:.3g}, chat {result['models']['chat']['kl']:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--l0", type=float, default=32)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the random models (logit lens)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--artifact", type=Path, default=None, help="also time the online app on this artifact")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = DashboardSettings(top_n=args.top_n, chunk_tokens=args.chunk)

    data = inputs(args.tokens, args.d_model, args.latents, args.l0)
    torch.set_grad_enabled(False)
    scan(data.cc, data.acts[:512], data.tokens, args.top_n, chunk_tokens=args.chunk)  # warm-up
    baseline = peak_rss_mb()
    start = time.perf_counter()
    result = scan(data.cc, data.acts, data.tokens, args.top_n, settings.histogram_bins, args.chunk)
    scan_s = time.perf_counter() - start
    scan_peak = peak_rss_mb() - baseline
    start = time.perf_counter()
    _windows(data.cc, data.acts, data.tokens, result, settings, torch.full(data.tokens.input_ids.shape, -1), [])
    windows_s = time.perf_counter() - start
    out = Path(tempfile.mkdtemp(prefix="bench_dashboard_"))
    try:
        summary = write_dashboard(data.cc, fake_pair(args.d_model, args.vocab), data.acts, data.tokens, out, settings)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    l0 = float(result.fired.sum()) / args.tokens

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"setting: {args.latents:,} latents, d_model {args.d_model}, {args.tokens:,} held-out tokens "
          f"(web {int(result.n_tokens[0]):,} / chat {int(result.n_tokens[1]):,}), L0 {l0:.1f}, "
          f"top {args.top_n} per source, "
          f"chunk {args.chunk:,}")
    print("| pass | seconds | tokens/s |\n|---|---|---|")
    print(f"| scan (encode, top-N, histograms, frequencies) | {scan_s:.2f} | {args.tokens / scan_s:,.0f} |")
    print(f"| context windows of {int((result.rows >= 0).sum()):,} examples | {windows_s:.2f} | |")
    print(f"| whole write_dashboard (scan, windows, logit lens, files) | {summary['timings_s']['total']:.2f} | "
          f"{args.tokens / summary['timings_s']['total']:,.0f} |")
    print(f"peak memory above the inputs during the scan: {scan_peak:.0f} MiB (ru_maxrss)")
    state = 2 * args.latents * args.top_n * (4 + 8) + 2 * args.latents * settings.histogram_bins * 8
    chunk = args.chunk * args.latents * 4
    print(f"  analytic: running state {state / 2**20:.1f} MiB (top-N values + rows, histograms), "
          f"one chunk of codes {chunk / 2**20:.0f} MiB")
    per_latent_kib = summary["bytes"] / args.latents / 1024
    print(f"dashboard on disk: {summary['bytes'] / 2**20:.1f} MiB ({per_latent_kib:.1f} KiB per latent)")

    p = PAPERGRADE
    macs_per_s = args.tokens * 2 * args.d_model * args.latents / scan_s
    p_state = 2 * p["latents"] * args.top_n * (4 + 8) + 2 * p["latents"] * settings.histogram_bins * 8
    p_chunk = args.chunk * p["latents"] * 4
    p_seconds = p["tokens"] * 2 * p["d_model"] * p["latents"] / macs_per_s
    print(f"\nprojection at papergrade ({p['latents']:,} latents, d_model {p['d_model']}, "
          f"{p['tokens']:,} held-out tokens):")
    print(f"  running state {p_state / 2**20:.0f} MiB; one chunk of {args.chunk:,} codes {p_chunk / 2**20:,.0f} MiB "
          f"(lower dashboard.chunk_tokens to shrink it); never tokens x latents "
          f"({p['tokens'] * p['latents'] * 4 / 2**30:.0f} GiB)")
    print(f"  scan at this machine's measured {macs_per_s / 1e9:.1f} G multiply-adds/s: {p_seconds / 60:.0f} min "
          "on these cores (the encode dominates; a GPU does it in seconds)")
    print(f"  dashboard on disk: ~{summary['bytes'] / args.latents * p['latents'] / 2**30:.1f} GiB at this top-N and "
          f"context, in {-(-p['latents'] // settings.latents_per_shard):,} shards")
    if args.artifact is not None:
        online_latency(args.artifact)


if __name__ == "__main__":
    main()
