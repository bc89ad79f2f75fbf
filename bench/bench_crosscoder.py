"""Crosscoder training-step throughput: the sparse step against the dense reference, side by side.

    python -m bench.bench_crosscoder [--steps 20] [--threads N] [--sizes 256:4096:1024:32 512:16384:2048:32]
    python -m bench.bench_crosscoder --trainer [--steps 20]   # whole Lightning steps of CrossCoderModule
    python -m bench.bench_crosscoder --l1                      # and the L1 crosscoder's (dense) step beside them

Default mode: for each size (d_model:n_latents:batch:k), two crosscoders with the same initial weights train
on the same synthetic batches, one with ``step_impl="dense"`` and one with ``"sparse"``, their steps
interleaved (the order alternates every step) so that both see the same machine load. A step is what
training does per batch: ``CrossCoder.step`` (BatchTopK, AuxK on the latents dead for 4 batches), backward,
gradient clipping at 1.0, Adam (fused, as ``CrossCoderModule`` uses it), zero_grad. Prints tokens/s of each
(median step time after a warm-up) and their ratio, then the variance explained of each on held-out
batches after the same number of steps: the two should agree within noise (same maths, float rounding only).

The synthetic activations are planted: each token is a positive mix of ``k`` unit atoms out of ``n_latents``
(a shared direction for both models, chat scaled by 4) plus 5% Gaussian noise.

``--l1``: a third crosscoder with the same weights, ``sparsity="l1"`` (λ = 1: every positive code kept, the dense
step, no AuxK), interleaved with the two; its VE is at its own sparsity, not comparable to BatchTopK's.

``--trainer``: tokens/s of whole optimiser steps through a real Lightning Trainer (metrics, logging, dead
counters included) for both implementations, one after the other (not interleaved).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from crosscoder_pl import CrossCoder, CrossCoderModule

SIZES = ["256:4096:1024:32", "512:16384:2048:32"]  # d_model:n_latents:batch:k
IMPLS = ("dense", "sparse")
ATOMS_PER_LATENT = 1


# ----------------------------------------------------------------------------------- step mode
def planted_batches(d_model: int, n_latents: int, k: int, batch: int, n_batches: int, seed: int) -> torch.Tensor:
    """``[n_batches, batch, 2, d_model]`` tokens, each a positive mix of ``k`` of ``n_latents`` planted atoms."""
    g = torch.Generator().manual_seed(seed)
    n_atoms = n_latents // ATOMS_PER_LATENT
    atoms = torch.randn(n_atoms, 2, d_model, generator=g)
    atoms = (atoms / atoms.norm(dim=-1, keepdim=True)).reshape(n_atoms, -1)
    n = n_batches * batch
    idx = torch.randint(n_atoms, (n * k,), generator=g)
    mags = 0.5 + torch.rand(n * k, generator=g)
    x = F.embedding_bag(idx, atoms, torch.arange(n) * k, mode="sum", per_sample_weights=mags).view(n, 2, d_model)
    x = x * torch.tensor([1.0, 4.0])[:, None]
    x = x + 0.05 * x.std() * torch.randn(x.shape, generator=g)
    return x.view(n_batches, batch, 2, d_model)


class Trainee:
    """One crosscoder, its optimiser and dead-latent counters, stepped with one implementation."""

    def __init__(self, cc: CrossCoder, impl: str, lr: float, dead_after_tokens: int, always_dead: torch.Tensor) -> None:
        self.cc, self.impl, self.dead_after = cc, impl, dead_after_tokens
        self.always_dead = torch.zeros(cc.n_latents, dtype=torch.bool).index_fill_(0, always_dead, True)
        self.opt = torch.optim.Adam(cc.parameters(), lr=lr, fused=True)
        self.since_fired = torch.zeros(cc.n_latents, dtype=torch.long)
        self.times: list[float] = []
        self.dead_fracs: list[float] = []

    def step(self, x: torch.Tensor, k: int) -> None:
        dead = (self.since_fired >= self.dead_after) | self.always_dead
        start = time.perf_counter()
        if self.impl == "l1":
            out = self.cc.step(x, None, dead, l1_coef=1.0)
        else:
            out = self.cc.step(x, k, dead, aux_coef=1 / 32, k_aux=self.cc.d_model // 2, impl=self.impl)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.cc.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.dead_fracs.append(float(dead.float().mean()))
        self.since_fired = torch.where(out.active.fired(), 0, self.since_fired + x.shape[0])

    @torch.no_grad()
    def variance_explained(self, batches: torch.Tensor, k: int) -> list[float]:
        """Pooled VE per model over ``batches [n, batch, 2, d_model]`` with BatchTopK codes (training space)."""
        err = torch.zeros(2, dtype=torch.float64)
        total = torch.zeros(2, dtype=torch.float64)
        for x in batches:
            out = self.cc.step(x, k, impl="dense")
            err += (out.x - out.x_hat).pow(2).sum((0, 2)).double()
            total += (out.x - out.x.mean(0)).pow(2).sum((0, 2)).double()
        return (1 - err / total).tolist()


@torch.no_grad()
def data_init(cc: CrossCoder, x: torch.Tensor) -> CrossCoder:
    """CrossCoderModule's default data init, from tokens ``[n, 2, d_model]``: per-model scales (mean norm to
    sqrt(d_model)), decoder bias at the mean, encoder bias centring every pre-activation."""
    cc.scales.copy_(cc.d_model ** 0.5 / x.norm(dim=-1).mean(0))
    mean = cc.normalise(x).mean(0)
    cc.b_dec.copy_(mean)
    cc.b_enc.copy_(-(mean.reshape(-1) @ cc.W_enc.reshape(-1, cc.n_latents)))
    return cc


def bench_steps(d_model: int, n_latents: int, batch: int, k: int, steps: int, warmup: int, lr: float,
                dead_frac: float, l1: bool = False) -> None:
    data = planted_batches(d_model, n_latents, k, batch, n_batches=10, seed=0)
    data, held_out = data[:8], data[8:]  # the same atoms, other tokens
    torch.manual_seed(0)
    cc = data_init(CrossCoder(d_model, n_latents, k), data.flatten(0, 1))
    always_dead = torch.randperm(n_latents)[: round(dead_frac * n_latents)]
    trainees = [Trainee(copy.deepcopy(cc), impl, lr, 4 * batch, always_dead) for impl in IMPLS]
    if l1:
        l1_cc = copy.deepcopy(cc)
        l1_cc.sparsity, l1_cc.k = "l1", None
        trainees.append(Trainee(l1_cc, "l1", lr, 4 * batch, always_dead))
    for step in range(warmup + steps):
        x = data[step % len(data)]
        for trainee in trainees if step % 2 == 0 else trainees[::-1]:
            trainee.step(x, k)
    ms = {t.impl: 1000 * statistics.median(t.times[warmup:]) for t in trainees}
    ve = {t.impl: t.variance_explained(held_out, k) for t in trainees}
    dead = {t.impl: statistics.mean(t.dead_fracs[warmup:]) for t in trainees}
    print(f"d_model {d_model}, n_latents {n_latents}, batch {batch}, k {k}, AuxK on {dead_frac:.0%} of the latents "
          f"held dead + those dead for 4 batches: {steps} timed steps after {warmup}")
    print(f"  {'impl':<7} {'ms/step':>8} {'tokens/s':>9} {'VE base':>8} {'VE chat':>8} {'dead (mean)':>11}")
    for impl in ms:
        print(f"  {impl:<7} {ms[impl]:>8.1f} {1000 * batch / ms[impl]:>9.0f} {ve[impl][0]:>8.4f} {ve[impl][1]:>8.4f} "
              f"{dead[impl]:>11.3f}")
    print(f"  sparse / dense tokens/s: {ms['dense'] / ms['sparse']:.2f}x; "
          f"VE difference (sparse - dense): {ve['sparse'][0] - ve['dense'][0]:+.2e} base, "
          f"{ve['sparse'][1] - ve['dense'][1]:+.2e} chat")


# ----------------------------------------------------------------------------------- trainer mode
class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps, self.elapsed = warmup, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step > self.warmup:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.start


def bench_trainer(d_model: int, n_latents: int, batch: int, k: int, steps: int, impl: str, warmup: int) -> float:
    x = torch.randn(batch * 8, 2, d_model)
    module = CrossCoderModule(d_model, n_latents, k, k_start=k, scales=[1.0, 1.0], dead_after_tokens=batch * 4,
                              step_impl=impl)
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[timer], accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=batch, shuffle=True))
    return timer.steps * batch / timer.elapsed


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation and size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="d_model:n_latents:batch:k")
    parser.add_argument("--dead", type=float, nargs="+", default=[0.0, 0.05],
                        help="fractions of latents held dead (AuxK's cost at a steady-state dead fraction)")
    parser.add_argument("--trainer", action="store_true", help="whole Lightning steps of CrossCoderModule instead")
    parser.add_argument("--l1", action="store_true", help="time the L1 crosscoder's step beside the two")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu: {_cpu_name()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    sizes = [tuple(int(v) for v in size.split(":")) for size in args.sizes]
    if args.trainer:
        header = " ".join(f"{impl + ' tok/s':>13}" for impl in IMPLS)
        print(f"{'d_model':>8} {'n_latents':>10} {'batch':>6} {'k':>5} {header} {'ratio':>6}")
        for d_model, n_latents, batch, k in sizes:
            tps = [bench_trainer(d_model, n_latents, batch, k, args.steps, impl, args.warmup) for impl in IMPLS]
            print(f"{d_model:>8} {n_latents:>10} {batch:>6} {k:>5} " + " ".join(f"{t:>13.0f}" for t in tps)
                  + f" {tps[1] / tps[0]:>5.2f}x")
    else:
        for d_model, n_latents, batch, k in sizes:
            for dead_frac in args.dead:
                bench_steps(d_model, n_latents, batch, k, args.steps, args.warmup, args.lr, dead_frac, args.l1)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
