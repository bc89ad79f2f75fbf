"""The run's configuration as frozen pydantic models, validated once at start-up before anything loads.

Hydra composes ``conf/``; `RunConfig.from_hydra` reads the composed ``DictConfig`` into one `RunConfig`, and that
object is what the application receives (`crosscoder_pl.training.train`, `CrossCoderModule`, the data modules,
the analyses, the dashboard). Every rule about a value lives here, once:

- each field's type (``int`` refuses ``true`` and ``"64"``) and range (``Field(ge=..., gt=...)``);
- the rules between fields (``k <= n_latents``, ``k_start >= k``, the mix summing to 1, ...) and between groups
  (the threshold starting before ``max_steps``) in each model's ``model_validator``;
- unknown (misspelt) keys: a group takes its fields and Hydra's own keys (``_target_``, ...); the trainer group
  every argument of its target; a node of the user's own ``_target_`` the arguments of that target.

Every refusal is a `ConfigError` (a ValueError) naming the full dotted key, the value and the fix, e.g.
``crosscoder.k=5000 is larger than the dictionary (crosscoder.n_latents=2048): choose crosscoder.k <= ...``;
the groups' base and the wording of pydantic's errors live in `crosscoder_pl.config_group`, so that this module
holds the declarations only. It imports no model code.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from omegaconf import DictConfig
from pydantic import Field, PrivateAttr, Tag, model_validator

from crosscoder_pl.config_group import (
    HYDRA_KEYS,
    AnyMapping,
    Bool,
    ConfigError,
    Float,
    Group,
    Int,
    OwnTarget,
    Str,
    _bounded,
    _by_target,
    _join,
    frozen,
    plain,
    target_parameters,
    thaw,
)
from crosscoder_pl.names import MODELS, SOURCES, SourceName


# ------------------------------------------------------------------------------------------- the size rule
def check_sizes(k: int, k_start: int, n_latents: int | None, at: str = "crosscoder") -> None:
    """The dictionary's size rule: ``k <= k_start <= n_latents`` (BatchTopK keeps k of n_latents; annealing goes
    from k_start down to k); ``n_latents`` None: not known yet (an expansion before d_model)."""
    key = lambda name: _join(at, name)  # noqa: E731
    if n_latents is not None and k > n_latents:
        raise ConfigError(f"{key('k')}={k} is larger than the dictionary ({key('n_latents')}={n_latents}): "
                          f"choose {key('k')} <= {n_latents}")
    if k_start < k:
        raise ConfigError(f"{key('k_start')}={k_start} is smaller than {key('k')}={k}: annealing goes "
                          f"from k_start down to k; set {key('k_start')} >= {k} (or null)")
    if n_latents is not None and k_start > n_latents:
        raise ConfigError(f"{key('k_start')}={k_start} is larger than the dictionary "
                          f"({key('n_latents')}={n_latents}): choose {key('k_start')} <= {n_latents}")


# ------------------------------------------------------------------------------------------- the groups
class CrossCoderConfig(Group):
    """``crosscoder``: what `crosscoder_pl.module.CrossCoderModule` trains (its docstring says what each field
    does), and ``expansion``, which sizes the dictionary from d_model (`resolve`)."""

    KEY: ClassVar[str] = "crosscoder"
    TARGET: ClassVar[str] = "crosscoder_pl.module.CrossCoderModule"

    k: Int | None = Field(
        None, ge=1, description="latents kept per token (BatchTopK k) at the end of the annealing, e.g. 64 (null for l1)")
    n_latents: Int | None = Field(None, ge=1, description="the dictionary size (null: expansion * d_model)")
    expansion: Int | None = Field(None, ge=1, description="latents per d_model dimension (null: use n_latents)")
    k_start: Int | None = Field(None, ge=1, description="k at step 0, annealed down to k (null: k)")
    k_anneal_steps: Int = Field(
        0, ge=0, description="the steps over which k goes from k_start down to k (0: no annealing)")
    sparsity: Literal["batchtopk", "l1"] = Field(
        "batchtopk", description="how codes are made sparse (crosscoder_pl.step.SPARSITIES): BatchTopK's selection, "
                                 "or ReLU codes with the L1 penalty (crosscoder=embedded_l1 / papergrade_l1)")
    l1_coef: Float | None = Field(
        None, gt=0, description="the L1 penalty's coefficient λ (sparsity=l1 only), e.g. 1.0")
    l1_warmup_frac: Float = Field(
        0.05, ge=0, le=1, description="the first fraction of the steps over which λ rises linearly from 0 (l1 only)")
    lr: Float = Field(1e-4, gt=0, description="Adam's learning rate, e.g. 1e-4")
    betas: tuple[_bounded(Float, ge=0, lt=1), _bounded(Float, ge=0, lt=1)] = Field(
        (0.9, 0.999), description="Adam's betas, e.g. [0.9, 0.999]")
    lr_decay_frac: Float = Field(
        0.2, ge=0, le=1, description="the last fraction of the steps over which the lr decays to 0")
    aux_coef: Float = Field(1 / 32, ge=0, description="weight of the AuxK loss (1/32; 0 turns it off)")
    k_aux: Int | None = Field(None, ge=1, description="dead latents AuxK uses per token (null: d_model / 2)")
    dead_after_tokens: Int = Field(
        10_000_000, ge=1, description="tokens without firing after which a latent is dead")
    threshold_decay: Float = Field(
        0.999, gt=0, lt=1, description="EMA decay of the inference threshold, e.g. 0.999")
    threshold_start_step: Int | None = Field(
        None, ge=0, description="first step that updates the threshold (null: end of k annealing)")
    scales: tuple[_bounded(Float, gt=0), _bounded(Float, gt=0)] | None = Field(
        None, description="per-model scales [base, chat] (null: estimated)")
    center: Bool = Field(True, description="subtract each model's activation mean before the encoder (false: the "
                                           "uncentred crosscoder of earlier versions)")
    scale_tokens: Int = Field(8192, ge=1, description="tokens the means, scales and bias inits are estimated from")
    scale_by: Literal["mean_norm", "std"] = Field("mean_norm", description="what the estimated scales equalise")
    b_dec_init: Literal["mean", "zeros"] = Field("mean", description="the decoder bias's start")
    b_enc_init: Literal["center", "zeros"] = Field("center", description="the encoder bias's start")
    enc_init: Literal["equal_variance", "transpose"] = Field("transpose", description="the encoder's start")
    dec_init_norm: Float = Field(0.08, gt=0, description="the norm of each decoder row at init, e.g. 0.08")
    loss: Literal["mse", "l2"] = Field("mse", description="the reconstruction loss (crosscoder_pl.step.LOSSES)")
    step_impl: Literal["sparse", "dense"] = Field(
        "sparse", description="the training step (crosscoder_pl.step.STEP_IMPLS)")
    metrics_window_steps: Int = Field(
        50, ge=1, description="the steps pooled by the training variance explained and tokens/s (e.g. 50)")

    # The keys of one sparsity that mean nothing for the other, with the value that says "not used".
    BATCHTOPK_ONLY: ClassVar[dict[str, Any]] = {
        "k": None, "k_start": None, "k_anneal_steps": 0, "aux_coef": 0.0, "k_aux": None, "threshold_start_step": None,
        "step_impl": "dense"}
    L1_ONLY: ClassVar[dict[str, Any]] = {"l1_coef": None}

    @model_validator(mode="after")
    def _sizes(self) -> CrossCoderConfig:
        if self.n_latents is None and self.expansion is None:
            raise ConfigError(f"{self.key('n_latents')} and {self.key('expansion')} are both null: set one "
                              f"(e.g. {self.key('n_latents')}=2048 or {self.key('expansion')}=16)")
        self._check_sparsity_keys()
        if self.sparsity == "batchtopk":
            # With an expansion, the dictionary size is known once d_model is (`resolve` checks again then).
            check_sizes(self.k, self.start_k, self.n_latents if self.expansion is None else None, self.KEY)
        return self

    def _check_sparsity_keys(self) -> None:
        """A key of the other sparsity set to a working value is refused, never silently ignored; the one each
        needs is required."""
        needs, unused = ("k", self.L1_ONLY) if self.sparsity == "batchtopk" else ("l1_coef", self.BATCHTOPK_ONLY)
        if getattr(self, needs) is None:
            example = "k=64" if needs == "k" else "l1_coef=1.0"
            raise ConfigError(f"{self.key(needs)} is null, and {self.key('sparsity')}={self.sparsity} needs it: set "
                              f"it (e.g. {self.key(example)})")
        wrong = [name for name, off in unused.items() if getattr(self, name) != off]
        if wrong:
            shown = ", ".join(f"{self.key(n)}={getattr(self, n)}" for n in wrong)
            fix = " ".join(f"{self.key(n)}={'null' if unused[n] is None else unused[n]}" for n in wrong)
            preset = "crosscoder=embedded_l1 (or papergrade_l1)" if self.sparsity == "l1" else "crosscoder=embedded"
            raise ConfigError(f"{shown}: not used by {self.key('sparsity')}={self.sparsity}; set {fix}, or start from "
                              f"{preset}, which does")

    @property
    def start_k(self) -> int | None:
        return self.k if self.k_start is None else self.k_start

    @property
    def threshold_start(self) -> int:
        """The first step that updates the inference threshold."""
        return self.k_anneal_steps if self.threshold_start_step is None else self.threshold_start_step

    def resolve(self, d_model: int) -> CrossCoderConfig:
        """This configuration with ``n_latents`` set from ``expansion`` (then null), checked again with it."""
        if self.expansion is None:
            return self
        n_latents = self.expansion * d_model
        if self.n_latents not in (None, n_latents):
            raise ConfigError(
                f"{self.key('n_latents')}={self.n_latents} and {self.key('expansion')}={self.expansion} (d_model "
                f"{d_model}: {n_latents} latents) disagree: set {self.key('n_latents')}=null or "
                f"{self.key('expansion')}=null"
            )
        return type(self)(**{**self.model_dump(), "n_latents": n_latents, "expansion": None})


class TextSourceConfig(Group):
    """``data.web`` / ``data.chat`` without a target: `crosscoder_pl.data.sources.SourceConfig`'s fields."""

    KEY: ClassVar[str] = "data.web"
    path: Str = Field(description="a hub dataset id or a datasets builder (json, parquet, ...)")
    field: Str = Field(description="the row field holding the text (web) or the conversation (chat)")
    name: Str | None = Field(None, description="the dataset's configuration name")
    split: Str = Field("train", description="the split read")
    data_files: Str | tuple[Str, ...] | None = Field(None, description="files or globs (path=json, parquet, ...)")


