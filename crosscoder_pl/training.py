"""The training application: everything built from the Hydra config, then ``Trainer.fit``."""

from __future__ import annotations

import logging
import re
import shlex
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from crosscoder_pl.analysis.card import OUTLIERS
from crosscoder_pl.callbacks.artifact import WriteArtifact
from crosscoder_pl.config import (
    CachedDataConfig,
    ModelPairConfig,
    RunConfig,
)
from crosscoder_pl.config_group import thaw
from crosscoder_pl.data.build import build_data
from crosscoder_pl.data.cache import read_meta
from crosscoder_pl.experiments import check_experiment
from crosscoder_pl.models.pair import read_hidden_size
from crosscoder_pl.module import CrossCoderModule
from crosscoder_pl.names import SOURCES

log = logging.getLogger(__name__)
# conf/train.yaml's hydra.run.dir: the resumed run's directory (resume=DIR), else a new one (oc.select would
# return a null resume, not the default).
OmegaConf.register_new_resolver("resume_or", lambda resume, new: new if resume is None else resume, replace=True)
# ckpt_path values Lightning resolves to this run's own local checkpoints.
CHECKPOINT_KEYWORDS = ("last", "best", "hpc")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_config(cfg: DictConfig) -> RunConfig:
    """Fail in seconds, before any model, tokenizer or dataset loads: the experiment against the options chosen
    next to it (`check_experiment`), every value and key of the typed groups (`crosscoder_pl.config.RunConfig`: each
    error names the key, the value and the fix), the dictionary size once d_model is read from the base model's
    config (``crosscoder.expansion``), an activation cache's manifest (``data=cached``), the checkpoint and the run
    to resume. Returns the typed configuration."""
    check_experiment(cfg)  # an experiment and the options chosen next to it (crosscoder_pl.experiments)
    run = RunConfig.from_hydra(cfg)
    if run.crosscoder.expansion is not None:  # the config only, no weights: d_model sizes the dictionary
        names = run.model_pair if isinstance(run.model_pair, Mapping) else run.model_pair.model_dump()
        run = run.resolve(read_hidden_size(names["base"], names.get("token")))
    if isinstance(run.data, CachedDataConfig):
        read_meta(run.data.path)  # the activation cache's manifest (a missing or partial cache), not its shards
    check_checkpoint(run.ckpt_path)
    if run.resume is not None and not Path(run.resume).is_dir():
        raise FileNotFoundError(f"resume={run.resume}: no such run directory (pass the output dir of an earlier run, "
                                "outputs/<run_name>/<date_time>)")
    return run


