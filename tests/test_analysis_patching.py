"""Base→chat latent patching against direct computations with full logits, on tiny random Gemma-2 models."""

from __future__ import annotations

import csv
import gc
import json
import math
import random
from pathlib import Path

import pytest
import torch
from test_analysis_causal import BOS, LAYER, PAD, crosscoder, tiny_pair
from test_analysis_memory import (
    BUDGET_MB,
    VOCAB_256K,
    big_vocab_pair,
    exact_rss_accounting,
    peak_rss_reset,
    rss_kib,
)
from test_analysis_report import crosscoder as report_crosscoder
from test_analysis_report import settings as report_settings
from test_data_helpers import conversation
from test_data_helpers import tiny_pair as data_pair

from crosscoder_pl.analysis.patching import (
    POSITION_CLASSES,
    PatchingResult,
    PatchSet,
    average_ranks,
    base_to_chat_patching,
    gap_closed,
    halves,
    patch_sets,
    position_classes,
)
from crosscoder_pl.analysis.probes import (
    content_mask,
    encode_content,
    next_token_logprobs,
)
from crosscoder_pl.analysis.scaling import LatentScaling
from crosscoder_pl.analysis.taxonomy import CHAT_ONLY, DEAD, SHARED, Taxonomy
from crosscoder_pl.artifact.writer import run_analyses
from crosscoder_pl.config import AnalysisConfig
from crosscoder_pl.crosscoder import CrossCoder
from crosscoder_pl.data.activations import tokenize
from crosscoder_pl.data.cache import NoHeldoutChats
from crosscoder_pl.data.chat_positions import ChatMarkers

SOT, EOT, USER, MODEL, NL = 3, 4, 5, 6, 7
MARKERS = ChatMarkers(SOT, EOT, {"user": (SOT, USER, NL), "model": (SOT, MODEL, NL)}, (EOT, NL))
FIRST = 4  # first reply tokens scored apart (9 in the report; replies here are short)


def chats(n: int = 6, seq: int = 28) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Chats of random text tokens (ids 8..63) in Gemma's layout, truncated or right/left padded to ``seq``, with
    each position's role written down as they are built: "bos", "tag" (template), "user", "reply", "pad"."""
    rng = random.Random(0)
    ids, masks, roles = [], [], []
    for i in range(n):
        row, role = [BOS], ["bos"]
        for turn in range(3):
            speaker = (USER, MODEL)[turn % 2]
            text = [rng.randrange(8, 64) for _ in range(rng.randint(2, 9))]
            row += [SOT, speaker, NL, *text, EOT, NL]
            role += ["tag"] * 3 + ["reply" if speaker == MODEL else "user"] * len(text) + ["tag"] * 2
        row, role = row[:seq - i % 3], role[:seq - i % 3]  # rows 1, 2: shorter, padded
        pad = seq - len(row)
        if i == 1:  # left padding
            row, role, mask = [PAD] * pad + row, ["pad"] * pad + role, [0] * pad + [1] * len(row)
        else:
            row, role, mask = row + [PAD] * pad, role + ["pad"] * pad, [1] * len(row) + [0] * pad
        ids.append(row), masks.append(mask), roles.append(role)
    return torch.tensor(ids), torch.tensor(masks), roles


def expected_classes(roles: list[list[str]]) -> torch.Tensor:
    """docs/method.md's position classes, read off the roles written down while building the chats."""
    out = torch.zeros(len(POSITION_CLASSES), len(roles), len(roles[0]), dtype=torch.bool)
    for r, role in enumerate(roles):
        since_reply_start = 0
        for t, kind in enumerate(role):
            next_kind = role[t + 1] if t + 1 < len(role) else "pad"
            since_reply_start = since_reply_start + 1 if kind == "reply" else 0
            if kind in ("bos", "pad") or next_kind == "pad":
                continue  # not content, or nothing to predict
            out[0, r, t] = kind == "reply" or next_kind == "reply"
            out[1, r, t] = kind == "reply" and since_reply_start <= FIRST
            out[2, r, t] = kind == "tag"
    return out


