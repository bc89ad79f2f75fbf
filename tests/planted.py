"""Paired activations generated from a known sparse dictionary: shared, base-only and chat-only atoms."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Planted:
    atoms: torch.Tensor  # [A, 2, d_model]; a base-only atom has a zero chat vector and vice versa
    kind: list[str]  # per atom: "shared" | "base_only" | "chat_only"
    model_scale: tuple[float, float]

    def sample(self, n: int, active: int, seed: int) -> torch.Tensor:
        """``n`` tokens, each a positive mix of ``active`` random atoms: ``[n, 2, d_model]``."""
        g = torch.Generator().manual_seed(seed)
        n_atoms = self.atoms.shape[0]
        idx = torch.rand(n, n_atoms, generator=g).topk(active, dim=-1).indices
        codes = torch.zeros(n, n_atoms).scatter(1, idx, 0.5 + torch.rand(n, active, generator=g))
        x = torch.einsum("na,amd->nmd", codes, self.atoms)
        return x * torch.tensor(self.model_scale)[:, None]


def make_planted(d_model: int = 32, n_shared: int = 24, n_base: int = 6, n_chat: int = 6,
                 model_scale: tuple[float, float] = (1.0, 10.0), seed: int = 0) -> Planted:
    g = torch.Generator().manual_seed(seed)
    n_atoms = n_shared + n_base + n_chat
    atoms = torch.randn(n_atoms, 2, d_model, generator=g)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    atoms[n_shared:n_shared + n_base, 1] = 0
    atoms[n_shared + n_base:, 0] = 0
    kind = ["shared"] * n_shared + ["base_only"] * n_base + ["chat_only"] * n_chat
    return Planted(atoms, kind, model_scale)
