"""Training-step throughput of CrossCoderModule (tokens/s) at a few sizes, through a real Lightning Trainer.

    python -m bench.bench_crosscoder [--steps 30] [--threads N]

Times whole optimiser steps (BatchTopK forward, AuxK, backward, Adam, clipping, metrics) after a warm-up,
on random activations held in memory, so the language models are not part of the figure.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from crosscoder_pl import CrossCoderModule

SIZES = [  # (d_model, n_latents, k, batch tokens)
    (128, 2048, 32, 1024),
    (256, 8192, 64, 1024),
    (512, 16384, 64, 2048),
]


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps = warmup, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step > self.warmup:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.start


def bench(d_model: int, n_latents: int, k: int, batch: int, steps: int, warmup: int = 5) -> float:
    x = torch.randn(batch * 8, 2, d_model)
    module = CrossCoderModule(d_model, n_latents, k, k_start=k, scales=[1.0, 1.0], dead_after_tokens=batch * 4)
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[timer], accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=batch, shuffle=True))
    return timer.steps * batch / timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'d_model':>8} {'n_latents':>10} {'k':>5} {'batch':>6} {'tokens/s':>10} {'ms/step':>8}")
    for d_model, n_latents, k, batch in SIZES:
        tps = bench(d_model, n_latents, k, batch, args.steps)
        print(f"{d_model:>8} {n_latents:>10} {k:>5} {batch:>6} {tps:>10.0f} {1000 * batch / tps:>8.1f}")


if __name__ == "__main__":
    main()