def check_checkpoint(ckpt_path: str | None) -> None:
    """Refuse, before anything loads, a checkpoint that is remote or that names code: unpickling runs what a
    pickle names. ``ckpt_path``: None, one of Lightning's keywords (``last``, ``best``, ``hpc``: this run's own
    local checkpoints) or a local file. Lightning then loads it with ``weights_only=True`` (see `train`)."""
    if ckpt_path is None or str(ckpt_path) in CHECKPOINT_KEYWORDS:
        return
    path = str(ckpt_path)
    if URL.match(path) or path.lower() == "registry" or path.lower().startswith("registry:"):
        raise ValueError(
            f"ckpt_path={path} is remote, and a checkpoint is a pickle, which can run code when loaded: remote "
            "checkpoints are refused. Download it yourself from a source you trust, then pass the local file "
            "(ckpt_path=/path/to/last.ckpt)"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={path}: no such file. Pass a checkpoint of an earlier run (e.g. "
            "ckpt_path=outputs/<run>/checkpoints/last.ckpt), or ckpt_path=null to start from scratch"
        )
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the pickle, runs nothing
    except Exception as err:  # not a zip archive written by torch.save (a raw pickle, a truncated file, ...)
        raise ValueError(
            f"ckpt_path={path} is not a checkpoint written by torch.save ({err}); pass a checkpoint of an earlier run "
            "(outputs/<run>/checkpoints/last.ckpt)"
        ) from err
    if unsafe:
        raise ValueError(
            f"ckpt_path={path} names code that loading it would run ({', '.join(unsafe)}): this application's "
            "checkpoints hold tensors and plain values only, so it was not written by train.py (or was altered). "
            "Refused; resume from a checkpoint of your own run"
        )


RUN_CONFIG = "run_config.yaml"  # the configuration a run started with, in its output dir (compared on resume)
WANDB_ID = "wandb_run_id"  # the W&B run id of a run, in its output dir (reused on resume)
# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = ("resume", "ckpt_path", "output_dir", "artifact_dir", "hydra")


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from: with ``resume=DIR`` (DIR is then also this run's output dir, see
    conf/train.yaml) its ``checkpoints/last.ckpt`` (None, a fresh start in DIR, if the run died before its first
    checkpoint); else ``ckpt_path``. ``ckpt_path=last`` must find a checkpoint in this run's own output dir."""
    output_dir = Path(cfg.output_dir)
    last = output_dir / "checkpoints" / "last.ckpt"
    if cfg.get("resume") is not None:
        if Path(cfg.resume).resolve() != output_dir.resolve():
            raise ValueError(
                f"resume={cfg.resume} but the output dir is {output_dir}: resume sets hydra.run.dir (conf/train.yaml); "
                "do not set hydra.run.dir or output_dir together with resume"
            )
        check_same_run(cfg)
        if cfg.ckpt_path not in (None, "last"):
            raise ValueError(f"resume={cfg.resume} continues from its own last checkpoint: drop ckpt_path={cfg.ckpt_path}")
        if not last.is_file():
            log.warning("resume=%s: no checkpoint yet (the run stopped before its first one): training from the start", cfg.resume)
            return None
        log.info("resuming %s from %s", output_dir, last)
        return str(last)
    if cfg.ckpt_path == "last" and not last.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoint in {last.parent} (this run's new output dir). To continue an earlier run, "
            "pass its output dir: python train.py <the same overrides> resume=outputs/<run_name>/<date_time>"
        )
    return cfg.ckpt_path


def _comparable(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=False)
    return {key: value for key, value in container.items() if key not in RESUME_FREE_KEYS}


def check_same_run(cfg: DictConfig) -> None:
    """Refuse to resume a run with another configuration (the data stream and schedules would not match)."""
    saved_file = Path(cfg.output_dir) / RUN_CONFIG
    if not saved_file.is_file():
        return
    saved = _flatten(_comparable(OmegaConf.load(saved_file)))
    now = _flatten(_comparable(cfg))
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key, "<absent>") != now.get(key, "<absent>"))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in changed[:8])
        raise ValueError(
            f"resume={cfg.resume}: this configuration differs from the run's ({saved_file}): {shown}. Resume with the "
            "same overrides as the first command (its whole configuration is in that file), or start a new run "
            "without resume="
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def save_run_config(cfg: DictConfig) -> None:
    """Keep the configuration the run started with (first start only) for `check_same_run`."""
    path = Path(cfg.output_dir) / RUN_CONFIG
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(_comparable(cfg)), path)


def wandb_run_id(output_dir: str | Path) -> str:
    """This run's W&B id: read from ``<output_dir>/wandb_run_id``, or made and written there on the first start,
    so that a resumed run logs into the same W&B run."""
    path = Path(output_dir) / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids: 8 lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _instantiate_logger(node: DictConfig, output_dir: str) -> Any:
    if str(node.get("_target_", "")).split(".")[-1] in ("wandb_logger", "WandbLogger") and node.get("id") is None:
        return instantiate(node, id=wandb_run_id(output_dir), resume="allow")
    return instantiate(node)


def realised_mix(stats: Mapping[str, float]) -> str | None:
    """One line for the model card and ``config.json``: the realised web/chat token and document shares of the
    training stream, and the rows skipped per source and reason (from ``datamodule.stats()``)."""
    if "data/web_docs" not in stats:
        return None
    shares = ", ".join(f"{source} {stats.get(f'data/{source}_token_share', float('nan')):.1%} of tokens "
                       f"({int(stats[f'data/{source}_docs']):,} documents)" for source in SOURCES)
    skipped = {key.removeprefix("data/skipped/"): int(v) for key, v in stats.items() if key.startswith("data/skipped/")}
    return shares + "; skipped rows: " + (", ".join(f"{k} {v:,}" for k, v in skipped.items()) if skipped else "none")


class RecordDataMix(L.Callback):
    """Before the artifact is written, put the realised data mix (`realised_mix`) and the outlier tokens counted
    (the datamodule's ``outlier_report()``) into the crosscoder's metadata: ``config.json`` then states them, and
    the card (its recipe; its outlier table, also when analyze.py rewrites it without the training stream)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = getattr(trainer.datamodule, "stats", None)
        line = realised_mix(stats()) if stats is not None else None
        if line is not None:
            log.info("realised data mix: %s", line)
            pl_module.crosscoder.metadata["realised_data_mix"] = line
        report = getattr(trainer.datamodule, "outlier_report", None)
        outliers = report() if report is not None else {}
        if outliers:
            log.info("outlier tokens: %s", outliers)
            pl_module.crosscoder.metadata[OUTLIERS] = outliers


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` for the rest of the process (model pair build, activations, the
    crosscoder's steps); ``None`` leaves torch's default (one thread per core)."""
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch threads: %d", torch.get_num_threads())


