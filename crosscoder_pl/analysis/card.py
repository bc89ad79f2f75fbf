"""The artifact's model card (``README.md``, layout of seed 000) and ``metrics.json``.

Everything printed in the card comes from the ``metrics`` dict built by ``report.write_analyses``; the
recipe section from the ``recipe`` dict (the crosscoder's metadata / training config) passed in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CITATIONS = (
    "Lindsey et al. 2024 — Sparse Crosscoders for Cross-Layer Features and Model Diffing",
    "Anthropic Jan 2025 — Insights on Crosscoder Model Diffing",
    "Minder, Dumas, Juang, Chughtai, Nanda — NeurIPS 2025 (arxiv:2504.02922)",
    "Bhatt et al. — Cross-Architecture Model Diffing with Crosscoders (arxiv:2602.11729)",
    "Bussmann, Leask, Nanda 2024 — BatchTopK Sparse Autoencoders (arxiv:2412.06410)",
    "Gao et al. 2024 — Scaling and evaluating sparse autoencoders (arxiv:2406.04093)",
)
TRAINING_DEAD = "training_dead_fraction"  # set by the export callback: {fraction, window_tokens, step}
OUTLIERS = "outliers"  # set at the end of training (crosscoder_pl.training.RecordDataMix): the outlier report
# Recipe keys already stated in the title, the introduction, the "Reproduce" section or a section of their own.
IDENTITY_KEYS = ("base_model", "chat_model", "layer", "n_latents", "d_model", "command", TRAINING_DEAD, OUTLIERS)
SPARSITY_NAMES = {"batchtopk": "BatchTopK", "l1": "L1"}  # crosscoder_pl.step.SPARSITIES, as the card names them
# The outlier report's parts (crosscoder_pl.data.outliers.OutlierCounts.summary each), in the card's order.
OUTLIER_ROWS = {"training": "training data", "cache_training": "cache writer's stream", "heldout": "held-out set"}


def write_metrics(metrics: Mapping[str, Any], path: Path) -> Path:
    """``metrics.json``; undefined numbers (nan) become ``null`` so the file is strict JSON."""
    path.write_text(json.dumps(_strict(metrics), indent=2) + "\n")
    return path


def write_card(metrics: Mapping[str, Any], recipe: Mapping[str, Any], command: str, path: Path) -> Path:
    path.write_text(render_card(metrics, recipe, command))
    return path


def render_card(metrics: Mapping[str, Any], recipe: Mapping[str, Any], command: str) -> str:
    """The model card markdown: front matter, recipe, validation, outlier tokens, taxonomy, scaling, sparsity-artifact
    diagnostics, causal, splice, base→chat patching, citations."""
    art = metrics["artifact"]
    sparsity = art.get("sparsity", "batchtopk")  # artifacts of earlier versions are BatchTopK
    sections = [
        _front_matter(metrics),
        f"# Cross-Model Crosscoder — {art['base_model']} vs {art['chat_model']}",
        f"{SPARSITY_NAMES[sparsity]} crosscoder trained on layer {art['layer']} residual stream of `{art['base_model']}` and "
        f"`{art['chat_model']}` simultaneously. The dictionary ({art['n_latents']:,} latents, d_model "
        f"{art['d_model']}) decomposes both models' activations into shared, base-specific, and "
        "chat-specific features.",
        "## Recipe\n\n" + "\n".join([*_recipe_lines(recipe, art["k"]), _scales_line(art["scales"])]),
        _validation(metrics["validation"], recipe.get(TRAINING_DEAD), art["k"], sparsity),
    ]
    if metrics.get("outliers"):
        sections.append(_outliers(metrics["outliers"]))
    if "taxonomy" in metrics:
        sections.append(_taxonomy(metrics["taxonomy"]))
    if "scaling" in metrics:
        sections.append(_scaling(metrics["scaling"]))
    if "chat_specific_latents" in metrics:
        sections.append(_chat_specific(metrics["chat_specific_latents"]))
    if "diagnostics" in metrics:
        sections.append(_diagnostics(metrics["diagnostics"]))
    if "causal" in metrics:
        sections.append(_causal(metrics["causal"]))
    if "splice" in metrics:
        sections.append(_splice(metrics["splice"]))
    if "patching" in metrics:
        sections.append(_patching(metrics["patching"]))
    sections.append("## Citation\n\n" + "\n".join(f"- {c}" for c in CITATIONS))
    sections.append(f"## Reproduce\n\n```bash\n{command}\n```")
    return "\n\n".join(sections) + "\n"


def _front_matter(metrics: Mapping[str, Any]) -> str:
    """huggingface_hub's ``ModelCardData`` (license, tags, both models as ``base_model``, the validation figures as
    evaluation results), as YAML between ``---`` lines."""
    from crosscoder_pl.analysis.card_metadata import (
        card_data,  # huggingface_hub only when a card is written
    )

    return f"---\n{card_data(metrics, hub_ids_only=False).to_yaml()}\n---"


def _recipe_lines(recipe: Mapping[str, Any], k: int | None) -> list[str]:
    """The seed's phrasing for BatchTopK k (or the L1 penalty) and the optimiser (when those keys exist); every
    other key as is."""
    rest = {key: v for key, v in recipe.items() if key not in IDENTITY_KEYS and key != "k"}
    if rest.pop("sparsity", "batchtopk") == "l1":
        coef, warmup = rest.pop("l1_coef"), rest.pop("l1_warmup_frac", 0)
        lines = [f"- L1 penalty λ = {coef} on sum_j f_j sum_m ||d_j^m||" +
                 (f", warmed up linearly over the first {warmup:.0%} of the steps" if warmup else "")]
    else:
        k_start = rest.pop("k_start", None)
        annealed = f" (annealed from {k_start})" if k_start not in (None, k) else ""
        lines = [f"- BatchTopK k = {k}{annealed}"]
    if "lr" in rest:
        parts = [f"Adam lr {rest.pop('lr')}"]
        if "lr_decay_frac" in rest:
            parts.append(f"decay last {rest.pop('lr_decay_frac'):.0%}")
        if "gradient_clip_val" in rest:
            parts.append(f"grad clip {rest.pop('gradient_clip_val')}")
        lines.append("- " + ", ".join(parts))
    lines += [f"- {key}: {_value(value)}" for key, value in rest.items()]
    return lines


def _scales_line(scales: list[float]) -> str:
    base, chat = scales
    return f"- Per-model normalization scales: base {base:.4g}, chat {chat:.4g} (folded into the saved weights)"


def _validation(v: Mapping[str, Any], training_dead: Mapping[str, Any] | None, k: int | None,
                sparsity: str = "batchtopk") -> str:
    ve = v["variance_explained"]
    how = ("on the held-out tokens (every positive code of the L1 crosscoder)" if sparsity == "l1" else
           f"with the inference threshold on the held-out tokens (training: BatchTopK, {k} per token on average)")
    text = (
        "## Validation\n\n"
        "| | base | chat |\n|---|---|---|\n"
        f"| variance explained | {_num(ve['base'])} | {_num(ve['chat'])} |\n\n"
        f"L0 = {_num(v['l0'], 1)} {how}, dead-feature fraction = {_pct(v['dead_fraction'])} "
        f"(window: latents that never fired on the {v['n_tokens']:,} held-out tokens)"
    )
    if training_dead:
        text += (
            f"; during training, {_pct(training_dead['fraction'])} of latents had not fired in the last "
            f"{training_dead['window_tokens']:,} training tokens (step {training_dead['step']:,})"
        )
    return text


def _outliers(report: Mapping[str, Mapping[str, Any]]) -> str:
    """A table row per part of the report: tokens screened, outliers per model (count and share), the rule."""
    order = [*(key for key in OUTLIER_ROWS if key in report), *(key for key in report if key not in OUTLIER_ROWS)]
    rows = [
        f"| {OUTLIER_ROWS.get(key, key)} | {s['tokens']:,} | {_outlier_cell(s, 'base')} | {_outlier_cell(s, 'chat')} "
        f"| {_outlier_cell(s, 'either')} | norm > {s['factor']:g}× the model's median over {s['median_over']} "
        f"| {'dropped' if s['dropped'] else 'kept'} |"
        for key, s in ((key, report[key]) for key in order)
    ]
    return (
        "## Outlier tokens\n\n"
        "Tokens whose activation norm in a model exceeds `data.outlier_factor` times that model's median norm: "
        "counted per model, and dropped only with `data.drop_outliers=true`. A text stream is screened as it is "
        "read, ahead of training (its shuffle buffer included); a cache's batches as they are trained on.\n\n"
        "| | tokens screened | base | chat | either | outlier if | kept or dropped |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )


def _outlier_cell(summary: Mapping[str, Any], kind: str) -> str:
    return f"{summary['counts'][kind]:,} ({summary['fractions'][kind]:.3%})"


def _taxonomy(t: Mapping[str, Any]) -> str:
    th = t["thresholds"]
    return (
        "## Δnorm taxonomy\n\n"
        f"```json\n{json.dumps(t['counts'], indent=2)}\n```\n\n"
        f"base_only Δ <= {th['base_only_max']}, chat_only Δ >= {th['chat_only_min']}, shared "
        f"{th['shared_min']} <= Δ < {th['shared_max']}; dead (never fired on the held-out tokens) counted "
        "first. Per latent: `latents.csv`; histogram: `delta_norm_histogram.png`."
    )


def _scaling(s: Mapping[str, Any]) -> str:
    rows = "".join(
        f"| {name} | {g['n_tested']} | {_num(g['median_nu_r'])} | {_num(g['median_nu_eps'])} | "
        f"{_num(g['median_neg_log_nu_eps'])} | {g['n_nu_undefined']} | {g.get('n_outside_filter', 'n/a')} |\n"
        for name, g in s["groups"].items()
    )
    rule = s["rule"]
    return (
        "## Latent scaling (base uselessness)\n\n"
        "| latents | tested | median ν_r | median ν_ε | median −log ν_ε | ν undefined | ν outside filter |\n"
        f"|---|---|---|---|---|---|---|\n{rows}\n"
        f"{s['n_chat_specific']} latents are truly chat-specific (Δ >= {rule['chat_only_min']}, "
        f"ν_ε < {rule['nu_eps_max']}, ν_r < {rule['nu_r_max']}, both ν within the reliability filter "
        f"[{rule['nu_min']:g}, {rule['nu_max']:g}] of Minder et al.'s code: outside it the fit is unreliable, "
        "and a latent there is neither ranked nor called chat-specific). Per latent, with ν_a (activation "
        "target) and the reason for every undefined or filtered value: `latents.csv`."
    )


def _chat_specific(latents: list[Mapping[str, Any]]) -> str:
    """The top chat-only latents by base uselessness with the tokens they fire on most."""
    head = (
        "## Top chat-specific latents\n\n"
        "Chat-only latents ranked by base uselessness −log ν_ε (seed 002: scores above 4 were the most "
        "interpretable), with the probe tokens they fire on most (the firing token in **bold** after its "
        "context; activation in brackets).\n\n"
    )
    if not latents:
        return head + "No chat-only latent with a defined ν_ε."
    rows = "".join(
        f"| {r['latent']} | {_num(r['delta_norm'], 3)} | {_num(r['nu_eps'], 3)} | {_num(r['nu_r'], 3)} | "
        f"{_num(r['neg_log_nu_eps'], 2)} | {'yes' if r['chat_specific'] else 'no'} | {_pct(r['firing_frequency'])} | "
        f"{_tokens(r['top_tokens'])} |\n"
        for r in latents
    )
    return (
        head + "| latent | Δnorm | ν_ε | ν_r | −log ν_ε | truly chat-specific | frequency | fires most on |\n"
        f"|---|---|---|---|---|---|---|---|\n{rows}"
    ).rstrip()


def _tokens(top: list[Mapping[str, Any]]) -> str:
    if not top:
        return "(no firing in the probes)"
    return "; ".join(f"{_cell(t['context'])}**{_cell(t['token'])}** ({t['activation']:.2g})" for t in top)


def _cell(text: str) -> str:
    """Token text safe inside a markdown table cell: whitespace and markup characters shown, not interpreted."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎").replace("`", "\\`")
    for ch in "*_<>[]":
        text = text.replace(ch, "\\" + ch)
    return text or "∅"


