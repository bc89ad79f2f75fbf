"""Which positions of a tokenised chat are chat-template tokens and which are the assistant's reply.

A chat rendered with Gemma's template (`crosscoder_pl.models.finetune.CHAT_TEMPLATE`, the one the project's
pairs use) reads, after ``<bos>``::

    <start_of_turn> user \\n  ...user text...  <end_of_turn> \\n
    <start_of_turn> model \\n ...reply text... <end_of_turn> \\n

Template tokens: the turn tags, the role names and the newline after each of them (Minder et al.'s "control
tokens": ``<start_of_turn>{role}\\n`` and ``<end_of_turn>\\n``). Reply tokens: the text of a ``model`` turn, between
its header and its ``<end_of_turn>``, template tokens excluded. Everything is read from token ids and the ids of
the markers as the tokenizer encodes them (`chat_markers`), so it needs no text offsets and works on any batch
``[..., seq]`` at once: the loops below run over the few tokens of a marker, never over positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
ROLES = ("user", "model")  # Gemma renders the assistant's role as "model"
REPLY_ROLE = "model"


@dataclass(frozen=True)
class ChatMarkers:
    """Token ids of the chat template's markers.

    Attributes:
        start_of_turn, end_of_turn: the ids of the two turn tags (single special tokens).
        headers: per role, the ids of ``<start_of_turn>{role}\\n`` (tag, role name's tokens, newline).
        footer: the ids of ``<end_of_turn>\\n``.
        reply_role: the role whose turns are the assistant's replies.
    """

    start_of_turn: int
    end_of_turn: int
    headers: Mapping[str, tuple[int, ...]]
    footer: tuple[int, ...]
    reply_role: str = REPLY_ROLE

    def __post_init__(self) -> None:
        if self.reply_role not in self.headers:
            raise ValueError(f"reply_role={self.reply_role!r} has no header among {sorted(self.headers)}")
        if any(h[:1] != (self.start_of_turn,) for h in self.headers.values()) or self.footer[:1] != (self.end_of_turn,):
            raise ValueError(f"headers {dict(self.headers)} must start with {self.start_of_turn} and the footer "
                             f"{self.footer} with {self.end_of_turn}")


def chat_markers(
    tokenizer: Any,
    start: str = START_OF_TURN,
    end: str = END_OF_TURN,
    roles: Sequence[str] = ROLES,
    reply_role: str = REPLY_ROLE,
) -> ChatMarkers:
    """The markers as ``tokenizer`` encodes them; ValueError when a tag is not one token of its vocabulary
    (a tokenizer without this chat template: nothing could be found)."""

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    tags = {tag: ids(tag) for tag in (start, end)}
    if any(len(tag_ids) != 1 for tag_ids in tags.values()):
        raise ValueError(f"the tokenizer does not encode {start!r} and {end!r} as single tokens ({tags}): "
                         "its chat template is not Gemma's")
    return ChatMarkers(
        start_of_turn=tags[start][0],
        end_of_turn=tags[end][0],
        headers={role: ids(f"{start}{role}\n") for role in roles},
        footer=ids(f"{end}\n"),
        reply_role=reply_role,
    )


def template_mask(
    input_ids: torch.Tensor, markers: ChatMarkers, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[..., seq]`` bool: True at the template's tokens, turn tags, role names and the newline after them.

    A header or footer cut off by truncation (at the end of the valid tokens) still marks what of it is there;
    padding (where ``attention_mask`` is 0) is never a template token.
    """
    valid = _valid(input_ids, attention_mask)
    mask = (input_ids == markers.start_of_turn) | (input_ids == markers.end_of_turn)
    for pattern in (*markers.headers.values(), markers.footer):
        mask |= _spread(_starts(input_ids, pattern, valid), len(pattern))
    return mask & valid


def reply_mask(
    input_ids: torch.Tensor, markers: ChatMarkers, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[..., seq]`` bool: True at the tokens of the assistant's replies: after a ``reply_role`` header, up to the
    next turn tag (its ``<end_of_turn>``, or the end of the sequence when truncated), template tokens excluded."""
    valid = _valid(input_ids, attention_mask)
    header = markers.headers[markers.reply_role]
    # A reply opens at its header's last token and closes at the next turn tag; per position, compare where the
    # latest opening and the latest closing are (cummax of their indices: no loop over positions).
    opens = _shift_right(_starts(input_ids, header, valid), len(header) - 1)
    closes = (input_ids == markers.start_of_turn) | (input_ids == markers.end_of_turn)
    inside = _last_index(opens) > _last_index(closes)
    return inside & ~template_mask(input_ids, markers, attention_mask) & valid


def first_of_runs(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., seq]`` bool: the first ``k`` positions of each run of consecutive True positions of ``mask``
    (e.g. of `reply_mask`: the first ``k`` tokens of each reply)."""
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    mask = mask.bool()
    run_start = mask & ~_shift_right(mask, 1)
    index = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return mask & (index - _last_index(run_start) < k)


def _starts(input_ids: torch.Tensor, pattern: Sequence[int], valid: torch.Tensor) -> torch.Tensor:
    """``[..., seq]`` bool: True where ``pattern`` starts at a valid token. Tokens past the last valid one (right
    padding, the end of the tensor) match anything, so that a marker cut off by truncation is still found."""
    seq = input_ids.shape[-1]
    hit = valid.clone()
    for offset, token in enumerate(pattern[:seq]):
        ahead = input_ids[..., offset:] == token
        hit[..., : seq - offset] &= ahead | ~valid[..., offset:]  # left padding precedes the start: never ahead
    return hit


def _spread(starts: torch.Tensor, length: int) -> torch.Tensor:
    """``[..., seq]`` bool: the ``length`` positions from each start."""
    covered = torch.zeros_like(starts)
    for offset in range(length):
        covered |= _shift_right(starts, offset)
    return covered


def _shift_right(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """``mask`` moved ``offset`` positions later along the last axis, False shifted in."""
    if offset == 0:
        return mask
    shifted = torch.zeros_like(mask)
    shifted[..., offset:] = mask[..., :-offset]
    return shifted


def _valid(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def _last_index(events: torch.Tensor) -> torch.Tensor:
    """``[..., seq]`` long: per position, the index of the latest event at or before it, -1 before the first."""
    index = torch.arange(events.shape[-1], device=events.device).expand_as(events)
    return torch.where(events, index, -1).cummax(dim=-1).values