def build_pair(group: ModelPairConfig | Mapping[str, Any]) -> Any:
    """The model pair of the ``model_pair`` group (a target of the user's own: built by Hydra)."""
    if isinstance(group, ModelPairConfig):
        from crosscoder_pl.models.pair import load_model_pair

        return load_model_pair(**group.model_dump())
    return instantiate(thaw(group))


def normalisation(center: bool, scale_by: str) -> str:
    """The model card's words for the per-model normalisation (docs/method.md, "Per-model normalisation")."""
    x = "x - mean" if center else "x"
    spread = f"mean||{x}||" if scale_by == "mean_norm" else "sqrt(mean||x - mean||^2)"
    return f"{'per-model mean subtracted, ' if center else ''}per-model scalar sqrt(d_model)/{spread}"


def recipe(cfg: DictConfig, pair: Any) -> dict[str, Any]:
    """Facts about the run for the exported ``config.json`` metadata and the model card's recipe."""
    c, t = cfg.crosscoder, cfg.trainer
    tokens = t.max_steps * cfg.data.batch_size * t.devices * t.num_nodes if isinstance(t.devices, int) else None
    data = cfg.data
    dropped = f", tokens above {data.outlier_factor}x the median norm dropped" if data.get("drop_outliers") else ""
    sources = (
        f"web: {data.web.get('path', 'embedded corpus (web half)')}, chat: {data.chat.get('path', 'embedded corpus (chat half)')}, "
        f"mix {dict(data.mix)}" if "web" in data else f"activation cache {data.get('path')}"
    )
    sparsity = ({"k_start": c.k_start if c.k_start is not None else c.k, "k_anneal_steps": c.k_anneal_steps}
                if c.get("sparsity", "batchtopk") == "batchtopk" else
                {"sparsity": c.sparsity, "l1_coef": c.l1_coef, "l1_warmup_frac": c.l1_warmup_frac})
    facts = {
        "base_model": pair.base_id, "chat_model": pair.chat_id, "layer": pair.layer,
        **sparsity,
        "training_tokens": tokens, "data": sources,
        "normalisation": f"{normalisation(c.get('center', True), c.get('scale_by', 'mean_norm'))}, BOS and padding "
                         f"dropped{dropped}",
        "lr": c.lr, "lr_decay_frac": c.lr_decay_frac, "gradient_clip_val": t.gradient_clip_val,
        "aux_coef": c.aux_coef, "dead_after_tokens": c.dead_after_tokens, "loss": c.loss, "seed": cfg.seed,
        "language_model_dtype": cfg.model_pair.get("dtype"),
        "command": shlex.join(["python", *sys.argv]),
    }
    if "l1_coef" in sparsity:
        del facts["aux_coef"]  # no AuxK in an L1 crosscoder (the config refuses a nonzero aux_coef)
    return facts


def train(run: RunConfig) -> dict[str, float]:
    """Train a crosscoder as configured by ``run`` (`check_config`'s); write the artifact to its
    ``artifact_dir``; return final metrics. ``run.composed`` gives the groups of targets only (logger,
    callbacks), the paths, and the configuration the run records."""
    cfg = run.composed
    ckpt_path = resume_checkpoint(cfg)
    save_run_config(cfg)
    set_threads(run.threads)
    L.seed_everything(run.seed, workers=True)
    torch.set_float32_matmul_precision(run.matmul_precision)  # "high": TF32 tensor cores on Ampere and newer
    pair = build_pair(run.model_pair)
    datamodule = build_data(run.data, pair)
    module = CrossCoderModule(pair.d_model, run.crosscoder, metadata=recipe(cfg, pair))
    train_config = OmegaConf.to_container(cfg, resolve=True)
    train_config["crosscoder"]["n_latents"] = module.cfg.n_latents  # resolved from the expansion, if any
    train_config["model_pair"]["layer"] = pair.layer  # resolved when null
    # The artifact is what train.py is for: its writer is not one of the optional callbacks of conf/callbacks.
    artifact = WriteArtifact(cfg.artifact_dir, run.analysis, train_config, run.dashboard)
    callbacks = [*(instantiate(c) for c in cfg.callbacks.values()), RecordDataMix(), artifact]
    loggers = [_instantiate_logger(c, cfg.output_dir) for c in cfg.logger.values()]
    trainer = L.Trainer(**run.trainer.arguments(), callbacks=callbacks, logger=loggers)
    # weights_only: torch's restricted unpickler, which builds tensors and plain values only (check_checkpoint).
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("artifact: %s", Path(cfg.artifact_dir).resolve())
    print(f"\nartifact written to {Path(cfg.artifact_dir).resolve()}")
    return metrics
