"""Papergrade dry run on a CPU: the real shapes, a few steps, peak memory and the modelled GPU time of 100M tokens.

    OMP_NUM_THREADS=1 python bench/bench_papergrade_dry_run.py [hydra overrides, e.g. trainer.max_steps=2]

Builds ``+experiment=papergrade_dry_run`` (two random-weight models of Gemma-2-2B's dimensions in bf16 hooked after
block 13, the full 73,728-latent crosscoder in fp32 with Adam), trains ``trainer.max_steps`` steps with Lightning
on the CPU (validation included; no artifact: its folded copy would add 2.7 GB, see the printout), then counts
the FLOPs of one language-model pass and of one crosscoder step (forward + backward) with torch's FlopCounterMode
and models the GPU time of the recipe's 100M tokens:

    time = tokens x (LM FLOPs/token / (bf16 peak x eff) + crosscoder FLOPs/token / (TF32 peak x eff))
           + steps x Adam's memory traffic / HBM bandwidth

with the assumptions printed (H100 SXM: 989 TFLOP/s bf16 dense, 495 TFLOP/s TF32 dense, 3.35 TB/s; the efficiency
``--efficiency``, default 0.4). Refuses to start when the estimated peak exceeds the available memory.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crosscoder_pl.config import RunConfig
from crosscoder_pl.data.activations import paired_activations
from crosscoder_pl.data.sources import StreamStats, texts
from crosscoder_pl.models.random_pair import gemma2_2b_config
from crosscoder_pl.module import CrossCoderModule
from crosscoder_pl.training import build_data, build_pair

TOKENS = 100_000_000
PAPERGRADE_BATCH = 4096
GPU = {"name": "H100 SXM", "bf16": 989e12, "tf32": 495e12, "hbm": 3.35e12}
GIB = 2**30


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", ["+experiment=papergrade_dry_run", "hydra.runtime.output_dir=/tmp/papergrade_dry_run",
                                 *overrides])


def lm_parameters(layers: int) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Gemma2ForCausalLM(gemma2_2b_config(layers)).parameters())


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(cfg: DictConfig, d_model: int) -> dict[str, float]:
    """Peak memory in bytes by part: the two LMs (bf16), the crosscoder with gradients and Adam (4 x fp32),
    and the step's ``[batch, F]`` temporaries (a handful of fp32 copies)."""
    layers = cfg.model_pair.layer + 1 if cfg.model_pair.truncate else None
    lm = 2 * lm_parameters(layers or 26) * 2
    n_latents = cfg.crosscoder.n_latents
    crosscoder = (2 * 2 * d_model * n_latents + n_latents + 2 * d_model) * 4
    temporaries = 6 * cfg.data.batch_size * n_latents * 4
    return {"language models (bf16)": lm, "crosscoder + grads + Adam (fp32)": 4 * crosscoder,
            "step temporaries": temporaries}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--efficiency", type=float, default=0.4, help="fraction of the GPU's peak reached")
    parser.add_argument("overrides", nargs="*", help="hydra overrides of +experiment=papergrade_dry_run")
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    d_model = 2304
    parts = estimate_bytes(cfg, d_model)
    need, have = sum(parts.values()) + 1.5 * GIB, available_bytes()  # + 1.5 GiB: Python, torch, tokenizer, buffers
    for name, size in parts.items():
        print(f"estimate  {name:34s} {size / GIB:6.2f} GiB")
    print(f"estimate  {'peak (with 1.5 GiB runtime)':34s} {need / GIB:6.2f} GiB; available {have / GIB:.2f} GiB")
    if need > have:
        raise SystemExit("not enough memory for the dry run: lower data.batch_size or close other programs")

    torch.set_num_threads(1 if cfg.get("threads") is None else cfg.threads)
    L.seed_everything(cfg.seed)
    t0 = time.perf_counter()
    run = RunConfig.from_hydra(cfg)
    pair = build_pair(run.model_pair)
    t_build = time.perf_counter() - t0
    datamodule = build_data(run.data, pair)
    module = CrossCoderModule(pair.d_model, run.crosscoder)
    assert pair.d_model == d_model and pair.base.config.vocab_size == 256_000
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        val_check_interval=cfg.trainer.val_check_interval, check_val_every_n_epoch=None,
                        gradient_clip_val=cfg.trainer.gradient_clip_val, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    t_fit = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    # FLOPs per token of the two truncated forwards (one text batch) and of one crosscoder step at this batch.
    group = [t for t, _ in zip(texts(datamodule._rows(heldout=False), StreamStats()), range(cfg.data.text_batch_size))]
    kept: list[torch.Tensor] = []
    lm_flops = count_flops(lambda: kept.append(paired_activations(pair, group, cfg.data.seq_len, "right", None)))
    lm_per_token = lm_flops / len(kept[0])
    x = next(iter(datamodule.train_dataloader()))
    cc = module.crosscoder.train()
    cc_flops = count_flops(lambda: cc.step(x, module.cfg.k, loss=module.cfg.loss,
                                           impl=module.cfg.step_impl).loss.backward())
    cc_per_token = cc_flops / len(x)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    eff = args.efficiency
    steps = math.ceil(TOKENS / PAPERGRADE_BATCH)
    n_params = sum(p.numel() for p in cc.parameters())
    adam_bytes = n_params * 4 * 7  # read param, grad, 2 moments; write param, 2 moments (fused Adam)
    t_lm = TOKENS * lm_per_token / (GPU["bf16"] * eff)
    t_cc = TOKENS * cc_per_token / (GPU["tf32"] * eff)
    t_adam = steps * adam_bytes / GPU["hbm"]
    full_lm = 2 * lm_parameters(26) * 2
    print(f"\nmachine: {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"dry run: d_model {pair.d_model}, vocab {pair.base.config.vocab_size}, blocks built "
          f"{pair.base.config.num_hidden_layers} (hooked after {pair.layer}), {cc.n_latents} latents, k {cc.k}, "
          f"batch {cfg.data.batch_size} tokens, {trainer.global_step} steps, step_impl {module.cfg.step_impl}")
    print(f"wall: build pair {t_build:.0f} s, fit (incl. extraction, scales, validation) {t_fit:.0f} s")
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "train/l"))}
    print("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    print(f"peak RSS: {peak_rss / GIB:.2f} GiB (this process, whole run)")
    print(f"FLOPs/token: language models (2 x blocks 0..{pair.layer}) {lm_per_token / 1e9:.2f} GFLOP, "
          f"crosscoder step fwd+bwd {cc_per_token / 1e9:.2f} GFLOP (FlopCounterMode: matmuls)")
    print(f"model: {GPU['name']}, {GPU['bf16'] / 1e12:.0f} TFLOP/s bf16, {GPU['tf32'] / 1e12:.0f} TFLOP/s TF32 "
          f"(dense), {GPU['hbm'] / 1e12:.2f} TB/s, efficiency {eff:.2f}; {TOKENS / 1e6:.0f}M tokens, "
          f"{steps} steps of {PAPERGRADE_BATCH}")
    print(f"modelled GPU time: language models {t_lm / 3600:.2f} h + crosscoder {t_cc / 3600:.2f} h + Adam "
          f"{t_adam / 3600:.2f} h = {(t_lm + t_cc + t_adam) / 3600:.2f} h")
    # The sparse step's gathers and scatters are not matmuls (FlopCounterMode skips them; they are ~k/F of the dense
    # work); the dense step is the bound: 3 matmuls of 2 * n_models * d_model * F per token, forward and backward.
    dense_per_token = 3 * 2 * (2 * 2 * pair.d_model * cc.n_latents)
    t_dense = TOKENS * dense_per_token / (GPU["tf32"] * eff)
    print(f"dense-step bound: {dense_per_token / 1e9:.2f} GFLOP/token, crosscoder {t_dense / 3600:.2f} h, "
          f"total {(t_lm + t_dense + t_adam) / 3600:.2f} h")
    print(f"GPU memory (modelled): full pair on the device {full_lm / GIB:.1f} GiB bf16 (26 blocks) + crosscoder "
          f"with Adam {4 * n_params * 4 / GIB:.1f} GiB + artifact's folded copy {n_params * 4 / GIB:.1f} GiB")


if __name__ == "__main__":
    main()
