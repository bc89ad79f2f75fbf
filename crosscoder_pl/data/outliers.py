"""Outlier tokens: tokens whose activation norm in a model exceeds ``factor`` times that model's median norm.

Gemma residual streams hold a few tokens with norms up to ~10x the median that carry ~20% of the centred
variance: a crosscoder trained with them spends capacity on them, one trained without them never sees them.
Either way the user has to know how many there were, so the data modules count them per model
(``data.outlier_factor``; the median is taken over the tokens read together: a group of ``text_batch_size``
texts, or a batch read from a cache) and drop them only when ``data.drop_outliers`` is true. `OutlierCounts`
holds the running totals: logged as ``data/outlier_frac_<model>``, kept in checkpoints, stated in the model card.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from crosscoder_pl.names import MODELS  # index 0 and 1 of paired activations

KINDS = (*MODELS, "either")  # "either": outlier in at least one model (the rows dropped when dropping)


def outlier_flags(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """``[tokens, 2]`` bool for ``acts [tokens, 2, d_model]``: True where that model's norm exceeds ``factor`` times
    its median norm over ``acts``. A norm that is not a number counts as an outlier (it is no inlier either)."""
    norms = acts.norm(dim=-1)  # [tokens, 2]
    return ~(norms <= factor * norms.median(dim=0).values)


@dataclass
class OutlierCounts:
    """Running totals: ``tokens`` screened (BOS and padding excluded, before any dropping), and how many of them
    were outliers in ``base``, in ``chat``, and in ``either`` model. Plain ints: a checkpoint holds them as is."""

    tokens: int = 0
    base: int = 0
    chat: int = 0
    either: int = 0

    @classmethod
    def of(cls, flags: torch.Tensor) -> OutlierCounts:
        """The counts of ``flags [tokens, 2]`` (`outlier_flags`), with one device sync."""
        per_kind = torch.cat([flags.sum(0), flags.any(-1).sum(0, keepdim=True)]).tolist()
        return cls(len(flags), *per_kind)

    def add(self, other: OutlierCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def fractions(self) -> dict[str, float]:
        """Outliers per screened token, by kind (0 before any token)."""
        return {kind: getattr(self, kind) / self.tokens if self.tokens else 0.0 for kind in KINDS}

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state.get(f.name, 0)))

    def as_dict(self) -> dict[str, float]:
        """Flat floats for a logger: ``data/outliers_<kind>``, ``data/outlier_frac_<kind>`` (kind: base, chat,
        either) and ``data/outlier_screened_tokens``; empty before any token was screened."""
        if not self.tokens:
            return {}
        out = {f"data/outliers_{kind}": float(getattr(self, kind)) for kind in KINDS}
        out |= {f"data/outlier_frac_{kind}": frac for kind, frac in self.fractions().items()}
        return out | {"data/outlier_screened_tokens": float(self.tokens)}

    def summary(self, factor: float, dropped: bool, median_over: str) -> dict[str, Any]:
        """What ``metrics.json`` and the model card state: the rule (``factor``, the tokens the median is taken
        over), whether the outliers were ``dropped``, the tokens screened, counts and fractions per kind."""
        counts = {kind: getattr(self, kind) for kind in KINDS}
        return {"factor": factor, "dropped": dropped, "median_over": median_over, "tokens": self.tokens,
                "counts": counts, "fractions": self.fractions()}


def screen(acts: torch.Tensor, factor: float | None, drop: bool, counts: OutlierCounts) -> torch.Tensor | None:
    """Count the outliers of ``acts [tokens, 2, d_model]`` into ``counts``; return the rows to keep ``[tokens]``
    bool (on ``acts``' device) when ``drop``, else None (keep all). ``factor`` None: nothing counted or dropped."""
    if factor is None or not len(acts):
        return None
    flags = outlier_flags(acts, factor)
    counts.add(OutlierCounts.of(flags))
    return ~flags.any(-1) if drop else None


def upgraded(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (a data config, a cache's ``source``, a checkpoint's stream settings) with ``drop_outliers``
    filled in when they predate it: until then a non-null ``outlier_factor`` meant dropping."""
    out = dict(settings)
    if "outlier_factor" in out and "drop_outliers" not in out:
        out["drop_outliers"] = out["outlier_factor"] is not None
    return out
