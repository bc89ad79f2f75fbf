"""Template and reply positions of tokenised chats, on hand-built sequences with known answers."""

from __future__ import annotations

import re

import pytest
import torch

from crosscoder_pl.data.chat_positions import (
    ChatMarkers,
    chat_markers,
    first_of_runs,
    reply_mask,
    template_mask,
)

# Hand-made ids: the role "model" is two tokens (a BPE may split it), the newline also occurs in text.
BOS, SOT, EOT, NL, USER, MO, DEL, PAD = 2, 10, 11, 5, 20, 21, 22, 0
MARKERS = ChatMarkers(SOT, EOT, {"user": (SOT, USER, NL), "model": (SOT, MO, DEL, NL)}, (EOT, NL))
T, R, U, N = "T", "R", "u", "-"  # expected: template, reply, other (user text, BOS), padding

#           position: 0    1    2     3   4   5   6    7   8    9    10  11   12  13  14  15  16   17  18   19  20
CHAT = [BOS, SOT, USER, NL, 30, NL, 31, EOT, NL, SOT, MO, DEL, NL, 40, NL, 41, 42, EOT, NL, SOT, MO]
EXPECTED = [U, T, T, T, U, U, U, T, T, T, T, T, T, R, R, R, R, T, T, T, T]


def labels(ids: list[int], mask: list[int] | None = None) -> list[str]:
    ids_t = torch.tensor([ids])
    attention = None if mask is None else torch.tensor([mask])
    template = template_mask(ids_t, MARKERS, attention)[0].tolist()
    reply = reply_mask(ids_t, MARKERS, attention)[0].tolist()
    assert not any(t and r for t, r in zip(template, reply)), "a position is both template and reply"
    valid = [True] * len(ids) if mask is None else [bool(m) for m in mask]
    return [N if not v else T if t else R if r else U for v, t, r in zip(valid, template, reply)]


def test_known_chat() -> None:
    """Tags, role names (two tokens for "model") and their newlines are template; a newline inside the user's or
    the model's text is not; the reply is the model turn's text; a header cut off at the end is still template
    (its tags and what of the role fits)."""
    assert labels(CHAT) == EXPECTED


def test_a_truncated_reply_runs_to_the_end() -> None:
    ids = CHAT[:16]  # cut inside the reply: no <end_of_turn>
    assert labels(ids) == EXPECTED[:16]
    assert labels(ids)[-3:] == [R, R, R]


def test_padding_left_and_right_and_batched_rows() -> None:
    """Rows of a batch are independent; padding is neither template nor reply (even a pad id equal to a marker)."""
    n = len(CHAT)
    left = [PAD] * 3 + CHAT[: n - 3]
    right = CHAT[: n - 4] + [SOT] * 4  # the padding holds the tag id: the mask decides
    ids = torch.tensor([left, right, CHAT])
    mask = torch.tensor([[0] * 3 + [1] * (n - 3), [1] * (n - 4) + [0] * 4, [1] * n])
    template, reply = template_mask(ids, MARKERS, mask), reply_mask(ids, MARKERS, mask)
    assert template[2].tolist() == [e == T for e in EXPECTED]
    assert template[0, 3:].tolist() == [e == T for e in EXPECTED[: n - 3]] and not template[0, :3].any()
    assert reply[0, 3:].tolist() == [e == R for e in EXPECTED[: n - 3]]
    assert template[1, : n - 4].tolist() == [e == T for e in EXPECTED[: n - 4]] and not template[1, n - 4:].any()
    assert reply[1].tolist() == [e == R for e in EXPECTED[: n - 4]] + [False] * 4


def test_user_turns_and_other_roles_are_not_replies() -> None:
    """Only the reply role's turns are replies; a partial header (role missing) opens nothing."""
    ids = [BOS, SOT, USER, NL, 30, EOT, NL, SOT, MO, NL, 31, EOT]  # "model" without its second token
    assert labels(ids) == [U, T, T, T, U, T, T, T, U, U, U, T]


def test_first_of_runs() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert first_of_runs(mask, 2).int().tolist() == [[0, 1, 1, 0, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert torch.equal(first_of_runs(mask, 100), mask)
    first_reply = first_of_runs(reply_mask(torch.tensor(CHAT), MARKERS), 3)  # one unbatched sequence works too
    assert first_reply.nonzero().flatten().tolist() == [13, 14, 15]
    with pytest.raises(ValueError, match="at least 1"):
        first_of_runs(mask, 0)


class WordTokenizer:
    """Stands for a tokenizer: tags and newlines are tokens of their own, words are tokens."""

    def __init__(self, tags: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")) -> None:
        self.vocab: dict[str, int] = {}
        self.pattern = re.compile("|".join(map(re.escape, tags)) + r"|\n|[^\s<]+|<")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in self.pattern.findall(text)]


def test_markers_from_a_tokenizer() -> None:
    tokenizer = WordTokenizer()
    markers = chat_markers(tokenizer)
    sot, eot, nl = (tokenizer.vocab[t] for t in ("<start_of_turn>", "<end_of_turn>", "\n"))
    assert (markers.start_of_turn, markers.end_of_turn) == (sot, eot)
    assert markers.headers == {"user": (sot, tokenizer.vocab["user"], nl), "model": (sot, tokenizer.vocab["model"], nl)}
    assert markers.footer == (eot, nl)
    text = "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\nhello you<end_of_turn>\n"
    ids = torch.tensor(tokenizer.encode(text))
    assert reply_mask(ids, markers).nonzero().flatten().tolist() == [10, 11]
    assert template_mask(ids, markers).sum() == 10


def test_a_tokenizer_without_the_tags_is_refused() -> None:
    with pytest.raises(ValueError, match="single tokens"):
        chat_markers(WordTokenizer(tags=()))  # "<start_of_turn>" is then several tokens
    with pytest.raises(ValueError, match="reply_role"):
        ChatMarkers(SOT, EOT, {"user": (SOT, USER, NL)}, (EOT, NL))
