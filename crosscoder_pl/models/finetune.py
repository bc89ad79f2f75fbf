"""Next-token training shared by the pairs this project builds itself (`embedded`, `chat_tune`).

Gemma's chat template, chats rendered into labelled rows, documents packed into rows, the training loop, the
held-out loss, and the atomic publication of a built pair directory.

Tokenizing (BOS once): the chat template starts with ``<bos>``, so a rendered chat is tokenized with
``add_special_tokens=False``; plain text gets its ``<bos>`` from the tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from crosscoder_pl.files import dir_mode, replace_dir

log = logging.getLogger(__name__)

# Gemma-2's own template: roles must alternate starting with "user"; "assistant" is rendered as "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# A model turn's content and closing tag; the last turn may be cut off by truncation.
_MODEL_TURN = re.compile(r"<start_of_turn>model\n(.*?(?:<end_of_turn>|\Z))", re.DOTALL)
# Characters kept per token when cutting a chat before tokenizing: long chats would otherwise be tokenized
# whole just to keep their first tokens. No byte-level BPE token averages this many characters.
_MAX_CHARS_PER_TOKEN = 32
IGNORE = -100  # label of tokens that carry no loss (transformers' convention)

Rows = tuple[torch.Tensor, torch.Tensor]
"""``(input_ids, labels)``, both ``[n, seq_len]``; labels are IGNORE where a token carries no loss."""
LossFn = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(model, input_ids, labels)``: the mean next-token loss of a batch, both ``[batch, seq_len]``."""


def causal_lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' own: labels shifted inside, mean over the labelled targets."""
    return model(input_ids=input_ids, labels=labels).loss


@dataclass(frozen=True)
class TrainStats:
    """What one `train` call did: optimiser steps, labelled target tokens seen, wall-clock seconds."""

    steps: int
    tokens: int
    seconds: float
    step_seconds: tuple[float, ...]  # wall-clock time of each step, the first one's warm-up included
    last_loss: float


