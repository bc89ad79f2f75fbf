import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosscoder_pl.models.embedded import EMBEDDED_LAYER, ensure_embedded_pair
from crosscoder_pl.models.pair import load_model_pair

CHAT = [
    {"role": "user", "content": "What is a crosscoder?"},
    {"role": "assistant", "content": "A sparse dictionary shared by two models."},
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    # A directory left by an interrupted build must be rebuilt, never reused.
    (root / "models" / "embedded-tiny" / "base").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSCODER_PL_CACHE", str(root))
        ensure_embedded_pair("tiny")
        yield root


@pytest.fixture(scope="module")
def pair_dirs(cache):
    return cache / "models" / "embedded-tiny" / "base", cache / "models" / "embedded-tiny" / "chat"


def test_pair_is_built_once_into_the_cache(cache, pair_dirs):
    report = cache / "models" / "embedded-tiny" / "build_report.json"
    built_at = report.stat().st_mtime_ns
    assert ensure_embedded_pair("tiny", cache) == pair_dirs
    assert report.stat().st_mtime_ns == built_at
    assert not list((cache / "models").glob(".*")), "a temporary build directory was left behind"


def test_build_report_has_finite_losses(cache):
    report = json.loads((cache / "models" / "embedded-tiny" / "build_report.json").read_text())
    for key in ("base_web_loss", "unigram_web_loss", "base_chat_loss", "chat_chat_loss"):
        assert math.isfinite(report[key]) and report[key] > 0, key
    assert report["web_heldout_tokens"] > 0 and report["chat_heldout_tokens"] > 0
    assert report["layer"] == EMBEDDED_LAYER


def test_chat_template_renders_gemma_turns_with_one_bos(pair_dirs):
    tokenizer = AutoTokenizer.from_pretrained(pair_dirs[1])
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nWhat is a crosscoder?<end_of_turn>\n"
        "<start_of_turn>model\nA sparse dictionary shared by two models.<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"] == ids
    assert tokenizer("plain text")["input_ids"][0] == tokenizer.bos_token_id


def test_chat_labels_cover_the_whole_chat_or_the_model_turns(pair_dirs):
    from crosscoder_pl.models.embedded import IGNORE, encode_chats

    tokenizer = AutoTokenizer.from_pretrained(pair_dirs[1])
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reply = tokenizer("A sparse dictionary shared by two models.<end_of_turn>", add_special_tokens=False)["input_ids"]
    seq_len = len(ids) + 3  # three pads at the end

    inputs, whole = encode_chats(tokenizer, [CHAT], seq_len)
    assert inputs[0, : len(ids)].tolist() == ids
    assert inputs[0, len(ids) :].tolist() == [tokenizer.pad_token_id] * 3
    assert whole[0].tolist() == ids + [IGNORE] * 3  # every real token (tags, roles, both turns), no pad

    _, turns = encode_chats(tokenizer, [CHAT], seq_len, labels="model_turns")
    labelled = [i for i in turns[0].tolist() if i != IGNORE]
    assert labelled == reply  # the model's content and its closing tag, nothing of the user turn
    start = ids.index(reply[0])
    assert turns[0, start : start + len(reply)].tolist() == reply
    with pytest.raises(ValueError, match="labels='assistant'"):
        encode_chats(tokenizer, [CHAT], seq_len, labels="assistant")


def test_models_load_with_auto_classes_and_differ(pair_dirs):
    base, chat = (AutoModelForCausalLM.from_pretrained(path) for path in pair_dirs)
    assert type(base).__name__ == "Gemma2ForCausalLM"
    base_vocab, chat_vocab = (AutoTokenizer.from_pretrained(path).get_vocab() for path in pair_dirs)
    assert base_vocab == chat_vocab
    chat_weights = chat.state_dict()
    assert any(not torch.equal(weight, chat_weights[name]) for name, weight in base.state_dict().items())


def test_embedded_names_load_a_frozen_pair(cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSCODER_PL_CACHE", str(cache))
        pair = load_model_pair("embedded-tiny:base", "embedded-tiny:chat", layer=EMBEDDED_LAYER)
    assert pair.d_model == pair.base.config.hidden_size
    assert pair.tokenizer.chat_template is not None
    for model in (pair.base, pair.chat):
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_a_pair_built_with_another_recipe_is_rebuilt(cache, pair_dirs):
    report_file = cache / "models" / "embedded-tiny" / "build_report.json"
    report = json.loads(report_file.read_text())
    report["spec"]["chat_steps"] += 1  # as left by an older version of the builder
    report_file.write_text(json.dumps(report))
    assert ensure_embedded_pair("tiny", cache) == pair_dirs
    rebuilt = json.loads(report_file.read_text())
    assert rebuilt["spec"]["chat_steps"] == report["spec"]["chat_steps"] - 1


def test_building_a_pair_leaves_the_global_random_state_alone(tmp_path):
    from crosscoder_pl.data.sharegpt import build_embedded_corpus
    from crosscoder_pl.models.embedded import build_embedded_pair

    corpus = build_embedded_corpus(tmp_path / "corpus", max_conversations=400)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_embedded_pair("tiny", tmp_path / "pair", corpus)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("softcapping", [True, False])
def test_soft_capping_is_the_specs_choice(pair_dirs, softcapping):
    """The default pair drops Gemma-2's tanh caps (a quarter of a build step); its logits are the head's
    output itself, a capped model's are 30 * tanh(head / 30)."""
    from dataclasses import replace

    from transformers import Gemma2ForCausalLM

    from crosscoder_pl.models.embedded import SIZES, model_config

    assert SIZES["default"].softcapping is False and SIZES["tiny"].softcapping is True
    config = model_config(AutoTokenizer.from_pretrained(pair_dirs[0]), replace(SIZES["tiny"], softcapping=softcapping))
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == ((50.0, 30.0) if softcapping else (None, None))
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # large head weights, so that the cap bends the logits visibly
        model.lm_head.weight.mul_(300.0)
        ids = torch.tensor([[2, 10, 11, 12, 13]])
        head = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        logits = model(input_ids=ids).logits
    assert head.abs().max() > 30
    expected = 30.0 * torch.tanh(head / 30.0) if softcapping else head
    torch.testing.assert_close(logits, expected)


def test_a_pair_another_process_finished_first_is_kept_unless_its_recipe_differs(pair_dirs, tmp_path):
    from crosscoder_pl.models.embedded import _save_atomically

    model, tokenizer = AutoModelForCausalLM.from_pretrained(pair_dirs[0]), AutoTokenizer.from_pretrained(pair_dirs[0])
    report = json.loads((pair_dirs[0].parent / "build_report.json").read_text())
    out = tmp_path / "embedded-tiny"
    (out / "base").mkdir(parents=True)
    (out / "base" / "theirs").write_text("built by the other process")  # it may be loading this pair right now
    (out / "build_report.json").write_text(json.dumps(report))

    _save_atomically(out, {"base": model}, tokenizer, report)
    assert (out / "base" / "theirs").exists() and not (out / "base" / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "the unused build was left behind"

    other = {**report, "spec": {**report["spec"], "chat_steps": report["spec"]["chat_steps"] + 1}}
    _save_atomically(out, {"base": model}, tokenizer, other)
    assert not (out / "base" / "theirs").exists() and (out / "base" / "model.safetensors").exists()
    assert json.loads((out / "build_report.json").read_text())["spec"] == other["spec"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