def _diagnostics(d: Mapping[str, Any]) -> str:
    """Sparsity-artifact diagnostics (Minder, Dumas et al. 2025): counts and shares, the reference's figure where
    its code or data states it."""
    rules = d["rules"]
    lines = []
    for key, title, ratio, meaning in (
        ("complete_shrinkage", "Complete Shrinkage", "ν_ε", "the base error still holds the latent's direction"),
        ("latent_decoupling", "Latent Decoupling (scaling)", "ν_r", "other latents rebuild it in the base model"),
    ):
        if key in d:
            s = d[key]
            low, high = s["shared_interval"]
            lines.append(
                f"- {title}: {s['n_inside']} of {s['n_chat_only']} chat-only latents ({_pct(s['share_inside'])}) have "
                f"{ratio} inside the shared latents' central {rules['interval']:.0%} [{_num(low, 3)}, {_num(high, 3)}] "
                f"({meaning}); median {ratio} chat-only {_num(s['median_chat_only'], 3)}, shared "
                f"{_num(s['median_shared'], 3)}."
            )
    t = d["twins"]
    lines.append(
        f"- Twins: {t['n_pairs']} chat-only latents have a base-only latent whose base decoder points along their "
        f"chat decoder (cosine > {rules['min_cosine']}; {t['n_base_only_with_twin']} of {t['n_base_only']} base-only "
        f"latents have one); median co-firing (tokens where both fire / where either fires) "
        f"{_num(t['median_cofiring'], 3)}, median twin activation divergence {_num(t['median_divergence'], 3)}. "
        "Reference point: the L1 crosscoder of Minder, Dumas et al. has 109 twin pairs (data/twins.json of their code)."
    )
    if "template" in d:
        tpl = d["template"]
        parts = [f"{name.replace('_', ' ')} {g['n_mainly_template']} of {g['n_fired']} ({_pct(g['share_mainly_template'])})"
                 for name, g in tpl.items() if isinstance(g, Mapping)]
        lines.append(
            f"- Template tokens ({tpl['n_template_tokens']:,} of {tpl['n_chat_tokens']:,} held-out chat tokens): "
            f"latents firing mainly (> {rules['template_majority']:.0%} of their chat-token firings) on chat-template "
            f"tokens: {'; '.join(parts)}."
        )
    else:
        lines.append("- Template share: not computed (no token ids or chat-template markers for the held-out tokens).")
    return (
        "## Sparsity-artifact diagnostics\n\n"
        "Checks for chat-only latents that are artifacts of the sparsity penalty rather than chat-specific concepts "
        "(Minder, Dumas et al. 2025; method: docs/method.md). Per latent (suspect flags, twin, co-firing, template "
        "share): `latents.csv`.\n\n" + "\n".join(lines)
    )