class EmbeddedSourceConfig(Group):
    """``data.web`` / ``data.chat`` of the embedded corpus (`crosscoder_pl.data.sources.embedded_source`)."""

    KEY: ClassVar[str] = "data.web"
    TARGET: ClassVar[str] = "crosscoder_pl.data.sources.embedded_source"
    source: SourceName = Field(description="the corpus half")


Source = Annotated[
    Annotated[TextSourceConfig, Tag("TextSourceConfig")] | Annotated[EmbeddedSourceConfig, Tag("EmbeddedSourceConfig")]
    | Annotated[OwnTarget, Tag("own")],
    _by_target(TextSourceConfig, EmbeddedSourceConfig),
]


def check_mix(mix: Mapping[str, float] | Sequence[float], key: str = "data.mix") -> tuple[float, float]:
    """``(p_web, p_chat)`` of a mix given as ``{"web": p, "chat": p}`` or ``[p_web, p_chat]``: >= 0, summing to 1."""
    example = f"e.g. {key}={{web: 0.5, chat: 0.5}}"
    if isinstance(mix, Mapping):
        if set(mix) != set(SOURCES):
            raise ConfigError(f"{key}={dict(mix)} must have exactly the keys {SOURCES}: {example}")
        values = tuple(mix[source] for source in SOURCES)
    elif isinstance(mix, Sequence) and not isinstance(mix, str):
        if len(mix) != 2:
            raise ConfigError(f"{key}={list(mix)} must have two probabilities [web, chat]: {example}")
        values = (mix[0], mix[1])
    else:
        raise ConfigError(f"{key}={mix!r} must be a mapping of probabilities: {example}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{key}: the probabilities must be numbers, got web={values[0]!r}, chat={values[1]!r}; {example}")
    web, chat = float(values[0]), float(values[1])
    if min(web, chat) < 0 or abs(web + chat - 1) > 1e-6:
        raise ConfigError(f"{key} probabilities must be >= 0 and sum to 1, got web={web}, chat={chat} "
                          f"(sum {web + chat:.6g}); {example}")
    return web, chat