def pack_documents(tokenizer: PreTrainedTokenizerBase, docs: list[str], seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` token ids: each document as ``<bos> ... <eos>``, concatenated and cut in rows."""
    ids = [token for doc in tokenizer(docs, verbose=False)["input_ids"] for token in doc + [tokenizer.eos_token_id]]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(docs)} documents give {len(ids)} tokens, fewer than one row of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def encode_chats(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], seq_len: int, labels: str = "whole_chat",
    drop_unlabelled: bool = True,
) -> Rows:
    """``(input_ids, labels)``, both ``[n, seq_len]``: chats rendered with the template, cut to ``seq_len``
    and right-padded. Labels are the ids of every real token (``labels="whole_chat"``: tags, roles, both
    turns) or of the model's turns only (``"model_turns"``: content and ``<end_of_turn>``), IGNORE elsewhere.

    Chats whose first ``seq_len`` tokens hold no labelled token are dropped unless ``drop_unlabelled`` is False
    (then row ``i`` is chat ``i`` under either labelling).
    """
    if labels not in ("whole_chat", "model_turns"):
        raise ValueError(f"labels={labels!r} is not 'whole_chat' or 'model_turns'")
    max_chars = seq_len * _MAX_CHARS_PER_TOKEN
    texts = [tokenizer.apply_chat_template(conv, tokenize=False)[:max_chars] for conv in conversations]
    # padding_side: the training loop relies on right padding, whatever the tokenizer's own side (Gemma-3: left).
    enc = tokenizer(
        texts, add_special_tokens=False, truncation=True, max_length=seq_len, padding="max_length",
        padding_side="right", return_offsets_mapping=True, return_tensors="pt",
    )
    if labels == "whole_chat":
        targets = torch.where(enc["attention_mask"].bool(), enc["input_ids"], IGNORE)
    else:
        targets = torch.full_like(enc["input_ids"], IGNORE)
        for row, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"])):
            for match in _MODEL_TURN.finditer(text):
                in_turn = (offsets[:, 0] >= match.start(1)) & (offsets[:, 1] <= match.end(1)) & (offsets[:, 1] > 0)
                targets[row, in_turn] = enc["input_ids"][row, in_turn]
    if not drop_unlabelled:
        return enc["input_ids"], targets
    keep = (targets != IGNORE).any(dim=1)
    return enc["input_ids"][keep], targets[keep]


def train(
    model: PreTrainedModel, data: Rows, steps: int, *, lr: float, batch_size: int, seed: int, desc: str,
    autocast: torch.dtype | None = None, loss_fn: LossFn = causal_lm_loss,
) -> TrainStats:
    """AdamW with warm-up and cosine decay over the parameters that require grad, on shuffled batches of
    ``batch_size`` rows of ``data``, epoch after epoch. ``autocast``: CPU autocast dtype of the forward and
    backward (bfloat16 halves a matmul's time where the CPU has bf16 instructions); None: the weights' own.
    ``loss_fn``: how a batch's loss is computed (default: the model's own, from its full logits)."""
    inputs, labels = data
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    generator = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / len(inputs))
    order = torch.cat([torch.randperm(len(inputs), generator=generator) for _ in range(epochs)])
    model.train()
    tokens, loss, times = 0, torch.tensor(float("nan")), []
    bar = tqdm(order[: steps * batch_size].view(steps, batch_size), desc=desc)
    for batch in bar:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            # Right padding needs no attention mask: under the causal mask no real token sees a pad.
            loss = loss_fn(model, inputs[batch], labels[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        tokens += int((labels[batch][:, 1:] != IGNORE).sum())
        times.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", tokens=tokens)
    model.eval()
    return TrainStats(steps, tokens, round(sum(times), 1), tuple(round(t, 2) for t in times), loss.item())


def mean_loss(model: PreTrainedModel, data: Rows, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the labelled targets of ``data = (input_ids, labels)``."""
    return mean_losses(model, data[0], {"loss": data[1]}, batch_size)["loss"]


@torch.no_grad()
def mean_losses(
    model: PreTrainedModel, inputs: torch.Tensor, labels: dict[str, torch.Tensor], batch_size: int = 16
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) of ``inputs [n, seq_len]`` under each labelling ``[n, seq_len]`` of
    ``labels``, from one forward pass (a 262k-token head makes the forward the cost)."""
    totals, counts = dict.fromkeys(labels, 0.0), dict.fromkeys(labels, 0)
    for start in range(0, len(inputs), batch_size):
        logits = model(input_ids=inputs[start : start + batch_size]).logits[:, :-1].flatten(0, 1)
        for name, rows in labels.items():
            targets = rows[start : start + batch_size, 1:].flatten()
            totals[name] += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum").item()
            counts[name] += int((targets != IGNORE).sum())
    return {name: totals[name] / counts[name] if counts[name] else float("nan") for name in labels}


def new_build_dir(out: Path) -> Path:
    """An empty hidden sibling of ``out`` to build into, shared as the umask says (mkdtemp makes it private)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(dir_mode())
    return tmp


def publish_build(tmp: Path, out: Path, report: dict, key: str) -> None:
    """Move the finished build ``tmp`` (its ``build_report.json`` written from ``report``) to ``out``.

    When ``out`` exists with the same ``report[key]`` (the same seeded recipe, finished first by another process
    that may be loading it now) it is kept and ``tmp`` deleted; otherwise it is replaced whole, never half-written.
    """
    (tmp / "build_report.json").write_text(json.dumps(report, indent=2))
    try:
        os.rename(tmp, out)
        return
    except OSError:  # `out` exists: built by another process meanwhile, or rebuilt on purpose (--force, new recipe)
        pass
    theirs = out / "build_report.json"
    if theirs.exists() and json.loads(theirs.read_text()).get(key) == report[key]:
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("another process built %s with the same recipe first; keeping its pair", out)
        return
    replace_dir(tmp, out)
