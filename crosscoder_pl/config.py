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
`config_error` turns pydantic's ValidationError into it. This module imports no model code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types as at_
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PrivateAttr,
    Strict,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from crosscoder_pl.names import MODELS, SOURCES, SourceName

# Keys Hydra's instantiate reads itself: allowed in any group next to its fields.
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
MIX_SOURCES = SOURCES  # the halves of data.mix


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the fix."""


class _Missing:
    """A ``???`` value of the composed config (read as this, refused as ``key=??? must be set``)."""

    def __repr__(self) -> str:
        return "???"


MISSING_VALUE = _Missing()


def _freeze(value: Any) -> Any:
    """Mappings as read-only views, lists as tuples: a frozen group cannot change through its fields either."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts and lists again (for instantiate, YAML and checkpoints)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


# Field types: strict scalars (no "64" for 64, no true for 1), finite numbers, read-only mappings.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Frozen = (AfterValidator(_freeze), PlainSerializer(thaw))
AnyMapping = Annotated[dict[str, Any], *Frozen]


def _bounded(hint: Any, **bounds: float) -> Any:
    return Annotated[hint, Field(**bounds)]


# ------------------------------------------------------------------------------------------- the base group
class Group(BaseModel):
    """A configuration group: frozen, unknown keys refused, Hydra's keys dropped. ``KEY``: its dotted key in the
    composed config (every message names its fields with it); ``TARGET``: the ``_target_`` it configures."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEY: ClassVar[str] = ""
    TARGET: ClassVar[str | None] = None
    OPEN: ClassVar[bool] = False  # also takes every other argument of its TARGET (in ``others``)
    UNTYPED: ClassVar[tuple[str, ...]] = ()  # keys taken and kept out of the model (their targets check them)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise config_error(err, type(self), values) from None

    # Pydantic validates nested groups without calling this (only a direct construction is translated here).
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def read(cls, node: Any) -> Any:
        """``node`` (a DictConfig or a mapping) read into this group, or a `ConfigError`."""
        data = plain(node)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise config_error(err, cls, data) from None

    @model_validator(mode="before")
    @classmethod
    def _drop_hydra_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        drop = {*HYDRA_KEYS, *cls.UNTYPED}
        kept = {k: v for k, v in data.items() if k not in drop}
        if cls.OPEN:
            params = target_parameters(data.get("_target_") or cls.TARGET)
            own = {k: v for k, v in kept.items() if k not in cls.model_fields and (params is None or k in params)}
            kept = {k: v for k, v in kept.items() if k not in own} | ({"others": own} if own else {})
        return kept

    def key(self, name: str) -> str:
        """The full dotted key of field ``name`` (``crosscoder.k``)."""
        return _join(self.KEY, name)


def plain(node: Any, skip: Sequence[str] = ()) -> Any:
    """A DictConfig as plain containers, resolved, its ``???`` values as `MISSING_VALUE` (``skip``: top-level
    keys left out, unresolved)."""
    if isinstance(node, DictConfig):
        return {str(k): _leaf(node, k) for k in node.keys() if k not in skip}  # noqa: SIM118
    if isinstance(node, ListConfig):
        return [_leaf(node, i) for i in range(len(node))]
    return node


def _leaf(node: DictConfig | ListConfig, key: Any) -> Any:
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, key):
        return MISSING_VALUE
    try:
        return plain(node[key])
    except InterpolationResolutionError:
        if HydraConfig.initialized():
            raise
        return node._get_node(key)._value()  # ${hydra:...} outside a Hydra app (a composed config): as written


# ------------------------------------------------------------------------------------------- messages
def config_error(err: ValidationError, model: type[Group], data: Any) -> ConfigError:
    """One line from pydantic's errors: every unknown and missing key (with the valid ones), else the first
    refused value with its key, what it must be and what the field means, else a rule's own message."""
    problems: list[tuple[tuple[int, ...], str]] = []
    takes: dict[str, list[str]] = {}
    first: ConfigError | None = None
    for error in err.errors():
        key, field, value, owner, order, rest = _locate(model, data, error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden" and owner is not None:
            name = str(error["loc"][-1])
            candidates = [*_names(owner), *owner.UNTYPED]
            params = target_parameters(owner.TARGET) if owner.OPEN else None
            candidates += sorted((params or set()) - set(candidates))
            close = difflib.get_close_matches(name, candidates, n=1)
            where = key or "the top level"
            problems.append(((*order, -1), f"unknown key {_join(key, name)}"
                             + (f" (did you mean {_join(key, close[0])}?)" if close else "")))
            takes[where] = [*_names(owner), *owner.UNTYPED] + ([f"any other argument of {owner.TARGET}"] if params else [])
        elif kind == "missing" and field is not None and not rest:
            problems.append((order, f"missing key {key}"))
        elif kind == "target_keys":
            problems += [((*order, -1), f"unknown key {_join(key, k)}: {error['ctx']['target']} takes "
                          f"{error['ctx']['takes']}") for k in error["ctx"]["keys"]]
        elif first is None:
            first = _value_error(error, key, field, value, err.errors())
    if problems:
        shown = "; ".join(text for _, text in sorted(problems, key=lambda p: p[0]))
        where = "; ".join(f"{w} takes: {', '.join(names)}" for w, names in takes.items())
        return ConfigError(f"invalid {model.KEY or 'top-level'} settings: {shown}" + (f". {where}" if where else ""))
    return first or ConfigError(str(err))


def _value_error(error: Mapping[str, Any], key: str, field: FieldInfo | None, value: Any,
                 errors: list[Mapping[str, Any]]) -> ConfigError:
    if error["type"] == "value_error" and isinstance(error.get("ctx", {}).get("error"), ConfigError):
        return error["ctx"]["error"]  # a rule's own message (model_validator)
    if field is None:
        return ConfigError(f"{key}: {error['msg']}")
    doc = f": {field.description}" if field.description else ""
    if value is MISSING_VALUE:
        return ConfigError(f"{key}=??? must be set{doc}")
    hint = _field_hint(field)
    here = [e for e in errors if _join_loc(e["loc"]).startswith(_join_loc(error["loc"][: len(key.split("."))]))]
    in_range = any(e["type"] in RANGE_ERRORS for e in here)  # the right type, out of its range
    got = "" if in_range or _is_choice(value, hint) else f" (got {_kind(value)})"
    return ConfigError(f"{key}={value!r} must be {_describe(hint)}{got}{doc}")


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _join(at: str, key: Any) -> str:
    return f"{at}.{key}" if at else str(key)


def _join_loc(loc: Sequence[Any]) -> str:
    return ".".join(map(str, loc))


def _names(owner: type[Group]) -> list[str]:
    return [name for name in owner.model_fields if not (owner.OPEN and name == "others")]


def _locate(model: type[Group], data: Any, loc: Sequence[Any]):
    """Follow an error's ``loc`` through the groups: the dotted key, the field, the value given, the group
    holding it (None past a field), the field indices along the way (the order of the messages) and the rest."""
    key, field, value, owner, order, i = model.KEY, None, data, model, (), 0
    while i < len(loc) and owner is not None:
        name = loc[i]
        if name not in owner.model_fields:
            break
        order += (list(owner.model_fields).index(name),)
        field, key, i = owner.model_fields[name], _join(key, name), i + 1
        value = value.get(name, MISSING_VALUE) if isinstance(value, Mapping) else None
        owner, skip = _group(field.annotation, loc[i] if i < len(loc) else None)
        if skip:
            i += 1
    return key, field, value, owner, order, tuple(loc[i:])


def _group(hint: Any, tag: Any) -> tuple[type[Group] | None, bool]:
    """The group a field holds (a group type, or the member of a choice named ``tag``), and whether ``tag``
    was a choice's tag in the error's loc."""
    if isinstance(hint, type) and issubclass(hint, Group):
        return hint, False
    choices = _choices(hint)
    if tag in choices:
        member = choices[tag]
        return (member if isinstance(member, type) and issubclass(member, Group) else None), True
    return None, False


def _choices(hint: Any) -> dict[str, Any]:
    origin = get_origin(hint)
    if origin is Annotated:
        base, *meta = get_args(hint)
        tags = [m.tag for m in meta if isinstance(m, Tag)]
        return {tags[0]: base} if tags else _choices(base)
    if origin in (Union, types.UnionType):
        return {t: m for arg in get_args(hint) for t, m in _choices(arg).items()}
    return {}


def _field_hint(field: FieldInfo) -> Any:
    return Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation


def _unwrap(hint: Any) -> tuple[Any, dict[str, float]]:
    """The type under ``Annotated`` and the bounds found there."""
    bounds: dict[str, float] = {}
    while get_origin(hint) is Annotated:
        hint, *meta = get_args(hint)
        for m in meta:
            for item in (m.metadata if isinstance(m, FieldInfo) else [m]):
                for name, kind in (("ge", at_.Ge), ("gt", at_.Gt), ("le", at_.Le), ("lt", at_.Lt)):
                    if isinstance(item, kind):
                        bounds[name] = getattr(item, name)
    return hint, bounds


def _is_choice(value: Any, hint: Any) -> bool:
    """Whether ``hint`` offers choices of ``value``'s type (``'l1'`` for ``Literal['mse', 'l2']``)."""
    hint, _ = _unwrap(hint)
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return any(get_origin(_unwrap(a)[0]) is Literal and any(type(c) is type(value) for c in get_args(_unwrap(a)[0]))
               for a in args)


def _describe(hint: Any, bounds: Mapping[str, float] | None = None) -> str:
    """What a field must be, in words: ``an integer >= 1 or null``."""
    hint, own = _unwrap(hint)
    bounds = {**(bounds or {}), **own}
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [_describe(arg, bounds) for arg in args if arg is not type(None)]
        parts += ["null"] if type(None) in args else []
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is bool:
        return "true or false"
    if hint in (int, float):
        return f"{'an integer' if hint is int else 'a number'}{_range(bounds)}"
    if hint is str:
        return "a string"
    if origin in (tuple, list):
        element, inner = _unwrap(args[0])
        plural = {int: "integers", float: "numbers", str: "strings"}.get(element, "values")
        count = "" if origin is list or (len(args) == 2 and args[1] is Ellipsis) else f"{len(args)} "
        return f"a list of {count}{plural}{_range({**bounds, **inner})}"
    if origin in (dict, Mapping) or hint is Mapping:
        element = _unwrap(args[1])[0] if len(args) == 2 else Any
        plural = {int: "integers", float: "numbers", str: "strings"}.get(element)
        return "a mapping" + (f" of {plural}" if plural else "")
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return "a mapping"
    return str(hint)


def _range(bounds: Mapping[str, float]) -> str:
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f" in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f" {'<=' if high[1] == ']' else '<'} {high[0]:g}"
    return ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, Sequence):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def target_parameters(target: str | None) -> set[str] | None:
    """The arguments a ``_target_`` takes (None: unknown, or it takes any keyword)."""
    if not target:
        return None
    module, _, name = target.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"_target_={target!r} cannot be found ({err}): check the module and name") from None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _own_target(node: dict[str, Any]) -> dict[str, Any]:
    """A node of the user's own ``_target_``: its keys checked against the target's signature only."""
    target = node.get("_target_")
    params = target_parameters(target)
    unknown = [k for k in node if params is not None and k not in params and k not in HYDRA_KEYS]
    if unknown:
        raise PydanticCustomError("target_keys", "unknown keys {keys}",
                                  {"keys": unknown, "target": target, "takes": ", ".join(sorted(params))})
    return node