def check_outliers(factor: float | None, drop: bool, at: str = "data") -> None:
    """Dropping outliers needs the factor that defines them."""
    if drop and factor is None:
        raise ConfigError(f"{_join(at, 'drop_outliers')}=true but {_join(at, 'outlier_factor')}=null: no token is an "
                          f"outlier without a factor; set {_join(at, 'outlier_factor')} (e.g. 3.0, a multiple of the "
                          f"median norm) or {_join(at, 'drop_outliers')}=false")


RankSplit = Literal["batch", "documents"]


class StreamDataConfig(Group):
    """``data`` streaming text through the pair: `crosscoder_pl.data.datamodule.ActivationDataModule`."""

    KEY: ClassVar[str] = "data"
    TARGET: ClassVar[str] = "crosscoder_pl.data.datamodule.ActivationDataModule"

    web: Source = Field(description="the web source")
    chat: Source = Field(description="the chat source")
    mix: frozen(dict[str, Float]) | tuple[Float, Float] = Field(
        (0.5, 0.5), description="the web/chat document mix, summing to 1")
    seed: Int = Field(0, description="the mix's and the shuffle buffer's seed")
    seq_len: Int = Field(1024, ge=2, description="tokens per sequence, BOS included")
    batch_size: Int = Field(4096, ge=1, description="tokens per crosscoder step")
    text_batch_size: Int = Field(16, ge=1, description="sequences per language-model forward")
    buffer_tokens: Int = Field(
        2**18, ge=1, description="the shuffle buffer's size in tokens (at least twice batch_size)")
    val_tokens: Int = Field(
        8192, ge=1, description="the held-out tokens of validation and of the end-of-training analyses (e.g. 16384)")
    heldout_fraction: Float = Field(
        0.01, gt=0, lt=1, description="the share of documents held out (by hash) for validation")
    outlier_factor: Float | None = Field(
        3.0, gt=0, description="a token whose norm in a model exceeds this multiple of that model's median norm is "
                               "an outlier: counted per model, kept unless drop_outliers (null: none counted)")
    drop_outliers: Bool = Field(
        False, description="drop the outlier tokens instead of only counting them (a non-null outlier_factor used "
                           "to drop them: to keep that, set drop_outliers=true)")
    padding_side: Literal["left", "right"] = Field("right", description="where sequences are padded")
    num_workers: Int = Field(
        0, ge=0, description="DataLoader workers (0: the main process, needed for an exact resume)")
    n_probes: Int = Field(32, ge=1, description="held-out sequences of the causal and splice-in analyses")
    probe_len: Int = Field(64, ge=2, description="tokens per probe sequence, BOS included")
    rank_split: RankSplit = Field("batch", description="how DDP ranks share the data")
    memo_gb: Float = Field(
        0.0, ge=0, description="GiB of the first pass's activations kept for the later passes (0: off)")

    @model_validator(mode="after")
    def _rules(self) -> StreamDataConfig:
        check_mix(self.mix, self.key("mix"))
        check_outliers(self.outlier_factor, self.drop_outliers, self.KEY)
        if self.buffer_tokens < 2 * self.batch_size:
            raise ConfigError(
                f"{self.key('buffer_tokens')}={self.buffer_tokens} must be at least twice {self.key('batch_size')}="
                f"{self.batch_size}: the shuffle buffer serves batches while half of it stays behind; set "
                f"{self.key('buffer_tokens')}={2 * self.batch_size} or more"
            )
        for role in SOURCES:
            source = getattr(self, role)
            if isinstance(source, EmbeddedSourceConfig) and source.source != role:
                raise ConfigError(f"{self.key(role)}.source={source.source!r} is the other half of the corpus: set "
                                  f"{self.key(role)}.source={role}")
        return self

    @property
    def mix_pair(self) -> tuple[float, float]:
        """``(p_web, p_chat)``."""
        return check_mix(self.mix, self.key("mix"))