def test_position_classes_match_the_chats_as_built() -> None:
    ids, mask, roles = chats()
    expected = expected_classes(roles)
    assert expected.flatten(1).sum(1).min() > 10  # every class is populated
    assert torch.equal(position_classes(ids, mask, MARKERS, FIRST), expected)


@torch.inference_mode()
def direct_kl(pair, ids: torch.Tensor, mask: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """Per class, the mean over its positions of KL(chat ‖ chat run on ``patched`` at content positions), with
    the model's own full logits; classes from the chats as built."""
    content = content_mask(mask)
    clean = next_token_logprobs(pair.chat, LAYER, ids, mask, lambda h: h)
    edited = next_token_logprobs(pair.chat, LAYER, ids, mask, lambda h: torch.where(content[..., None], patched.to(h), h))
    kl = (clean.exp() * (clean - edited)).sum(-1)
    classes = expected_classes(chats(ids.shape[0], ids.shape[1])[2])
    return torch.stack([kl[c].double().mean() for c in classes])


@torch.inference_mode()
def residuals(pair, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-L outputs of both models ``[n, seq, d]``."""
    captured = []
    for model in (pair.base, pair.chat):
        next_token_logprobs(model, LAYER, ids, mask, lambda h: captured.append(h) or h)
    return captured[0], captured[1]


def test_all_latents_with_the_error_term_give_back_the_chat_model() -> None:
    """x_base + Σ_all f_j (d_j^chat − d_j^base) + e = x_chat: KL 0 on every class, while the gap is not 0."""
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask, _ = chats()
    sets = [PatchSet("none", torch.zeros(0, dtype=torch.long)), PatchSet("all+error", torch.arange(8), error=True)]
    result = base_to_chat_patching(cc, pair, ids, mask, MARKERS, sets, FIRST)
    assert (result.kl[1] <= 1e-6).all(), result.kl
    assert (result.kl[0] > 1e-3).all(), result.kl  # not a degenerate case: base and chat differ
    assert result.gap_closed()[1].tolist() == pytest.approx([1.0] * 3, abs=1e-5)


def test_none_and_a_latent_set_match_the_direct_computation() -> None:
    """S = none: KL(chat ‖ chat run on the base model's activations); S = {1, 3, 5}: on x_base plus those
    latents' decoder differences times their codes; error alone: on x_base + (x_chat − x_base − Σ_all)."""
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask, _ = chats()
    base, chat = residuals(pair, ids, mask)
    with torch.inference_mode():
        codes = encode_content(cc, torch.stack([base, chat], dim=2), content_mask(mask))
    diff = (cc.W_dec[:, 1] - cc.W_dec[:, 0]).detach()
    some = torch.tensor([1, 3, 5])
    expected = {
        "none": base,
        "some": base + codes[..., some] @ diff[some],
        "error": chat - codes @ diff,  # base + (chat − base − Σ_all)
    }
    sets = [PatchSet("none", torch.zeros(0, dtype=torch.long)), PatchSet("some", some),
            PatchSet("error", torch.zeros(0, dtype=torch.long), error=True)]
    result = base_to_chat_patching(cc, pair, ids, mask, MARKERS, sets, FIRST)
    for i, name in enumerate(expected):
        direct = direct_kl(pair, ids, mask, expected[name])
        assert result.kl[i].tolist() == pytest.approx(direct.tolist(), rel=1e-4, abs=1e-7), name
    assert result.n_positions.tolist() == expected_classes(chats()[2]).flatten(1).sum(1).tolist()
    assert not torch.allclose(result.kl[0], result.kl[1])  # the latents move the distribution


def test_a_tiny_memory_budget_gives_the_same_numbers() -> None:
    """One chat per forward and one position per LM-head chunk vs everything at once."""
    cc, pair = crosscoder(tied_decoders=False), tiny_pair(identical=False)
    ids, mask, _ = chats()
    sets = [PatchSet("none", torch.zeros(0, dtype=torch.long)), PatchSet("some", torch.tensor([2, 4])),
            PatchSet("error", torch.zeros(0, dtype=torch.long), error=True)]
    small = base_to_chat_patching(cc, pair, ids, mask, MARKERS, sets, FIRST, memory_budget_mb=0.001)
    large = base_to_chat_patching(cc, pair, ids, mask, MARKERS, sets, FIRST, memory_budget_mb=1024)
    assert torch.allclose(small.kl, large.kl, rtol=1e-5, atol=1e-9)
    assert torch.equal(small.n_positions, large.n_positions)


def test_gap_closed_on_known_values() -> None:
    closed = gap_closed(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.5, 0.1, 1.5]))
    assert closed[0] == pytest.approx(0.75) and math.isnan(closed[1]) and closed[2] == pytest.approx(-0.5)
    sets = [PatchSet(n, torch.zeros(0, dtype=torch.long)) for n in ("a", "none", "b")]
    result = PatchingResult(sets, torch.tensor([[1.0, 4.0, 0.0], [2.0, 8.0, 0.0], [0.0, 2.0, 0.0]]),
                            torch.tensor([5, 5, 0]), n_chats=2)
    closed = result.gap_closed()
    assert closed[:, :2].tolist() == [[0.5, 0.5], [0.0, 0.0], [1.0, 0.75]]
    assert closed[:, 2].isnan().all()  # no gap (and here no position) on the last class
    summary = result.summary()
    assert summary["sets"]["b"]["gap_closed"]["first_reply"] == 0.75 and summary["n_positions"]["template"] == 0


def scaled(nu_r: list[float], nu_eps: list[float], latents: list[int]) -> LatentScaling:
    n = len(latents)
    return LatentScaling(torch.tensor(latents), torch.ones(n, 2), torch.ones(n, 2), torch.ones(n, 2),
                         torch.tensor(nu_r), torch.tensor(nu_eps), torch.ones(n), [""] * n)


def taxonomy(delta: list[float], classes: list[int]) -> Taxonomy:
    n = len(delta)
    return Taxonomy(torch.tensor(delta), torch.zeros(n), torch.ones(n), torch.tensor(classes), n_tokens=100)


def test_halves_split_the_pool_in_two_equal_ordered_parts() -> None:
    score_of = {10: 0.95, 11: 0.99, 12: 0.91, 13: 0.97, 14: 0.93, 15: 0.97}  # a tie: the lower id first
    latents = torch.tensor([15, 11, 12, 13, 14, 10])  # in no particular order
    score = torch.tensor([score_of[j] for j in latents.tolist()])
    top, bottom = halves(latents, score, descending=True)
    assert top.tolist() == [11, 13, 15] and bottom.tolist() == [10, 14, 12]
    assert sorted(top.tolist() + bottom.tolist()) == sorted(latents.tolist())  # a partition (even pool)
    top, bottom = halves(latents[1:], score[1:], descending=False)
    assert top.tolist() == [12, 14] and bottom.tolist() == [13, 11]  # odd: the median (10) in neither
    assert average_ranks(torch.tensor([0.3, 0.1, 0.3, 0.2])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_patch_sets_follow_the_reference_selection() -> None:
    """Pool: chat-only latents with both ν in [nu_min, nu_max] (not dead, not shared, not nan); Δnorm halves and ν
    halves split the same pool; ν: the rank sum, lowest first."""
    #           latent: 0     1     2     3     4     5     6     7
    tax = taxonomy([0.5, 0.95, 0.99, 0.92, 0.97, 0.91, 0.98, 0.96],
                   [SHARED, CHAT_ONLY, CHAT_ONLY, CHAT_ONLY, CHAT_ONLY, CHAT_ONLY, DEAD, CHAT_ONLY])
    # latent 5: ν_r out of range; 7: ν_ε nan; 0: shared (tested as the comparison group); 6: dead
    scaling = scaled(nu_r=[0.1, 0.4, 0.2, 0.05, 3.0, 0.3, 0.1, 0.0], nu_eps=[0.1, 0.3, 0.5, 0.0, 0.1, 0.2, 0.1, math.nan],
                     latents=[0, 1, 2, 3, 5, 4, 6, 7])
    sets, info = patch_sets(tax, scaling, nu_min=-0.1, nu_max=2.0)
    by_name = {s.name: s for s in sets}
    assert [s.name for s in sets] == ["none", "error", "all_latents", "chat_only", "delta_top", "delta_bottom",
                                      "nu_top", "nu_bottom"]
    assert by_name["error"].error and not by_name["nu_top"].error and by_name["none"].latents.numel() == 0
    assert by_name["chat_only"].latents.tolist() == [1, 2, 3, 4, 5, 7]
    assert info["n_pool"] == 4  # latents 1, 2, 3, 4
    assert by_name["delta_top"].latents.tolist() == [2, 4] and by_name["delta_bottom"].latents.tolist() == [1, 3]
    # ranks among the pool: ν_r 1: 0.4 -> 4, 2: 0.2 -> 2, 3: 0.05 -> 1, 4: 0.3 -> 3; ν_ε 1: 0.3 -> 3, 2: 0.5 -> 4,
    # 3: 0.0 -> 1, 4: 0.2 -> 2; sums 7, 6, 2, 5
    assert by_name["nu_top"].latents.tolist() == [3, 4] and by_name["nu_bottom"].latents.tolist() == [2, 1]
    for pair in (("delta_top", "delta_bottom"), ("nu_top", "nu_bottom")):
        top, bottom = (set(by_name[n].latents.tolist()) for n in pair)
        assert not top & bottom and top | bottom == {1, 2, 3, 4}

    sets, info = patch_sets(tax, None, nu_min=-0.1, nu_max=2.0)  # no scaling: Δnorm over all chat-only, no ν sets
    by_name = {s.name: s for s in sets}
    assert "nu_top" not in by_name and "no latent scaling" in info["pool"]
    assert by_name["delta_top"].latents.tolist() == [2, 4, 7] and by_name["delta_bottom"].latents.tolist() == [1, 3, 5]


# --- in the artifact -------------------------------------------------------------------------------------


def artifact_inputs() -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tiny pair with a chat-template tokenizer; held-out activations, probes, and 8 rendered chats."""
    pair = data_pair(layer=1)
    tokenizer = pair.tokenizer
    rng = random.Random(0)
    texts = [tokenizer.apply_chat_template(conversation(rng, turns=4), tokenize=False).removeprefix("<bos>")
             for _ in range(14)]
    batch = tokenize(tokenizer, texts, 40)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        hidden = [m.model(input_ids=ids[:6], attention_mask=mask[:6], output_hidden_states=True).hidden_states[2]
                  for m in (pair.base, pair.chat)]
    paired = torch.stack(hidden, dim=2)[content_mask(mask[:6])]
    return pair, paired, ids[:6], mask[:6], ids[6:], mask[6:]


def test_run_analyses_writes_the_patching_files_metrics_and_card(tmp_path: Path) -> None:
    pair, paired, probe_ids, probe_mask, chat_ids, chat_mask = artifact_inputs()
    cfg = report_settings()
    cfg["patching"]["max_chats"] = 5
    asked = []

    def chats(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(n)
        return chat_ids[:n], chat_mask[:n]

    cc = report_crosscoder(paired)
    metrics = run_analyses(cc, pair, paired, probe_ids, probe_mask, tmp_path, AnalysisConfig.read(cfg), {}, "cmd",
                           chats=chats)
    assert asked == [5]
    patching = metrics["patching"]
    names = list(patching["sets"])
    assert names[:6] == ["none", "error", "all_latents", "chat_only", "delta_top", "delta_bottom"]
    assert patching["n_chats"] == 5 and patching["first_reply_tokens"] == 9 and "patching" in metrics["timings_s"]
    assert patching["sets"]["none"]["kl"]["reply"] > 0
    assert all(v == 0 for v in patching["sets"]["none"]["gap_closed"].values())
    with (tmp_path / "patching.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["set"] for r in rows] == names
    assert float(rows[1]["kl_template"]) == pytest.approx(patching["sets"]["error"]["kl"]["template"])
    assert (tmp_path / "patching.png").stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["patching"]["n_positions"] == patching["n_positions"]
    card = (tmp_path / "README.md").read_text()
    section = card.split("## Base→chat latent patching")[1].split("## Citation")[0]
    assert "| none | 0 |" in section and "| error | 0 + ε |" in section and "first 9 reply tokens" in section


def test_patching_without_chats_is_skipped_and_says_why(tmp_path: Path) -> None:
    pair, paired, probe_ids, probe_mask, _, _ = artifact_inputs()
    cfg = AnalysisConfig.read(report_settings())
    cc = report_crosscoder(paired)
    metrics = run_analyses(cc, pair, paired, probe_ids, probe_mask, tmp_path / "none", cfg, {}, "cmd")
    assert metrics["patching"] == {"skipped": "the data module provides no held-out chats (it has no chat_probe_batch)"}
    assert not (tmp_path / "none" / "patching.csv").exists() and "patching" not in metrics["timings_s"]
    assert "Not run: the data module provides no held-out chats" in (tmp_path / "none" / "README.md").read_text()

    def old_cache(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NoHeldoutChats("the cache at X holds no held-out chats")

    metrics = run_analyses(cc, pair, paired, probe_ids, probe_mask, tmp_path / "old", cfg, {}, "cmd", chats=old_cache)
    assert metrics["patching"] == {"skipped": "the cache at X holds no held-out chats"}
    pair.tokenizer = None
    metrics = run_analyses(cc, pair, paired, probe_ids, probe_mask, tmp_path / "notok", cfg, {}, "cmd",
                           chats=lambda n: (probe_ids, probe_mask))
    assert "no tokenizer" in metrics["patching"]["skipped"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_patching_at_a_256k_vocabulary_stays_within_the_budget() -> None:
    """As the causal and splice-in analyses (test_analysis_memory): peak resident memory grows by far less than
    one model's ``[n_chats, seq, vocab]`` log-probs."""
    if not exact_rss_accounting():
        pytest.skip("needs glibc's mallopt for resident memory to track live tensors")
    pair = big_vocab_pair()
    ids, mask, _ = chats(n=4, seq=32)
    cc = CrossCoder(16, 32, k=4, threshold=0.0).fold()
    with torch.no_grad():
        cc.W_dec.mul_(10)
    cc.eval()
    sets = [PatchSet("none", torch.zeros(0, dtype=torch.long)), PatchSet("all", torch.arange(32), error=True)]
    gc.collect()
    before = rss_kib("VmRSS")
    peak_rss_reset()
    result = base_to_chat_patching(cc, pair, ids, mask, MARKERS, sets, FIRST, memory_budget_mb=BUDGET_MB)
    growth_mib = (rss_kib("VmHWM") - before) / 1024
    one_model_logprobs_mib = ids.numel() * VOCAB_256K * 4 / 2**20
    print(f"peak RSS growth {growth_mib:.0f} MiB; [n_chats, seq, vocab] float32 = {one_model_logprobs_mib:.0f} MiB")
    assert (result.kl[0] > 0).all() and (result.kl[1] <= 1e-6).all()
    assert growth_mib < one_model_logprobs_mib / 2
