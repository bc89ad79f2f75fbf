"""Builders shared by the data tests (no tests here): a word-level tokenizer with a Gemma-style chat
template, a pair of tiny random Gemma-2 models, and JSONL corpora in the embedded corpus layout."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

WORDS = "the a cat dog sat on mat hello world ran far big small red blue green tree house sun moon".split()
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's id order
ROLE_WORDS = ["user", "model"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + ROLE_WORDS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"], chat_template=CHAT_TEMPLATE,
    )


@dataclass
class TinyPair:
    """Duck-typed stand-in for `crosscoder_pl.models.pair.ModelPair`."""

    base: Gemma2ForCausalLM
    chat: Gemma2ForCausalLM
    tokenizer: PreTrainedTokenizerFast
    layer: int
    base_id: str = "tiny-base"
    chat_id: str = "tiny-chat"

    @property
    def d_model(self) -> int:
        return self.base.config.hidden_size


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int, hidden: int = 32, layers: int = 3) -> Gemma2ForCausalLM:
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,  # above the default, so that attending to padding would change the output
    )
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).eval()


def tiny_pair(layer: int = 1) -> TinyPair:
    """Base and chat: the same config, different random weights."""
    tokenizer = tiny_tokenizer()
    return TinyPair(tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1), tokenizer, layer)


def sentence(rng: random.Random, low: int = 3, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def conversation(rng: random.Random, turns: int = 2) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": sentence(rng)} for i in range(turns)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_corpus(root: Path, n_web: int, n_chat: int, n_shards: int = 1, seed: int = 0) -> None:
    """``root/{web,chat}/shard-XXXXX.jsonl`` in the embedded corpus format, rows dealt round-robin to shards."""
    rng = random.Random(seed)
    web = [{"text": f"doc{i} " + sentence(rng)} for i in range(n_web)]
    chat = [{"conversation": conversation(rng, turns=2 + i % 3)} for i in range(n_chat)]
    for name, rows in (("web", web), ("chat", chat)):
        for shard in range(n_shards):
            write_jsonl(root / name / f"shard-{shard:05d}.jsonl", rows[shard::n_shards])