class CachedDataConfig(Group):
    """``data=cached``: `crosscoder_pl.data.cached.CachedActivationDataModule`."""

    KEY: ClassVar[str] = "data"
    TARGET: ClassVar[str] = "crosscoder_pl.data.cached.CachedActivationDataModule"

    path: Str = Field(description="the activation cache written by python cache_activations.py out=DIR")
    batch_size: Int = Field(4096, ge=1, description="tokens per crosscoder step")
    seed: Int = Field(0, description="the shard and row order's seed")
    num_workers: Int = Field(0, ge=0, description="DataLoader workers")
    rank_split: RankSplit = Field("batch", description="how DDP ranks share the data")
    outlier_factor: Float | None = Field(
        None, gt=0, description="a token is an outlier in a model above this multiple of the model's median norm "
                                "over its batch (null: the factor the cache was written with)")
    drop_outliers: Bool = Field(
        False, description="drop the outlier tokens of each batch and of the held-out set (false: counted, kept)")


class TrainerConfig(Group):
    """``trainer``: the Lightning Trainer arguments this application relies on. The group may hold any other
    argument of its ``_target_`` (checked against its signature, left to Lightning; kept in ``others``)."""

    KEY: ClassVar[str] = "trainer"
    TARGET: ClassVar[str] = "lightning.pytorch.Trainer"
    OPEN: ClassVar[bool] = True

    max_steps: Int = Field(ge=1, description="the training steps (the lr schedule and the stream need a finite run)")
    val_check_interval: _bounded(Int, ge=1) | Str | AnyMapping | None = Field(
        None, description="the training steps between validations (e.g. 500; the stream has no epochs to take a "
                          "fraction of)")
    devices: Int | Str | tuple[Int, ...] = Field(
        "auto", description="devices per node: a count (-1: all), 'auto' or a list of ids")
    num_nodes: Int = Field(1, ge=1, description="machines in a multi-node run")
    strategy: Str | AnyMapping = Field("auto", description="Lightning's strategy, e.g. auto, ddp")
    accelerator: Str | AnyMapping = Field("auto", description="Lightning's accelerator, e.g. auto, cpu, gpu")
    gradient_clip_val: Float | None = Field(None, ge=0, description="gradient norm clipping (null: none)")
    others: AnyMapping = Field({}, description="every other argument of lightning.pytorch.Trainer")

    @model_validator(mode="after")
    def _devices(self) -> TrainerConfig:
        d = self.devices
        if (isinstance(d, int) and d != -1 and d < 1) or (isinstance(d, tuple) and not d):
            raise ConfigError(f"{self.key('devices')}={thaw(d)!r} must be a count >= 1, -1 (all), 'auto' or a "
                              "non-empty list of device ids: e.g. trainer.devices=1")
        return self

    @property
    def processes(self) -> int | None:
        """Training processes (devices x nodes) when the device count is explicit, else None."""
        return self.devices * self.num_nodes if isinstance(self.devices, int) and self.devices > 0 else None

    def arguments(self) -> dict[str, Any]:
        """The Trainer's keyword arguments, as plain values."""
        values = self.model_dump(exclude={"others"})
        return {**{k: thaw(v) for k, v in values.items()}, **thaw(self.others)}


