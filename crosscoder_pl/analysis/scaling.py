"""Latent scaling (Minder et al. 2025; Dumas & Minder's "base uselessness").

See docs/method.md "Latent scaling and base uselessness".

For latent j with chat decoder vector ``d = W_dec[j, chat]`` (normalised space) and a target ``y_n`` per
token, the least-squares scalar of ``min_beta sum_n ||beta f_j(n) d - y_n||^2`` is
``beta = d · sum_n f_j(n) y_n / (||d||^2 sum_n f_j(n)^2)``. Targets, for each model m:
reconstruction ``y = x̂_m``; error ``y = x_m - x̂_m + f_j W_dec[j, m]``; activation ``y = x_m`` (the
reference's ``base_activation`` / ``chat_activation``). Then ``nu = beta(base) / beta(chat)`` and ``-log nu``
is the base-uselessness score.

Undefined values are nan, never a clipped number, and each latent gets a note saying why:
  - ``never fired``: ``sum f_j^2 = 0`` on the window, no beta at all;
  - ``zero chat decoder``: ``||d|| = 0``, no beta at all;
  - ``chat beta <= 0``: the latent does not help the chat target, so ``nu`` has no meaning;
  - ``nu < 0``: ``beta(base) < 0`` with ``beta(chat) > 0``: the latent would have to be flipped to help the
    base model. ``nu`` is kept, ``-log nu`` is nan. ``nu = 0`` gives ``-log nu = inf``.

Reliability filter (the reference's ``-0.1 <= nu_r <= 2`` and ``-0.1 <= nu_eps <= 2``, applied to chat-only
latents before they are ranked): a latent outside it is an unreliable fit, not a "very chat-specific" one, so
it is neither ranked nor called chat-specific, and `ChatSpecificRule.notes` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosscoder_pl.analysis.eval_mode import check_eval_mode
from crosscoder_pl.analysis.taxonomy import Taxonomy
from crosscoder_pl.crosscoder import CrossCoder


@dataclass(frozen=True)
class ChatSpecificRule:
    """Truly chat-specific: ``Δ >= chat_only_min``, ``nu_eps < nu_eps_max`` and ``nu_r < nu_r_max``, and both
    ratios inside the reliability filter ``nu_min <= nu <= nu_max`` (the reference's -0.1 and 2)."""

    chat_only_min: float = 0.9
    nu_eps_max: float = 0.2
    nu_r_max: float = 0.5
    nu_min: float = -0.1
    nu_max: float = 2.0

    def in_range(self, nu: torch.Tensor) -> torch.Tensor:
        """``[L]`` bool: ``nu_min <= nu <= nu_max``; nan fails (the reference drops nan before filtering)."""
        return (nu >= self.nu_min) & (nu <= self.nu_max)


@dataclass
class LatentScaling:
    """Latent-scaling results for ``latents [L]``: betas ``[L, 2]`` (base, chat), ratios ``[L]``, notes."""

    latents: torch.Tensor
    beta_r: torch.Tensor
    beta_eps: torch.Tensor
    beta_a: torch.Tensor
    nu_r: torch.Tensor
    nu_eps: torch.Tensor
    nu_a: torch.Tensor
    notes: list[str]

    @property
    def neg_log_nu_r(self) -> torch.Tensor:
        return _neg_log(self.nu_r)

    @property
    def neg_log_nu_eps(self) -> torch.Tensor:
        return _neg_log(self.nu_eps)

    @property
    def neg_log_nu_a(self) -> torch.Tensor:
        return _neg_log(self.nu_a)

    def in_range(self, rule: ChatSpecificRule) -> torch.Tensor:
        """``[L]`` bool: the reliability filter on ``nu_r`` and ``nu_eps`` (the reference filters both)."""
        return rule.in_range(self.nu_r) & rule.in_range(self.nu_eps)

    def chat_specific(self, delta: torch.Tensor, rule: ChatSpecificRule) -> torch.Tensor:
        """``[L]`` bool: the rule on these latents; ``delta`` is Δnorm of all latents ``[F]``. nan fails it."""
        chat_only = delta[self.latents] >= rule.chat_only_min
        low = (self.nu_eps < rule.nu_eps_max) & (self.nu_r < rule.nu_r_max)
        return chat_only & low & self.in_range(rule)

    def filter_notes(self, rule: ChatSpecificRule) -> list[str]:
        """`notes` plus, for a defined ratio outside the filter, why the latent is not ranked: ``[L]``."""
        # The comparison is the tensors' own (float32), as in `in_range`, so the verdict and the note agree.
        ratios = {"nu_r": self.nu_r, "nu_eps": self.nu_eps}
        outside = {name: (~rule.in_range(nu) & ~nu.isnan()).tolist() for name, nu in ratios.items()}
        out = []
        for i, note in enumerate(self.notes):
            bad = [f"{name}={float(nu[i]):.3g}" for name, nu in ratios.items() if outside[name][i]]
            extra = f"{', '.join(bad)} outside [{rule.nu_min:g}, {rule.nu_max:g}]: unreliable fit" if bad else ""
            out.append("; ".join(part for part in (note, extra) if part))
        return out


@torch.inference_mode()
def latent_betas(
    crosscoder: CrossCoder, activations: torch.Tensor, latents: torch.Tensor, chunk_tokens: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form betas ``(beta_r, beta_eps, beta_a)``, each ``[L, 2]`` (target model base, chat), in the
    normalised space.

    ``activations``: raw ``[tokens, 2, d_model]``. The token sums ``codes.T @ Y`` are accumulated over
    chunks in float64, for all ``L`` latents at once.
    """
    check_eval_mode(crosscoder)
    latents = latents.to(crosscoder.W_dec.device)
    scales = crosscoder.scales.double()[:, None]  # raw -> normalised, per model
    w_dec = crosscoder.decoder(normalised=True).detach().double()[latents]  # [L, 2, d]
    n_latents, width = latents.numel(), crosscoder.n_models * crosscoder.d_model
    recon_sum = w_dec.new_zeros(n_latents, width)  # sum_n f_j(n) x̂(n)
    act_sum = w_dec.new_zeros(n_latents, width)  # sum_n f_j(n) x(n)
    code_sq = w_dec.new_zeros(n_latents)  # sum_n f_j(n)^2
    for chunk in activations.split(chunk_tokens):
        chunk = chunk.to(crosscoder.W_dec)
        codes = crosscoder.encode(chunk)
        x_hat = crosscoder.decode(codes).double() * scales
        x = chunk.double() * scales
        f = codes[:, latents].double()  # [tokens, L]
        recon_sum += f.T @ x_hat.flatten(1)
        act_sum += f.T @ x.flatten(1)
        code_sq += f.pow(2).sum(0)
    # The error target x - x̂ + f_j W_dec[j, m] sums to act - recon + sum_n f_j^2 * W_dec[j, m].
    error_sum = act_sum - recon_sum + code_sq[:, None] * w_dec.flatten(1)
    d = w_dec[:, 1]  # chat decoder vector, used for both models' targets
    denominator = d.pow(2).sum(-1) * code_sq  # [L]
    betas = [
        torch.einsum("lmd,ld->lm", s.view(n_latents, crosscoder.n_models, crosscoder.d_model), d) / denominator[:, None]
        for s in (recon_sum, error_sum, act_sum)
    ]
    # A zero denominator (never fired, or zero chat decoder) makes every numerator zero too: 0/0 = nan.
    beta_r, beta_eps, beta_a = (b.float().cpu() for b in betas)
    return beta_r, beta_eps, beta_a


def latent_scaling(
    crosscoder: CrossCoder, activations: torch.Tensor, latents: torch.Tensor, chunk_tokens: int = 4096
) -> LatentScaling:
    """Betas, ``nu_r``, ``nu_eps``, ``nu_a`` and a note per latent (see the module docstring for nan rules)."""
    latents = latents.long().cpu()
    beta_r, beta_eps, beta_a = latent_betas(crosscoder, activations, latents, chunk_tokens)
    nu_r, nu_eps, nu_a = _nu(beta_r), _nu(beta_eps), _nu(beta_a)
    chat_norm = crosscoder.W_dec.detach()[latents.to(crosscoder.W_dec.device), 1].norm(dim=-1).cpu()
    # nan compares False, so at most one reason per target fires.
    reasons = {
        "never fired": beta_r[:, 1].isnan() & (chat_norm > 0),
        "zero chat decoder": chat_norm == 0,
        "nu_r: chat beta <= 0": beta_r[:, 1] <= 0,
        "nu_r < 0: -log undefined": nu_r < 0,
        "nu_eps: chat beta <= 0": beta_eps[:, 1] <= 0,
        "nu_eps < 0: -log undefined": nu_eps < 0,
        "nu_a: chat beta <= 0": beta_a[:, 1] <= 0,
        "nu_a < 0: -log undefined": nu_a < 0,
    }
    hits = torch.stack(list(reasons.values()), dim=1).tolist()  # [L, reasons]
    notes = ["; ".join(name for name, hit in zip(reasons, row) if hit) for row in hits]
    return LatentScaling(latents, beta_r, beta_eps, beta_a, nu_r, nu_eps, nu_a, notes)


def sample_latents(
    taxonomy: Taxonomy, class_name: str, max_count: int, generator: torch.Generator
) -> torch.Tensor:
    """All latents of ``class_name`` when at most ``max_count``, else a seeded uniform sample; sorted ids."""
    members = taxonomy.members(class_name)
    if members.numel() <= max_count:
        return members
    return members[torch.randperm(members.numel(), generator=generator)[:max_count]].sort().values


def _nu(beta: torch.Tensor) -> torch.Tensor:
    """``beta[:, 0] / beta[:, 1]``, nan where the chat beta is not positive: ``[L]``."""
    return torch.where(beta[:, 1] > 0, beta[:, 0] / beta[:, 1], torch.nan)


def _neg_log(nu: torch.Tensor) -> torch.Tensor:
    return torch.where(nu >= 0, -torch.log(nu), torch.nan)
