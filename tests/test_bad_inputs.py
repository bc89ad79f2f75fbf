"""A table of bad inputs (config, data files, model pair, cache, checkpoint, artifact, resume): each is a clear
error (its type, and a message naming the problem) or a counted skip, and nothing already written changes.

In-process calls of the start-up checks and readers, no training runs: the whole table takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from test_app import compose_train
from test_data_helpers import tiny_tokenizer, write_corpus, write_jsonl

from crosscoder_pl import CrossCoder
from crosscoder_pl.config import check_mix
from crosscoder_pl.data.cache import (
    CachedActivations,
    CacheError,
    read_meta,
    verify_cache,
    write_cache,
)
from crosscoder_pl.data.sources import (
    MalformedSourceError,
    SourceConfig,
    SourceUnavailableError,
    StreamStats,
    load_rows,
    mixed_rows,
    source_rows,
    texts,
)
from crosscoder_pl.training import (
    check_checkpoint,
    check_config,
    resume_checkpoint,
    save_run_config,
)

Action = Callable[[], object]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def cfg_in(tmp: Path, *overrides: str):
    cfg = compose_train("+experiment=tiny", f"hydra.runtime.output_dir={tmp / 'run'}", *overrides)
    with open_dict(cfg):
        cfg.output_dir = str(tmp / "run")
    return cfg


def config(*overrides: str) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        (tmp / "run").mkdir()
        (tmp / "run" / "notes.txt").write_text("an earlier file in the output dir")
        cfg = cfg_in(tmp, *overrides)
        return lambda: check_config(cfg)
    return setup


def hostile_pickle(tmp: Path) -> Action:
    path = tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "loops": Exploit()}, path)
    return lambda: check_checkpoint(str(path))


class Exploit:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


def checkpoint_file(content: bytes) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        path = tmp / "bad.ckpt"
        path.write_bytes(content)
        return lambda: check_checkpoint(str(path))
    return setup


def truncated_checkpoint(tmp: Path) -> Action:
    path = tmp / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:700])
    return lambda: check_checkpoint(str(path))


def resume_dir(*overrides: str, make_ckpt: bool = True) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        save_run_config(cfg_in(tmp))
        if make_ckpt:
            (tmp / "run" / "checkpoints").mkdir()
            (tmp / "run" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        cfg = cfg_in(tmp, f"resume={tmp / 'run'}", *overrides)
        return lambda: resume_checkpoint(cfg)
    return setup


def resume_with(override: Callable[[Path], str]) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        cfg = cfg_in(tmp, override(tmp))
        return lambda: resume_checkpoint(cfg)
    return setup


def cache(damage: Callable[[Path], None], read: str = "dataset") -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        rows = torch.arange(300, dtype=torch.float32)[:, None, None].expand(300, 2, 4).contiguous()
        out = write_cache(tmp / "acts", rows.split(50), 300, tokens_per_shard=100, val=rows[:10])
        damage(out)
        if read == "verify":
            return lambda: verify_cache(out)
        if read == "iterate":
            return lambda: list(CachedActivations(out, batch_size=50))
        return lambda: CachedActivations(out, batch_size=50)
    return setup


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))


def edit_meta(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        meta = json.loads((out / "meta.json").read_text())
        change(meta)
        (out / "meta.json").write_text(json.dumps(meta))
    return damage


def cache_over(make: Callable[[Path], None]) -> Callable[[Path], Action]:
    """Writing a cache where something that is not a cache already is."""
    def setup(tmp: Path) -> Action:
        make(tmp / "target")
        rows = torch.zeros(100, 2, 4)
        return lambda: write_cache(tmp / "target", [rows], 100)
    return setup


def source(path: str, field: str = "text", **kwargs) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        config = SourceConfig(path, field, **{k: v.format(tmp=tmp) for k, v in kwargs.items()})
        return lambda: load_rows(config)
    return setup


def truncated_jsonl(tmp: Path) -> Action:
    write_corpus(tmp / "corpus", n_web=40, n_chat=0)
    file = tmp / "corpus" / "web" / "shard-00000.jsonl"
    file.write_bytes(file.read_bytes()[:-15])  # cut off mid-record
    config = SourceConfig("json", "text", data_files=str(file))
    return lambda: list(texts(source_rows("web", config, tiny_tokenizer(), heldout_fraction=0), StreamStats()))


def artifact(damage: Callable[[Path], None]) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        out = tmp / "artifact"
        CrossCoder(4, 8, 2).save_pretrained(out)
        damage(out)
        return lambda: CrossCoder.from_pretrained(out)
    return setup


def model_pair(**fields) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        from crosscoder_pl.models.pair import load_model_pair

        return lambda: load_model_pair(**{k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in fields.items()})
    return setup


ERRORS: list[tuple[str, Callable[[Path], Action], type[BaseException], str]] = [
    # --- configuration: refused at start-up, each error names the key, the value and the fix
    ("max_steps 0", config("trainer.max_steps=0"), ValueError, r"trainer.max_steps=0 must be an integer >= 1"),
    ("max_steps negative", config("trainer.max_steps=-5"), ValueError, r"trainer.max_steps=-5"),
    ("metrics window 0", config("crosscoder.metrics_window_steps=0"), ValueError, r"crosscoder.metrics_window_steps=0 must be an integer >= 1"),
    ("negative k anneal", config("crosscoder.k_anneal_steps=-1"), ValueError, r"crosscoder.k_anneal_steps=-1 must be an integer >= 0"),
    ("val_tokens 0", config("data.val_tokens=0"), ValueError, r"data.val_tokens=0 must be an integer >= 1"),
    ("val_check_interval 0", config("trainer.val_check_interval=0"), ValueError, r"trainer.val_check_interval=0"),
    ("val_check_interval fraction", config("trainer.val_check_interval=0.5"), ValueError, r"trainer.val_check_interval=0.5"),
    ("mix not summing to 1", config("data.mix={web:0.3,chat:0.6}"), ValueError, r"web=0.3, chat=0.6 \(sum 0.9\)"),
    ("mix negative", config("data.mix={web:-0.5,chat:1.5}"), ValueError, r"must be >= 0 and sum to 1"),
    ("mix missing a source", config("~data.mix.chat", "data.mix.web=1.0"), ValueError, r"must have exactly the keys"),
    ("mix unknown source", config("+data.mix.code=0.0"), ValueError, r"must have exactly the keys"),
    ("threads 0", config("threads=0"), ValueError, r"threads=0 must be an integer >= 1 or null: torch CPU threads"),
    ("threads text", config("threads=many"), ValueError, r"threads='many' must be an integer >= 1 or null \(got a string\)"),
    ("threads bool", config("threads=true"), ValueError, r"threads=True must be an integer >= 1 or null \(got a boolean\)"),
    ("threshold after the end", config("crosscoder.threshold_start_step=30"), ValueError, r"threshold starts at step 30"),
    ("k anneal past the end", config("crosscoder.k_anneal_steps=40"), ValueError, r"threshold starts at step 40"),
    ("base model unset", config("model_pair.base=null"), ValueError, r"model_pair.base not set"),
    ("both models unset", config("model_pair.base=null", "model_pair.chat=null"), ValueError, r"model_pair.base and model_pair.chat not set"),
    ("unknown analysis key", config("+analysis.colour=red"), ValueError, r"unknown key analysis.colour"),
    ("missing analysis group", config("~analysis.taxonomy"), ValueError, r"missing key analysis.taxonomy"),
    ("remote checkpoint in config", config("ckpt_path=https://example.com/x.ckpt"), ValueError, r"is remote"),
    ("missing checkpoint in config", config("ckpt_path=/nonexistent/last.ckpt"), FileNotFoundError, r"ckpt_path=/nonexistent/last.ckpt: no such file"),
    ("resume a missing directory", config("resume=/nonexistent/run"), FileNotFoundError, r"resume=/nonexistent/run: no such run directory"),
    # --- checkpoints: refused before anything is unpickled
    ("https checkpoint", lambda tmp: lambda: check_checkpoint("https://example.com/last.ckpt"), ValueError, "is remote"),
    ("s3 checkpoint", lambda tmp: lambda: check_checkpoint("s3://bucket/last.ckpt"), ValueError, "is remote"),
    ("registry checkpoint", lambda tmp: lambda: check_checkpoint("registry"), ValueError, "is remote"),
    ("hostile pickle", hostile_pickle, ValueError, r"names code that loading it would run \(posix.system"),
    ("raw pickle", checkpoint_file(pickle.dumps({"state_dict": {}})), ValueError, "not a checkpoint written by torch.save"),
    ("text as checkpoint", checkpoint_file(b"not a checkpoint"), ValueError, "not a checkpoint written by torch.save"),
    ("empty checkpoint", checkpoint_file(b""), ValueError, "not a checkpoint written by torch.save"),
    ("truncated checkpoint", truncated_checkpoint, ValueError, "not a checkpoint written by torch.save"),
    # --- resume
    ("resume with another k", resume_dir("crosscoder.k=4"), ValueError, r"differs from the run's.*crosscoder\.k: 8 -> 4"),
    ("resume with another seed", resume_dir("seed=1"), ValueError, r"differs from the run's.*seed: 0 -> 1"),
    ("resume with another data mix", resume_dir("data.mix.web=0.7", "data.mix.chat=0.3"), ValueError, r"data\.mix\.web: 0\.5 -> 0\.7"),
    ("resume and a checkpoint file", resume_dir("ckpt_path=/tmp/other.ckpt"), ValueError, "drop ckpt_path"),
    ("resume elsewhere", resume_with(lambda tmp: f"resume={tmp}"), ValueError, "resume sets hydra.run.dir"),
    ("ckpt_path=last in a new run", resume_with(lambda tmp: "ckpt_path=last"), FileNotFoundError,
     r"no checkpoint in .*resume=outputs/<run_name>/<date_time>"),
    # --- activation caches: partial, mixed, corrupted
    ("cache without manifest", cache(lambda out: (out / "meta.json").unlink()), CacheError, r"writing was interrupted.*cache_activations.py out="),
    ("cache directory missing", lambda tmp: lambda: read_meta(tmp / "nowhere"), CacheError, "no such directory"),
    ("cache with a stray shard", cache(lambda out: (out / "shard-00009.safetensors").write_bytes(b"x")), CacheError, "mixed"),
    ("cache shard deleted", cache(lambda out: (out / "shard-00001.safetensors").unlink()), CacheError, "lacks shard-00001"),
    ("cache shard truncated", cache(lambda out: (out / "shard-00002.safetensors").write_bytes(b"{}")), CacheError, "truncated"),
    ("cache shard bit flip", cache(lambda out: flip_last_byte(out / "shard-00000.safetensors"), "iterate"), CacheError, "corrupted"),
    ("cache val bit flip", cache(lambda out: flip_last_byte(out / "val.safetensors"), "verify"), CacheError, "val.safetensors does not match"),
    ("cache manifest not json", cache(lambda out: (out / "meta.json").write_text("{oops")), CacheError, "not a readable cache manifest"),
    ("cache manifest future format", cache(edit_meta(lambda m: m.update(format=7))), CacheError, "unknown cache format 7"),
    ("cache manifest without shards", cache(edit_meta(lambda m: m.pop("shards"))), CacheError, "not a readable cache manifest .*no shards"),
    ("cache manifest wrong size", cache(edit_meta(lambda m: m["shards"][0].update(bytes=1))), CacheError, "its manifest says 1"),
    ("cache over a non-cache directory", cache_over(lambda p: (p.mkdir(), (p / "data.txt").write_text("mine"))), CacheError, "refusing to replace"),
    ("cache over a file", cache_over(lambda p: p.write_text("mine")), CacheError, "is a file"),
    # --- text sources
    ("missing data files", source("json", data_files="{tmp}/none/*.jsonl"), SourceUnavailableError, r"Could not load the text source.*no file matches data_files.*Check that the files exist"),
    ("truncated JSON lines", truncated_jsonl, MalformedSourceError, r"cannot be parsed.*truncated or not JSON lines"),
    ("mix of three", lambda tmp: lambda: check_mix([0.2, 0.3, 0.5]), ValueError, "two probabilities"),
    ("heldout fraction 1", lambda tmp: lambda: source_rows("web", SourceConfig("json", "text"), tiny_tokenizer(), heldout_fraction=1.0),
     ValueError, r"heldout_fraction=1.0 must be in \[0, 1\)"),
    # --- model pair
    ("model pair dtype", model_pair(base="embedded-tiny:base", chat="embedded-tiny:chat", layer=1, dtype="float8"), ValueError, "model_pair.dtype='float8' is not supported"),
    ("model pair device", model_pair(base="embedded-tiny:base", chat="embedded-tiny:chat", layer=1, device="tpu"), ValueError, "model_pair.device='tpu' is not supported"),
    # --- artifacts
    ("artifact missing", lambda tmp: lambda: CrossCoder.from_pretrained(tmp / "absent"), FileNotFoundError, "no crosscoder at"),
    ("artifact being written", artifact(lambda out: (out / "INCOMPLETE").write_text("x")), Exception, "INCOMPLETE|incomplete|partial"),
    ("artifact of another architecture", artifact(lambda out: (out / "config.json").write_text(
        json.dumps(json.loads((out / "config.json").read_text()) | {"architecture": "Other"}))), ValueError, "architecture 'Other' is not one of \\['BatchTopKCrossCoder', 'L1CrossCoder'\\]"),
]


@pytest.mark.parametrize(("setup", "error", "match"), [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_a_bad_input_is_a_clear_error_and_changes_nothing(tmp_path: Path, setup, error, match) -> None:
    action = setup(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error, match=match):
        action()
    assert snapshot(tmp_path) == before


WEB_SKIPS = [({"text": ""}, "empty"), ({"text": "   "}, "empty"), ({"text": None}, "missing_field"),
             ({"other": "x"}, "missing_field"), ({"text": 5}, "wrong_type"), ({"text": ["a"]}, "wrong_type"),
             ({"text": {"nested": "doc"}}, "wrong_type")]
CHAT_SKIPS = [({"conversation": "not a list"}, "wrong_type"), ({"conversation": []}, "empty"),
              ({"conversation": [{"role": "wizard", "content": "hi"}]}, "unknown_role"),
              ({"conversation": [{"role": "user", "content": 3}]}, "wrong_type"),
              ({"conversation": [{"role": "user"}]}, "wrong_type"), ({"nothing": 1}, "missing_field"),
              ({"conversation": [{"role": "user", "content": "  "}]}, "empty"),
              ({"conversation": [{"role": "assistant", "content": "hi"}]}, "template_error")]


@pytest.mark.parametrize(("name", "row", "reason"), [("web", r, why) for r, why in WEB_SKIPS] + [("chat", r, why) for r, why in CHAT_SKIPS],
                         ids=[f"web-{why}-{i}" for i, (_, why) in enumerate(WEB_SKIPS)] + [f"chat-{why}-{i}" for i, (_, why) in enumerate(CHAT_SKIPS)])
def test_a_malformed_row_is_a_counted_skip(tmp_path: Path, name: str, row: dict, reason: str) -> None:
    good = {"text": "the cat sat"} if name == "web" else {
        "conversation": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat"}]}
    write_jsonl(tmp_path / f"{name}.jsonl", [good, row, good])
    config = SourceConfig("json", "text" if name == "web" else "conversation", data_files=str(tmp_path / f"{name}.jsonl"))
    before = snapshot(tmp_path)
    stats = StreamStats()
    kept = list(texts(source_rows(name, config, tiny_tokenizer(), heldout_fraction=0), stats))
    assert len(kept) == 2 and stats.kept == {name: 2} and stats.skipped == {(name, reason): 1}
    assert stats.as_dict()[f"data/skipped/{name}/{reason}"] == 1.0
    assert snapshot(tmp_path) == before


def test_malformed_rows_in_one_source_do_not_shift_the_realised_mix(tmp_path: Path) -> None:
    """Every other web row is malformed: the mix still draws half its documents from each source, and every
    malformed row read is counted (one per kept web document, give or take the last)."""
    write_corpus(tmp_path, n_web=1500, n_chat=1500)
    web_file = tmp_path / "web" / "shard-00000.jsonl"
    good = web_file.read_text().splitlines()
    web_file.write_text("".join(f"{line}\n{json.dumps({'text': None})}\n" for line in good))
    stats = StreamStats()
    web = SourceConfig("json", "text", data_files=str(web_file))
    chat = SourceConfig("json", "conversation", data_files=str(tmp_path / "chat" / "*.jsonl"))
    n = 1200
    rows = mixed_rows(web, chat, tiny_tokenizer(), {"web": 0.5, "chat": 0.5}, seed=3, heldout_fraction=0)
    assert len(list(islice(texts(rows, stats), n))) == n
    share = stats.as_dict()["data/web_share"]
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n)  # before the fix: 1/3 of the documents were web
    assert abs(stats.skipped[("web", "missing_field")] - stats.kept["web"]) <= 1