class ModelPairConfig(Group):
    """``model_pair`` loaded from names: `crosscoder_pl.models.pair.load_model_pair`."""

    KEY: ClassVar[str] = "model_pair"
    TARGET: ClassVar[str] = "crosscoder_pl.models.pair.load_model_pair"

    base: Str | None = Field(description="the base model: a save_pretrained directory, a .gguf file or a hub id")
    chat: Str | None = Field(description="its chat fine-tune (same kinds of name)")
    layer: Int | None = Field(ge=0, description="the hooked decoder block, 0-based (null: the middle one)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="the language models' dtype")
    device: Str = Field("auto", description="auto, cpu, cuda or cuda:N")
    token: Str | None = Field(None, description="a Hugging Face token (null: the login's)")
    seq_len: Int | None = Field(
        None, ge=2, description="the longest sequence read, checked against the models' positions")
    chat_template: Str | None = Field(None, description="a Jinja chat template, or a file holding one")

    @model_validator(mode="after")
    def _device(self) -> ModelPairConfig:
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{self.key('device')}={self.device!r} must be auto, cpu, cuda or cuda:N")
        return self


def check_models(node: Mapping[str, Any] | ModelPairConfig) -> None:
    """Both models named (``+experiment=own_pair`` leaves them to the command line)."""
    get = (lambda role: getattr(node, role)) if isinstance(node, ModelPairConfig) else node.get
    missing = [f"model_pair.{role}" for role in MODELS if get(role) is None]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not set: name both models, e.g. python train.py +experiment=own_pair "
            "model_pair.base=DIR model_pair.chat=DIR (a save_pretrained directory, a .gguf file or a hub id)"
        )