OwnTarget = Annotated[dict[str, Any], AfterValidator(_own_target), *Frozen]


def _by_target(*groups: type[Group]) -> Discriminator:
    """A choice between ``groups`` by the node's ``_target_`` (tag: the group's name), else the user's own
    target (tag ``own``)."""
    def tag(node: Any) -> str:
        if isinstance(node, Group):
            return type(node).__name__
        target = node.get("_target_") if isinstance(node, Mapping) else None
        return next((g.__name__ for g in groups if g.TARGET == target), "own")
    return Discriminator(tag)


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

    k: Int = Field(ge=1, description="latents kept per token (BatchTopK k) at the end of the annealing, e.g. 64")
    n_latents: Int | None = Field(None, ge=1, description="the dictionary size (null: expansion * d_model)")
    expansion: Int | None = Field(None, ge=1, description="latents per d_model dimension (null: use n_latents)")
    k_start: Int | None = Field(None, ge=1, description="k at step 0, annealed down to k (null: k)")
    k_anneal_steps: Int = Field(
        0, ge=0, description="the steps over which k goes from k_start down to k (0: no annealing)")
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
    loss: Literal["mse", "l2"] = Field("mse", description="the reconstruction loss (crosscoder_pl.crosscoder.LOSSES)")
    step_impl: Literal["sparse", "dense"] = Field(
        "sparse", description="the training step (crosscoder_pl.crosscoder.STEP_IMPLS)")
    metrics_window_steps: Int = Field(
        50, ge=1, description="the steps pooled by the training variance explained and tokens/s (e.g. 50)")

    @model_validator(mode="after")
    def _sizes(self) -> CrossCoderConfig:
        if self.n_latents is None and self.expansion is None:
            raise ConfigError(f"{self.key('n_latents')} and {self.key('expansion')} are both null: set one "
                              f"(e.g. {self.key('n_latents')}=2048 or {self.key('expansion')}=16)")
        # With an expansion, the dictionary size is known once d_model is (`resolve` checks again then).
        check_sizes(self.k, self.start_k, self.n_latents if self.expansion is None else None, self.KEY)
        return self

    @property
    def start_k(self) -> int:
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
    mix: Annotated[dict[str, Float], *Frozen] | tuple[Float, Float] = Field(
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
    """``data=cached``: `crosscoder_pl.data.datamodule.CachedActivationDataModule`."""

    KEY: ClassVar[str] = "data"
    TARGET: ClassVar[str] = "crosscoder_pl.data.datamodule.CachedActivationDataModule"

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


class CausalSettings(Group):
    KEY: ClassVar[str] = "analysis.causal"
    enabled: Bool = Field(description="ablation-based causal equivalence of shared latents")
    max_latents: Int = Field(ge=1, description="the most frequent shared latents tested")
    latents_per_batch: Int | None = Field(
        ge=1, description="latents per forward (null: as many as the memory budget allows)")


class SpliceSettings(Group):
    KEY: ClassVar[str] = "analysis.splice"
    enabled: Bool = Field(description="CE / KL with the layer replaced by its reconstruction")


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

    @model_validator(mode="after")
    def _needs(self) -> AnalysisConfig:
        needs = [g for g in ("scaling", "causal") if getattr(self, g).enabled]
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
