"""Paired activations: both models read the same token ids; their residuals at one layer, side by side.

Texts are tokenised once with the chat model's tokenizer (one BOS per sequence, truncated to ``seq_len``,
padded left or right). Both models run on the same ``input_ids`` / ``attention_mask`` / ``position_ids``
through `crosscoder_pl.hooks.residual_at`, which stops after block ``layer``. BOS and padding positions are
dropped (BOS norms are hundreds of times larger than the rest). Given an ``outlier_factor``,
`paired_activations` also drops the tokens whose norm in either model exceeds that multiple of the model's
median norm over the texts read together; the data modules pass None and count (and, if asked, drop) those
tokens themselves (`crosscoder_pl.data.outliers`).

`paired_activations_with_tokens` also returns a `TokenTable`: for each activation row, the sequence and
position it was read at, with the sequences' token ids and sources (web / chat), so that a latent's strongest
tokens can be shown in context (`crosscoder_pl.dashboard`). Held-out sets carry theirs along
(`with_tokens` / `token_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from crosscoder_pl.data.outliers import outlier_flags
from crosscoder_pl.hooks import residual_at

PaddingSide = Literal["left", "right"]
SOURCE_CODES = {"web": 0, "chat": 1}  # TokenTable.source; -1: unknown
TOKEN_TABLE_ATTR = "token_table"


class PairLike(Protocol):
    """What the data pipeline needs of `crosscoder_pl.models.pair.ModelPair`."""

    base: PreTrainedModel
    chat: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layer: int


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int, padding_side: PaddingSide = "right"
) -> BatchEncoding:
    """``input_ids`` and ``attention_mask`` ``[batch, seq <= seq_len]``, BOS added by the tokenizer."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
    return tokenizer(
        list(texts), padding=True, truncation=True, max_length=seq_len, padding_side=padding_side, return_tensors="pt"
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` positions counted from each sequence's first real token, as ``generate`` does.

    Otherwise a left-padded sequence starts at position ``n_pad``: RoPE only sees relative positions, but the
    rounding then differs from right padding, and models with absolute positions would be wrong.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def content_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Valid positions other than each row's first (its BOS, or attention sink): ``[batch, seq]`` bool."""
    valid = attention_mask.bool()
    return valid & (valid.cumsum(-1) > 1)


def token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """``[batch, seq]`` bool: True at positions that reach the crosscoder: not padding, not a sequence's first
    token (huge-norm even for tokenizers without a BOS token), and not any other BOS id."""
    keep = content_mask(attention_mask)
    return keep if bos_token_id is None else keep & (input_ids != bos_token_id)


def outlier_mask(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """``[tokens]`` bool for ``acts [tokens, 2, d_model]``: True where neither model's norm exceeds ``factor`` times
    that model's median norm (`crosscoder_pl.data.outliers.outlier_flags`)."""
    return ~outlier_flags(acts, factor).any(dim=-1)


@dataclass
class TokenTable:
    """Where each row of a paired-activation tensor ``[tokens, 2, d_model]`` was read.

    Attributes:
        input_ids, attention_mask: the sequences as the models read them ``[n_seq, seq]`` (padding kept).
        source: ``[n_seq]`` int8 (`SOURCE_CODES`: 0 web, 1 chat, -1 unknown).
        seq, pos: ``[tokens]`` int64: row ``r`` is position ``pos[r]`` of sequence ``seq[r]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return self.seq.numel()

    def head(self, n: int) -> TokenTable:
        """The table of the first ``n`` rows (the sequences they need, no more)."""
        seq, pos = self.seq[:n], self.pos[:n]
        n_seq = int(seq.max()) + 1 if seq.numel() else 0
        return TokenTable(self.input_ids[:n_seq], self.attention_mask[:n_seq], self.source[:n_seq], seq, pos)

    def rows(self, keep: torch.Tensor) -> TokenTable:
        """The table of the rows where ``keep [tokens]`` (bool, CPU) is True; the sequences stay as they are."""
        return TokenTable(self.input_ids, self.attention_mask, self.source, self.seq[keep], self.pos[keep])

    def row_index(self) -> torch.Tensor:
        """``[n_seq, seq]`` int64: the activation row read at each position, -1 where none (BOS, padding, outliers)."""
        index = torch.full(self.input_ids.shape, -1, dtype=torch.long)
        index[self.seq, self.pos] = torch.arange(len(self))
        return index

    def row_source(self) -> torch.Tensor:
        """``[tokens]`` int8: the source of each row's sequence."""
        return self.source[self.seq]

    @staticmethod
    def concat(tables: Sequence[TokenTable], pad_token_id: int = 0) -> TokenTable:
        """The tables of consecutive activation chunks, as one; sequences right-padded to a common width
        (with mask 0, so the stored positions keep pointing at the same tokens)."""
        width = max(t.input_ids.shape[1] for t in tables)

        def widen(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        offsets = torch.tensor([0, *(t.input_ids.shape[0] for t in tables)]).cumsum(0)
        return TokenTable(
            torch.cat([widen(t.input_ids, pad_token_id) for t in tables]),
            torch.cat([widen(t.attention_mask, 0) for t in tables]),
            torch.cat([t.source for t in tables]),
            torch.cat([t.seq + offset for t, offset in zip(tables, offsets.tolist())]),
            torch.cat([t.pos for t in tables]),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its fields as contiguous CPU tensors (for ``safetensors``); `from_tensors` reads them back."""
        return {name: getattr(self, name).contiguous().cpu() for name in self.__dataclass_fields__}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TokenTable:
        return cls(**{name: tensors[name] for name in cls.__dataclass_fields__})


def with_tokens(acts: torch.Tensor, tokens: TokenTable) -> torch.Tensor:
    """``acts`` itself, carrying ``tokens`` (read back by `token_table`): a held-out set passes through code
    that only knows tensors (the end-of-training callback) and still reaches the dashboard with its token ids."""
    if len(tokens) != len(acts):
        raise ValueError(f"a token table of {len(tokens)} rows cannot describe {len(acts)} activation rows")
    setattr(acts, TOKEN_TABLE_ATTR, tokens)
    return acts


def token_table(acts: torch.Tensor) -> TokenTable | None:
    """The `TokenTable` attached to ``acts`` by `with_tokens`, or None (lost by any operation on the tensor)."""
    tokens = getattr(acts, TOKEN_TABLE_ATTR, None)
    return tokens if tokens is not None and len(tokens) == len(acts) else None


def paired_activations(
    pair: PairLike,
    texts: Sequence[str],
    seq_len: int,
    padding_side: PaddingSide = "right",
    outlier_factor: float | None = None,
) -> torch.Tensor:
    """Residuals of both models at ``pair.layer`` for ``texts``: float32 ``[tokens, 2, d_model]`` (0 base, 1 chat).

    Tokens of all texts are concatenated in order; the tensor lives on the models' device.
    """
    return paired_activations_with_tokens(pair, texts, seq_len, padding_side, outlier_factor)[0]


def paired_activations_with_tokens(
    pair: PairLike,
    texts: Sequence[str],
    seq_len: int,
    padding_side: PaddingSide = "right",
    outlier_factor: float | None = None,
    sources: Sequence[str] | None = None,
) -> tuple[torch.Tensor, TokenTable]:
    """`paired_activations` and the `TokenTable` of its rows (on the CPU); ``sources``: ``"web"`` / ``"chat"``
    per text (unknown when None)."""
    device = next(pair.base.parameters()).device
    batch = tokenize(pair.tokenizer, texts, seq_len, padding_side).to(device)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": position_ids(batch["attention_mask"]),
    }
    with torch.inference_mode():
        residuals = [residual_at(model, pair.layer, **inputs) for model in (pair.base, pair.chat)]
    # Stacked outside inference mode: the result is a normal tensor, which autograd may save downstream.
    acts = torch.stack(residuals, dim=2)  # [batch, seq, 2, d_model]
    keep = token_mask(batch["input_ids"], batch["attention_mask"], pair.tokenizer.bos_token_id)
    acts = acts[keep].float()
    seq, pos = keep.nonzero(as_tuple=True)  # row-major: the order of acts' rows
    if outlier_factor is not None and len(acts):
        inliers = outlier_mask(acts, outlier_factor)
        acts, seq, pos = acts[inliers], seq[inliers], pos[inliers]
    codes = [SOURCE_CODES.get(name, -1) for name in sources] if sources is not None else [-1] * len(texts)
    tokens = TokenTable(
        batch["input_ids"].cpu(), batch["attention_mask"].cpu(), torch.tensor(codes, dtype=torch.int8),
        seq.cpu(), pos.cpu(),
    )
    return acts, tokens