class TaxonomySettings(Group):
    KEY: ClassVar[str] = "analysis.taxonomy"
    enabled: Bool = Field(description="classify the latents by relative decoder norm")
    base_only_max: Float = Field(ge=0, le=1, description="base_only: delta <= base_only_max")
    chat_only_min: Float = Field(ge=0, le=1, description="chat_only: delta >= chat_only_min")
    shared_min: Float = Field(ge=0, le=1, description="shared: shared_min <= delta < shared_max")
    shared_max: Float = Field(ge=0, le=1, description="shared: shared_min <= delta < shared_max")

    @model_validator(mode="after")
    def _order(self) -> TaxonomySettings:
        order = ("base_only_max", "shared_min", "shared_max", "chat_only_min")
        values = [getattr(self, name) for name in order]
        if not values[0] < values[1] < values[2] <= values[3]:
            shown = ", ".join(f"{self.key(n)}={v}" for n, v in zip(order, values))
            raise ConfigError(f"{shown}: the classes need base_only_max < shared_min < shared_max <= chat_only_min "
                              "(Minder et al.: 0.1, 0.4, 0.6, 0.9)")
        return self


class ScalingSettings(Group):
    KEY: ClassVar[str] = "analysis.scaling"
    enabled: Bool = Field(description="latent scaling (base uselessness) of chat-only latents")
    max_chat_only: Int = Field(ge=1, description="chat-only latents tested")
    max_shared: Int = Field(ge=1, description="shared latents tested as the comparison group")
    seed: Int = Field(description="the sample's seed")
    nu_eps_max: Float = Field(gt=0, description="chat-specific: nu_eps < nu_eps_max")
    nu_r_max: Float = Field(gt=0, description="chat-specific: nu_r < nu_r_max")
    top_latents: Int = Field(ge=0, description="chat-specific latents listed in the card (0: none)")
    top_tokens: Int = Field(ge=1, description="probe tokens shown per listed latent")
    # The reference's reliability filter (issue 23): only latents with nu_min <= nu_r, nu_eps <= nu_max are ranked
    # or called chat-specific.
    nu_min: Float = Field(description="reliability filter: nu_min <= nu_r and nu_eps (Minder et al.: -0.1)")
    nu_max: Float = Field(description="reliability filter: nu_r and nu_eps <= nu_max (Minder et al.: 2)")

    @model_validator(mode="after")
    def _filter(self) -> ScalingSettings:
        if not self.nu_min < self.nu_max:
            raise ConfigError(f"{self.key('nu_min')}={self.nu_min}, {self.key('nu_max')}={self.nu_max}: the filter "
                              "needs nu_min < nu_max (Minder et al.: -0.1 and 2)")
        return self


class DiagnosticsSettings(Group):
    """Sparsity-artifact diagnostics (issue 23; crosscoder_pl.analysis.diagnostics)."""

    KEY: ClassVar[str] = "analysis.diagnostics"
    enabled: Bool = Field(description="complete shrinkage, latent decoupling (twins) and template share")
    interval: Float = Field(gt=0, lt=1, description="central mass of the shared latents' nu that is shared-like")
    twin_min_cosine: Float = Field(ge=-1, le=1, description="twins: decoder cosine above this")
    template_majority: Float = Field(ge=0, lt=1, description="fires mainly on template tokens: share above this")


class CausalSettings(Group):
    KEY: ClassVar[str] = "analysis.causal"
    enabled: Bool = Field(description="ablation-based causal equivalence of shared latents")
    max_latents: Int = Field(ge=1, description="the most frequent shared latents tested")
    latents_per_batch: Int | None = Field(
        ge=1, description="latents per forward (null: as many as the memory budget allows)")


class SpliceSettings(Group):
    KEY: ClassVar[str] = "analysis.splice"
    enabled: Bool = Field(description="CE / KL with the layer replaced by its reconstruction")


class PatchingSettings(Group):
    KEY: ClassVar[str] = "analysis.patching"
    enabled: Bool = Field(description="base→chat latent patching: KL(chat || patched) on held-out chats")
    max_chats: Int = Field(ge=1, description="held-out chats scored (the data module's first ones)")
    first_reply_tokens: Int = Field(ge=1, description="the first tokens of each reply scored apart (paper: 9)")


