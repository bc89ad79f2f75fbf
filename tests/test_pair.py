
import huggingface_hub
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from crosscoder_pl.models.pair import check_pair, load_model_pair

WORDS = ["<pad>", "<eos>", "<bos>", "the", "cat", "sat"]


def _tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>")


def _config(hidden_size: int = 16, n_layers: int = 2) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=len(WORDS), hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=n_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )


def _model(hidden_size: int = 16, n_layers: int = 2) -> Gemma2ForCausalLM:
    model = Gemma2ForCausalLM(_config(hidden_size, n_layers))

    def no_forward(*args, **kwargs):
        raise AssertionError("check_pair must fail before any forward pass")

    model.forward = no_forward
    return model


def test_matching_pair_passes():
    check_pair(_model(), _model(), _tokenizer(WORDS), _tokenizer(WORDS), layer=1)


def test_different_hidden_sizes_fail_naming_both():
    with pytest.raises(ValueError, match="base model 16, chat model 32"):
        check_pair(_model(16), _model(32), _tokenizer(WORDS), _tokenizer(WORDS), layer=1)


def test_different_vocabularies_fail_naming_sizes_and_first_difference():
    other = WORDS[:3] + ["dog", "sat", "down"]
    with pytest.raises(ValueError, match=r"base has 6 tokens, chat has 7.*id 3: base 'the' vs chat 'dog'"):
        check_pair(_model(), _model(), _tokenizer(WORDS), _tokenizer(other + ["extra"]), layer=1)


@pytest.mark.parametrize(("base_layers", "chat_layers", "name"), [(2, 4, "base model"), (4, 2, "chat model")])
def test_layer_out_of_range_fails_naming_the_model(base_layers, chat_layers, name):
    with pytest.raises(ValueError, match=f"layer=3 is out of range for {name} with 2 decoder layers"):
        check_pair(_model(n_layers=base_layers), _model(n_layers=chat_layers), _tokenizer(WORDS), _tokenizer(WORDS), 3)


def test_local_directories_are_checked_before_use(tmp_path):
    for name, hidden_size in (("base", 16), ("chat", 32)):
        Gemma2ForCausalLM(_config(hidden_size)).save_pretrained(tmp_path / name)
        _tokenizer(WORDS).save_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match="base model 16, chat model 32"):
        load_model_pair(str(tmp_path / "base"), str(tmp_path / "chat"), layer=1)


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