def _causal(c: Mapping[str, Any]) -> str:
    return (
        "## Causal validation (this artifact's contribution)\n\n"
        f"Beyond the decoder-norm taxonomy, the {c['selection']} were tested for "
        "causal-effect equivalence: ablate the latent in both models on the same "
        f"{c['n_probes']} probe inputs, measure the KL shift of the next-token distribution per probe, and "
        "correlate (Pearson) the base and chat KL-shift vectors over the probes where the latent fires. See "
        "`causal_validation.csv` and "
        "`cosine_vs_causal.png`.\n\n"
        "| median causal Pearson | median decoder cosine | latents tested | Pearson undefined |\n"
        "|---|---|---|---|\n"
        f"| {_num(c['median_pearson'])} | {_num(c['median_decoder_cosine'])} | {c['n_latents_tested']} | "
        f"{c['n_pearson_nan']} |\n\n"
        "Medians are over the latents with a defined Pearson (undefined: the latent fired on fewer than 3 "
        "probes, or a KL vector is constant on them). For reference, a published draft on Gemma-2-2B found a "
        "median decoder cosine of 0.965 but a median Pearson of 0.616 over 80 shared latents: cosine "
        "alone over-states sharing."
    )


def _splice(s: Mapping[str, Any]) -> str:
    rows = (
        ("CE clean", "ce_clean"),
        ("CE spliced", "ce_splice"),
        ("CE zero-ablation", "ce_zero"),
        ("CE increase", "ce_increase"),
        ("KL(clean ‖ spliced)", "kl_splice"),
        ("zero-ablation gap recovered", "frac_recovered"),
    )
    table = "".join(f"| {label} | {_num(s['base'][key])} | {_num(s['chat'][key])} |\n" for label, key in rows)
    return (
        "## Splice-in evaluation\n\n"
        f"Layer output replaced by its reconstruction at the {s['n_tokens']:,} content tokens of "
        f"{s['n_probes']} probes (BOS and padding untouched).\n\n"
        f"| | base | chat |\n|---|---|---|\n{table}"
    ).rstrip()