class AnalysisConfig(Group):
    """``analysis`` (conf/analysis): the end-of-training analyses; every key is required."""

    KEY: ClassVar[str] = "analysis"
    chunk_tokens: Int = Field(ge=1, description="held-out tokens encoded per step")
    memory_budget_mb: Float | None = Field(
        gt=0, description="working memory of the causal and splice-in forwards (null: from the device)")
    taxonomy: TaxonomySettings = Field(description="Δnorm classes")
    scaling: ScalingSettings = Field(description="latent scaling")
    causal: CausalSettings = Field(description="causal validation")
    splice: SpliceSettings = Field(description="splice-in evaluation")
    diagnostics: DiagnosticsSettings = Field(description="sparsity-artifact diagnostics")
    patching: PatchingSettings = Field(description="base→chat latent patching")

    @model_validator(mode="after")
    def _needs(self) -> AnalysisConfig:
        needs = [g for g in ("scaling", "causal", "diagnostics", "patching") if getattr(self, g).enabled]
        if needs and not self.taxonomy.enabled:
            raise ConfigError(f"{' and '.join(self.key(g) for g in needs)} use the taxonomy's classes: enable "
                              f"{self.key('taxonomy')} ({self.key('taxonomy')}.enabled=true) or disable them")
        return self


class ObjectiveConfig(Group):
    KEY: ClassVar[str] = "objective"
    max_dead_frac: Float = Field(0.1, ge=0, le=1, description="dead fraction above which the sweep objective is "
                                                              "penalised")
    penalty: Float = Field(10.0, ge=0, description="penalty per unit of dead fraction above max_dead_frac")


class ServerSettings(Group):
    """``dashboard.server``: where the app listens and what a request may ask
    (`crosscoder_pl.dashboard.server`)."""

    KEY: ClassVar[str] = "dashboard.server"
    host: Str = Field("127.0.0.1", description="interface to bind (127.0.0.1: this machine only)")
    port: Int = Field(8765, ge=0, lt=65536, description="TCP port")
    max_request_bytes: Int = Field(65536, ge=1, description="largest request body accepted (413 above)")
    max_text_chars: Int = Field(20000, ge=1, description="longest prompt text, all turns together, in characters")
    max_messages: Int = Field(32, ge=1, description="most chat turns")
    max_prompt_tokens: Int = Field(512, ge=1, description="longest prompt in tokens, BOS and chat template included")
    max_chosen_latents: Int = Field(16, ge=1, description="most latents shown in context per request")
    top_latents: Int = Field(8, ge=1, description="latents listed per token")
    top_next_tokens: Int = Field(10, ge=1, description="next tokens listed before / after an intervention")
    max_factor: Float = Field(100.0, gt=0, description="largest |factor| of a scaling intervention")


class DashboardSettings(Group):
    """The offline part of ``conf/dashboard`` (`crosscoder_pl.dashboard.offline`); its ``server`` node is
    `ServerSettings` (read with `server`)."""

    KEY: ClassVar[str] = "dashboard"
    UNTYPED: ClassVar[tuple[str, ...]] = ("server",)
    enabled: Bool = Field(True, description="write artifact/dashboard/ with the analyses")
    max_tokens: Int | None = Field(None, ge=1, description="held-out tokens scanned (null: all of data.val_tokens)")
    top_n: Int = Field(20, ge=1, description="examples kept per latent and source (web, chat)")
    context_before: Int = Field(24, ge=0, description="tokens shown before each example's token")
    context_after: Int = Field(8, ge=0, description="tokens shown after each example's token")
    histogram_bins: Int = Field(32, ge=2, description="bins of each latent's activation histogram (even)")
    logit_lens_tokens: Int = Field(10, ge=1, description="promoted and suppressed tokens listed per model")
    latents_per_shard: Int = Field(128, ge=1, description="latents per data file")
    chunk_tokens: Int = Field(
        4096, ge=1, description="held-out tokens encoded at a time (memory: chunk_tokens * n_latents floats)")
    tiny_dashboard_export: Bool = Field(True, description="also write max_activation_examples.db")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        unknown = sorted(set(data) - set(cls.model_fields) - {*cls.UNTYPED, *HYDRA_KEYS}) if isinstance(
            data, Mapping) else []
        if unknown:
            close = {k: difflib.get_close_matches(k, list(cls.model_fields), n=1) for k in unknown}
            hints = "".join(f" (did you mean {cls.KEY}.{c[0]}?)" for c in close.values() if c)
            raise ConfigError(f"unknown dashboard settings {unknown}{hints}; known: {list(cls.model_fields)} and "
                              "server")
        return data

    @model_validator(mode="after")
    def _even(self) -> DashboardSettings:
        if self.histogram_bins % 2:
            raise ConfigError(f"{self.key('histogram_bins')}={self.histogram_bins} must be an even number >= 2")
        return self

    @staticmethod
    def server(node: Mapping[str, Any] | None) -> ServerSettings:
        """The ``server`` node of a ``conf/dashboard`` mapping (absent: the defaults)."""
        return ServerSettings.read(dict((node or {}).get("server") or {}))


