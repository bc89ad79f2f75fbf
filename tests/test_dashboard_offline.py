"""The offline dashboard files: layout, contents against the scan, tiny-dashboard export, run_analyses hook."""

from __future__ import annotations

import csv
import json
import math
import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_data_helpers import conversation, sentence, tiny_pair

from crosscoder_pl.artifact.writer import run_analyses
from crosscoder_pl.config import AnalysisConfig
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.dashboard.examples import scan
from crosscoder_pl.dashboard.offline import (
    PAGE_FILES,
    TINY_DASHBOARD_DB,
    DashboardSettings,
    latent_table,
    read_data_file,
    resolve_settings,
    write_dashboard,
)
from crosscoder_pl.data.activations import (
    TokenTable,
    paired_activations_with_tokens,
    with_tokens,
)
from crosscoder_pl.data.sources import chat_text

SCRIPT = "<script>window.__pwned = 1</script>"
IMAGE = '<img src=x onerror="window.__pwned = 2">'
N_LATENTS = 40
SETTINGS = DashboardSettings(top_n=4, context_before=6, context_after=3, histogram_bins=8, latents_per_shard=16,
                             logit_lens_tokens=5, chunk_tokens=50)


class InjectingTokenizer:
    """The test tokenizer, except that two words decode to HTML: what a corpus may hold."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.injected = {tokenizer.convert_tokens_to_ids("cat"): SCRIPT, tokenizer.convert_tokens_to_ids("dog"): IMAGE}

    def decode(self, ids: list[int]) -> str:
        return self.injected.get(ids[0], self.tokenizer.decode(ids)) if len(ids) == 1 else self.tokenizer.decode(ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)


def build(artifact: Path) -> SimpleNamespace:
    """Held-out activations of a tiny pair on web sentences and rendered chats; a random crosscoder whose
    latents fire often; a ``latents.csv`` naming three chat-only latents (−log ν_ε 5, 2, undefined)."""
    pair = tiny_pair(layer=1)
    rng = random.Random(0)
    web = [" ".join(["cat dog"] + [sentence(rng, 4, 10)]) for _ in range(6)]
    chat = [chat_text(conversation(rng, 2), pair.tokenizer)[0] for _ in range(6)]
    acts, tokens = paired_activations_with_tokens(pair, web + chat, 32, "right", None, ["web"] * 6 + ["chat"] * 6)
    acts = with_tokens(acts, tokens)
    torch.manual_seed(0)
    cc = CrossCoder(32, N_LATENTS, k=4, threshold=0.05)
    with torch.no_grad():
        cc.W_enc.mul_(40 / acts.norm(dim=-1).mean())
        cc.b_enc.uniform_(-0.4, 0.1)
    cc = cc.fold().eval()
    result = scan(cc, acts, tokens, SETTINGS.top_n, SETTINGS.histogram_bins, SETTINGS.chunk_tokens)  # as the writer
    both = ((result.rows[0, :, 0] >= 0) & (result.rows[1, :, 0] >= 0)).nonzero().flatten().tolist()
    chat_only = {both[0]: "", both[1]: "2.0", both[2]: "5.0"}  # expected order on the page: both[2], both[1], both[0]
    artifact.mkdir(parents=True, exist_ok=True)
    with (artifact / "latents.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["latent", "delta_norm", "decoder_cosine", "firing_frequency", "nu_r", "nu_eps",
                         "neg_log_nu_r", "neg_log_nu_eps", "class", "chat_specific", "scaling_note"])
        for j in range(N_LATENTS):
            score = chat_only.get(j)
            writer.writerow([j, 0.95 if score is not None else 0.5, 0.1, 0.2, "", "", "", score or "",
                             "chat_only" if score is not None else "shared", score == "5.0", ""])
    view = SimpleNamespace(base=pair.base, chat=pair.chat, tokenizer=InjectingTokenizer(pair.tokenizer), layer=1,
                           base_id="tiny/base", chat_id="tiny/chat")
    summary = write_dashboard(cc, view, acts, tokens, artifact, SETTINGS)
    order = [both[2], both[1], both[0]]
    return SimpleNamespace(cc=cc, acts=acts, tokens=tokens, result=result, summary=summary, chat_only_order=order,
                           pair=pair, view=view)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    artifact = tmp_path_factory.mktemp("artifact")
    facts = build(artifact)
    facts.artifact = artifact
    return facts


def data(artifact: Path, key: str):
    found, payload = read_data_file(artifact / "dashboard" / "data" / f"{key}.js")
    assert found == key
    return payload


def test_layout_and_table(built: SimpleNamespace) -> None:
    out = built.artifact / "dashboard"
    assert {p.name for p in out.iterdir()} == {*PAGE_FILES, "data", TINY_DASHBOARD_DB}
    shards = sorted(p.name for p in (out / "data").iterdir() if p.name.startswith("shard-"))
    assert shards == [f"shard-{i:05d}.js" for i in range(math.ceil(N_LATENTS / 16))] and built.summary["n_shards"] == 3
    meta = data(built.artifact, "meta")
    assert meta["n_latents"] == N_LATENTS and meta["settings"]["top_n"] == 4
    assert meta["n_tokens"] == {"web": int(built.result.n_tokens[0]), "chat": int(built.result.n_tokens[1])}
    table = data(built.artifact, "latents")
    values = table["values"]
    assert [c["key"] for c in table["columns"]][:3] == ["latent", "class", "delta_norm"]
    assert all(len(column) == N_LATENTS for column in values.values())
    first = built.chat_only_order[0]
    assert values["class"][first] == "chat_only" and values["neg_log_nu_eps"][first] == 5.0
    assert values["chat_specific"][first] is True and values["neg_log_nu_eps"][built.chat_only_order[2]] is None
    assert values["pearson"] == [None] * N_LATENTS  # no causal_validation.csv in this artifact
    assert values["twin_latent"] == [None] * N_LATENTS  # an older latents.csv without the diagnostics columns
    frequency = built.result.frequency()
    assert values["frequency_chat"][first] == pytest.approx(float(frequency[1, first]), rel=1e-4)


def test_shards_hold_the_scan_in_context(built: SimpleNamespace) -> None:
    vocab = data(built.artifact, "vocab")
    tokens = built.tokens
    n_examples = 0
    for index in range(3):
        shard = data(built.artifact, f"shard-{index:05d}")
        assert shard["first"] == index * 16
        for record in shard["latents"]:
            j = record["latent"]
            for s, source in enumerate(("web", "chat")):
                examples = record["examples"][source]
                expected_rows = [r for r in built.result.rows[s, j].tolist() if r >= 0]
                assert [e["row"] for e in examples] == expected_rows
                assert sum(record["histogram"][source]) == record["fired"][source] == int(built.result.fired[s, j])
                for e, row in zip(examples, expected_rows):
                    n_examples += 1
                    peak = e["peak"]
                    assert e["tokens"][peak] == int(tokens.input_ids[tokens.seq[row], tokens.pos[row]])
                    assert e["activations"][peak] == pytest.approx(e["activation"], rel=1e-3)
                    assert all(str(t) in vocab for t in e["tokens"])
                    if source == "chat":
                        assert {role for _, role in e["turns"]} <= {"", "user", "model"} and e["turns"][0][0] == 0
            assert len(record["logit_lens"]["base"]["promoted"]) == 5
    assert n_examples == built.summary["n_examples"] > 0
    assert SCRIPT in vocab.values()  # the corpus text is kept as it is: the page must render it as text


def test_tiny_dashboard_layout(built: SimpleNamespace) -> None:
    """tiny-dashboard's OfflineFeatureCentricDashboard.from_db reads ``data_table`` rows: key -> JSON list of
    (max activation, token strings, token activations), strongest first."""
    db = sqlite3.connect(built.artifact / "dashboard" / TINY_DASHBOARD_DB)
    rows = dict(db.execute("SELECT key, examples FROM data_table").fetchall())
    db.close()
    fired = ((built.result.rows >= 0).any(-1).any(0)).nonzero().flatten().tolist()
    assert sorted(rows) == fired
    j = built.chat_only_order[0]
    examples = json.loads(rows[j])
    assert len(examples) == int((built.result.rows[:, j] >= 0).sum())  # web and chat together
    maxima = [e[0] for e in examples]
    assert maxima == sorted(maxima, reverse=True)
    tokenizer = built.pair.tokenizer
    for max_act, strings, acts in examples:
        assert isinstance(strings, list) and len(strings) == len(acts)
        assert max(acts) >= max_act * (1 - 1e-3)  # the example's token, or a stronger neighbour in its window
        assert all(tokenizer.convert_tokens_to_ids(s) != tokenizer.unk_token_id for s in strings)


def test_settings_resolution_and_validation(tmp_path: Path) -> None:
    assert resolve_settings(None, tmp_path) == DashboardSettings()
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"dashboard": {"enabled": False, "top_n": 3,
                                                                               "server": {"port": 1}}}))
    assert resolve_settings(None, tmp_path) == DashboardSettings(enabled=False, top_n=3)
    given = DashboardSettings.read({"top_n": 7})  # the command's settings, read once, win over the recorded ones
    assert resolve_settings(given, tmp_path) is given
    with pytest.raises(ValueError, match="unknown dashboard settings"):
        DashboardSettings.read({"topn": 7})
    with pytest.raises(ValueError, match="histogram_bins=3 must be an even number"):
        DashboardSettings(histogram_bins=3)


def test_run_analyses_writes_the_dashboard_unless_disabled(tmp_path: Path) -> None:
    from test_analysis_causal import tiny_pair as gemma_pair
    from test_analysis_report import crosscoder, inputs, settings

    pair = gemma_pair(identical=False)
    paired, ids, mask = inputs(pair)  # rows: 6 sequences x positions 1..11 (BOS dropped)
    table = TokenTable(torch.randint(3, 60, (6, 12)), torch.ones(6, 12, dtype=torch.long),
                       torch.tensor([0, 1] * 3, dtype=torch.int8), torch.arange(6).repeat_interleave(11),
                       torch.arange(1, 12).repeat(6))
    cfg = settings()
    cfg["causal"]["enabled"] = False
    metrics = run_analyses(crosscoder(paired), pair, with_tokens(paired, table), ids, mask, tmp_path, AnalysisConfig.read(cfg), {}, "cmd")
    assert (tmp_path / "dashboard" / "index.html").is_file() and "dashboard" in metrics["timings_s"]
    assert metrics["dashboard"]["n_tokens"] == {"web": 33, "chat": 33}
    assert metrics["dashboard"]["path"] == "dashboard/index.html"  # relative: the artifact dir is renamed when done
    off = tmp_path / "off"
    metrics = run_analyses(crosscoder(paired), pair, with_tokens(paired.clone(), table), ids, mask, off, AnalysisConfig.read(cfg), {}, "cmd",
                           dashboard=DashboardSettings(enabled=False))
    assert not (off / "dashboard").exists() and "dashboard" not in metrics
    # Without token ids (e.g. an older cache) there is no dashboard, and the other analyses still run.
    metrics = run_analyses(crosscoder(paired), pair, paired.clone(), ids, mask, tmp_path / "plain", AnalysisConfig.read(cfg), {}, "cmd")
    assert not (tmp_path / "plain" / "dashboard").exists() and "validation" in metrics


def test_tiny_run_artifact_has_its_dashboard(tiny_run: Path) -> None:
    """Acceptance: the artifact of a training run (here the tiny experiment) holds dashboard/index.html, and
    the table lists every latent."""
    assert (tiny_run / "dashboard" / "index.html").is_file()
    table = data(tiny_run, "latents")
    assert len(table["values"]["latent"]) == CrossCoder.from_pretrained(tiny_run).n_latents
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["dashboard"]["n_examples"] > 0


def test_table_reads_the_diagnostics_columns(built: SimpleNamespace, tmp_path: Path) -> None:
    """latents.csv's scaling-filter and sparsity-artifact columns reach the table typed: numbers, ints, yes/no."""
    header = ["latent", "delta_norm", "nu_a", "neg_log_nu_a", "class", "chat_specific", "nu_in_range",
              "shrinkage_suspect", "decoupling_suspect", "twin_latent", "twin_cosine", "twin_cofiring", "template_share"]
    with (tmp_path / "latents.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for j in range(N_LATENTS):
            twin = 1 if j == 0 else ""
            writer.writerow([j, 0.95, 0.25 if j == 0 else "", "", "chat_only", False, j == 0, j == 0, False, twin,
                             0.97 if j == 0 else "", 0.5 if j == 0 else "", 0.75 if j == 0 else "nan"])
    values = latent_table(built.cc, built.result, tmp_path)["values"]
    assert values["twin_latent"][:2] == [1, None] and isinstance(values["twin_latent"][0], int)
    assert values["nu_a"][:2] == [0.25, None] and values["twin_cosine"][0] == 0.97 and values["twin_cofiring"][0] == 0.5
    assert values["template_share"][:2] == [0.75, None]  # nan -> null
    assert values["nu_in_range"][:2] == [True, False] and values["shrinkage_suspect"][0] is True
    assert values["decoupling_suspect"][0] is False