def _patching(p: Mapping[str, Any]) -> str:
    title = "## Base→chat latent patching\n\n"
    if "skipped" in p:
        return f"{title}Not run: {p['skipped']}."
    classes = (("reply", "reply tokens"), ("first_reply", f"first {p['first_reply_tokens']} reply tokens"),
               ("template", "template tokens"))
    head = "| set | latents (+ ε: error term) | " + " | ".join(f"KL {label} | gap closed" for _, label in classes) + " |\n"
    head += "|---|---|" + "---|---|" * len(classes) + "\n"
    rows = "".join(
        f"| {name} | {s['n_latents']}{' + ε' if s['error_term'] else ''} | "
        + " | ".join(f"{_num(s['kl'][c])} | {_pct_or_na(s['gap_closed'][c])}" for c, _ in classes) + " |\n"
        for name, s in p["sets"].items()
    )
    n = p["n_positions"]
    return (
        f"{title}The chat model run on {p['n_chats']} held-out chats with its layer output replaced by the base "
        "model's plus the chosen latents' decoder differences f_j (d_j^chat − d_j^base) (Minder, Dumas et al. "
        "2025); KL(chat ‖ patched) in nats per position, and the share of the base–chat gap (the set \"none\") it "
        f"closes. Positions: {n['reply']:,} reply, {n['first_reply']:,} first-reply, {n['template']:,} template. "
        "Sets: none (the gap), error (ε: the difference no latent explains, decoder biases included), all latents, "
        "all chat-only latents, and the halves of a pool of chat-only latents by Δnorm (delta_top: the higher half) "
        "and by the rank sum of ν_r and ν_ε (nu_top: the lower, more chat-specific half); pool "
        f"({p['selection']['n_pool']} latents): {p['selection']['pool']}. See `patching.csv` and "
        f"`patching.png`.\n\n{head}{rows}"
    ).rstrip()


def _pct_or_na(value: float | None) -> str:
    return "n/a" if value is None else _pct(value)


def _num(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2%}"


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`" if isinstance(value, (Mapping, list, tuple)) else str(value)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