def target_keys(target: str | None) -> set[str] | None:
    """The keys a node with this ``_target_`` takes: the fields of the group that configures it (the data modules,
    the model pair, the crosscoder, a source), else the target's own arguments (None: unknown, or any keyword)."""
    for group in (StreamDataConfig, CachedDataConfig, ModelPairConfig, CrossCoderConfig, EmbeddedSourceConfig):
        if group.TARGET == target:
            return set(group.model_fields)
    return target_parameters(target)


class RunConfig(Group):
    """The composed ``conf/train.yaml``: the typed groups and the run's own settings; ``_between`` holds the
    rules between groups. Build it with `from_hydra`; ``composed`` is the DictConfig it was read from (the
    untyped groups: logger, callbacks, paths; and what the run records)."""

    # Not typed here: Hydra's node, the paths derived from it, and groups of targets only.
    UNTYPED: ClassVar[tuple[str, ...]] = ("hydra", "output_dir", "artifact_dir", "logger", "callbacks")

    crosscoder: CrossCoderConfig = Field(description="the crosscoder")
    data: Annotated[
        Annotated[StreamDataConfig, Tag("StreamDataConfig")] | Annotated[CachedDataConfig, Tag("CachedDataConfig")]
        | Annotated[OwnTarget, Tag("own")],
        _by_target(StreamDataConfig, CachedDataConfig),
    ] = Field(description="the data module")
    trainer: TrainerConfig = Field(description="the Lightning Trainer")
    model_pair: Annotated[
        Annotated[ModelPairConfig, Tag("ModelPairConfig")] | Annotated[OwnTarget, Tag("own")],
        _by_target(ModelPairConfig),
    ] = Field(description="the language models")
    analysis: AnalysisConfig = Field(description="the end-of-training analyses")
    dashboard: DashboardSettings = Field(DashboardSettings(), description="the latent dashboards")
    objective: ObjectiveConfig = Field(ObjectiveConfig(), description="what train.py returns to a sweeper")
    seed: Int = Field(0, description="the run's seed")
    threads: Int | None = Field(
        None, ge=1, description="torch CPU threads for the run (null: torch's default, one per core)")
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "high", description="torch.set_float32_matmul_precision")
    run_name: Str = Field("crosscoder", description="names the output directory")
    resume: Str | None = Field(
        None, description="an earlier run's output dir to continue (outputs/<run_name>/<date_time>)")
    ckpt_path: Str | None = Field(None, description="a checkpoint file to start from, or last / best / hpc")
    _composed: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _between(self) -> RunConfig:
        check_models(self.model_pair)
        c, t = self.crosscoder, self.trainer
        if c.threshold_start >= t.max_steps:
            raise ConfigError(
                f"the inference threshold starts at step {c.threshold_start} (crosscoder.threshold_start_step, "
                f"default crosscoder.k_anneal_steps={c.k_anneal_steps}) but training stops at trainer.max_steps="
                f"{t.max_steps}: the saved crosscoder would have no threshold; raise trainer.max_steps or lower them"
            )
        return self

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """The typed view of a composed training config (after Hydra composition, before anything is built).
        Unknown top-level keys are refused; the groups of `UNTYPED` are left to their targets (unresolved)."""
        run = cls.read(plain(cfg, skip=cls.UNTYPED) if isinstance(cfg, DictConfig) else cfg)
        run._composed = cfg
        return run

    @property
    def composed(self) -> Any:
        """The composed config this was read from (None when built otherwise)."""
        return self._composed

    def resolve(self, d_model: int) -> RunConfig:
        """With the dictionary size known (``crosscoder.expansion * d_model``), checked again."""
        run = self.model_copy(update={"crosscoder": self.crosscoder.resolve(d_model)})
        run._composed = self._composed
        return run
