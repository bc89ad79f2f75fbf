"""Model pairs: checked from configs and tokenizers before any weights load, then loaded."""

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    PreTrainedTokenizerFast,
)

from crosscoder_pl.models import pair as pair_module
from crosscoder_pl.models.pair import (
    check_pair,
    load_model_pair,
    resolve_device,
    resolve_dtype,
)

WORDS = ["<pad>", "<eos>", "<bos>", "the", "cat", "sat"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _tokenizer(words: list[str], template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>")
    tokenizer.chat_template = template
    return tokenizer


def _config(hidden_size: int = 16, n_layers: int = 2, positions: int = 64) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=len(WORDS), hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=n_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=positions,
    )


def _save(directory, config: Gemma2Config, tokenizer: PreTrainedTokenizerFast) -> str:
    """A random-init model and its tokenizer, as ``save_pretrained`` writes them (no network)."""
    Gemma2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def no_weights(monkeypatch) -> None:
    """Any attempt to load weights fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the pair was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_matching_pair_passes():
    check_pair(_config(), _config(), _tokenizer(WORDS), _tokenizer(WORDS), layer=1, seq_len=64)


def test_different_vocabularies_fail_naming_sizes_and_first_difference():
    other = WORDS[:3] + ["dog", "sat", "down"]
    with pytest.raises(ValueError, match=r"base has 6 tokens, chat has 7.*id 3: base 'the' vs chat 'dog'"):
        check_pair(_config(), _config(), _tokenizer(WORDS), _tokenizer(other + ["extra"]), layer=1)


@pytest.mark.parametrize(
    ("base", "chat", "chat_tokenizer", "seq_len", "message"),
    [
        (_config(16), _config(32), _tokenizer(WORDS), 32, r"hidden size 16 \(base\) vs 32 \(chat\)"),
        (_config(), _config(n_layers=4), _tokenizer(WORDS), 32,
         r"layer=3 is out of range for the base model with 2 decoder layers \(valid: 0..1\)"),
        (_config(positions=64), _config(positions=128), _tokenizer(WORDS), 100,
         r"data.seq_len=100 is longer than the base model's max_position_embeddings=64"),
        (_config(), _config(), _tokenizer(WORDS, template=None), 32, r"no chat template: set model_pair.chat_template"),
    ],
    ids=["hidden_size", "layer", "seq_len", "chat_template"],
)
def test_each_mismatch_fails_before_any_weights_load(tmp_path, no_weights, base, chat, chat_tokenizer, seq_len, message):
    base_dir = _save(tmp_path / "base", base, _tokenizer(WORDS))
    chat_dir = _save(tmp_path / "chat", chat, chat_tokenizer)
    layer = 3 if "layer" in message else 1
    with pytest.raises(ValueError, match=message) as error:
        load_model_pair(base_dir, chat_dir, layer=layer, seq_len=seq_len)
    assert str(error.value).count("; ") == 0  # exactly this one problem, in one message


def test_every_mismatch_is_named_in_one_message(tmp_path, no_weights):
    base_dir = _save(tmp_path / "base", _config(16, positions=64), _tokenizer(WORDS))
    chat_dir = _save(tmp_path / "chat", _config(32, n_layers=4), _tokenizer(WORDS, template=None))
    with pytest.raises(ValueError) as error:
        load_model_pair(base_dir, chat_dir, layer=2, seq_len=128)
    message = str(error.value)
    for part in ("hidden size 16 (base) vs 32 (chat)", "layer=2 is out of range for the base model",
                 "seq_len=128 is longer than the base model's max_position_embeddings=64", "no chat template"):
        assert part in message
    assert "chat model with" not in message  # block 2 exists in the 4-layer chat model


def test_chat_template_from_the_config_completes_the_pair(tmp_path):
    base_dir = _save(tmp_path / "base", _config(), _tokenizer(WORDS))
    chat_dir = _save(tmp_path / "chat", _config(), _tokenizer(WORDS, template=None))
    template_file = tmp_path / "chat.jinja"
    template_file.write_text(TEMPLATE)
    pair = load_model_pair(base_dir, chat_dir, layer=1, chat_template=str(template_file))
    assert pair.tokenizer.chat_template == TEMPLATE
    assert pair.tokenizer.apply_chat_template([{"role": "user", "content": "cat"}], tokenize=False) == "user: cat\n"
    assert next(pair.base.parameters()).dtype == torch.float32 and not next(pair.chat.parameters()).requires_grad


def test_auto_dtype_and_device_follow_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (resolve_dtype("auto"), resolve_device("auto")) == ("float32", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert (resolve_dtype("auto"), resolve_device("auto")) == ("bfloat16", "cuda")
    assert resolve_dtype("float16") == "float16" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"model_pair.dtype='fp8'"):
        resolve_dtype("fp8")


def test_gguf_file_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(pair_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"model.gguf.*pip install gguf accelerate"):
        load_model_pair(str(gguf), str(gguf), layer=0)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model_pair(str(tmp_path / "missing.gguf"), str(gguf), layer=0)


def test_unknown_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"'nobody-xyz/no-such-model'.*hf auth login.*HF_TOKEN"):
        load_model_pair("nobody-xyz/no-such-model", "nobody-xyz/no-such-model-it", layer=0)


def test_unreachable_hub_fails_on_one_request(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(RuntimeError, match=r"'nobody-xyz/no-such-model'.*ConnectionError.*unreachable"):
        load_model_pair("nobody-xyz/no-such-model", "nobody-xyz/no-such-model-it", layer=0)
    assert calls == ["nobody-xyz/no-such-model"]
