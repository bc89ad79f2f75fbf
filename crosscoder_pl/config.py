"""The training configuration as typed, frozen dataclasses, validated at start-up before anything loads.

Hydra composes ``conf/`` and still builds every object from it; `RunConfig.from_hydra` reads the composed
``DictConfig`` into these classes first, so that every rule about a value lives here, once:

- each field's type (``int`` refuses ``true`` and ``"64"``), and its range from `rule` (``ge``, ``gt``, ...);
- the rules between fields (``k <= n_latents``, ``k_start >= k``, the threshold starting before
  ``max_steps``, the mix summing to 1, ...) in each class's ``check``; those between groups in `RunConfig.check`;
- unknown (misspelt) keys: a group takes its fields and Hydra's own keys (``_target_``, ``_partial_``, ...),
  a group read through its target (the trainer) every argument of that target.

Every refusal is a `ConfigError` (a ValueError) naming the full key, the value and what it must be, e.g.
``crosscoder.k=5000 is larger than the dictionary (crosscoder.n_latents=2048): choose crosscoder.k <= ...``.
`CrossCoderModule` validates its keyword arguments with `CrossCoderConfig`, so a library user gets the same
rules and messages. Fields default to the defaults of what they configure (``CrossCoderModule``,
``ActivationDataModule``): a key left out of ``conf/`` means the same thing to both.

This module imports no model code: it is read before anything heavy is imported or built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

# Keys Hydra's instantiate reads itself: allowed in any group next to its fields.
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
MIX_SOURCES = ("web", "chat")  # crosscoder_pl.data.sources.SOURCES (a test keeps them equal)
MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the fix."""


def rule(*, doc: str, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None) -> dict[str, Any]:
    """A field's metadata: its meaning (``doc``, shown in errors) and the range of its numbers (each number, for
    lists): ``k: int = field(metadata=rule(doc="latents kept per token", ge=1))``."""
    bounds = {name: v for name, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return {"doc": doc, "bounds": bounds}


# ------------------------------------------------------------------------------------------- the checking
@dataclass(frozen=True, kw_only=True)
class Checked:
    """Base of the typed groups: each field is checked against its annotation and `rule`, then `check` runs.

    ``at``: the dotted key the group was read from (default ``KEY``), used in every message."""

    KEY: ClassVar[str] = ""
    TARGET: ClassVar[str | None] = None  # the ``_target_`` this group configures (None: none)
    OPEN: ClassVar[bool] = False  # also takes every other argument of its ``_target_`` (unchecked here)
    UNTYPED: ClassVar[tuple[str, ...]] = ()  # keys taken but not typed here (their targets check them)
    at: InitVar[str | None] = None

    def __post_init__(self, at: str | None) -> None:
        object.__setattr__(self, "_at", self.KEY if at is None else at)
        hints = _hints(type(self))
        for f in fields(self):
            value = _checked(self.key(f.name), getattr(self, f.name), hints[f.name], f.metadata)
            object.__setattr__(self, f.name, value)
        self.check()

    def key(self, name: str) -> str:
        """The full dotted key of field ``name`` (``crosscoder.k``)."""
        return f"{self._at}.{name}" if self._at else name

    def check(self) -> None:
        """The rules between fields (overridden by the groups that have some)."""

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any], at: str | None = None) -> Checked:
        """Read ``node`` (a DictConfig or a dict): one error naming every unknown and missing key (with the valid
        ones), then the values are checked. Only the keys read are resolved (``${...}``)."""
        at = cls.KEY if at is None else at
        problems, valid = _key_problems(cls, node, at)
        if problems:
            shown = "; ".join(problems)
            takes = "; ".join(f"{where} takes: {', '.join(names)}" for where, names in valid.items())
            raise ConfigError(f"invalid {at or 'top-level'} settings: {shown}" + (f". {takes}" if takes else ""))
        return _construct(cls, node, at)


def _checked(key: str, value: Any, hint: Any, metadata: Mapping[str, Any]) -> Any:
    """``value`` normalised (lists to tuples, mappings read-only), or a ConfigError naming ``key``."""
    bounds = metadata.get("bounds", {})
    if not _conforms(value, hint):
        got = "" if _is_choice(value, hint) else f" (got {_kind(value)})"  # a string, not one of the choices
        raise ConfigError(f"{key}={value!r} must be {_describe(hint, bounds)}{got}{_doc(metadata)}")
    if not all(_within(number, bounds) for number in _numbers(value)):
        raise ConfigError(f"{key}={value!r} must be {_describe(hint, bounds)}{_doc(metadata)}")
    return _frozen(value)


def _doc(metadata: Mapping[str, Any]) -> str:
    return f": {metadata['doc']}" if metadata.get("doc") else ""


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
        return all(_conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping) or hint is Mapping:
        if not isinstance(value, Mapping):
            return False
        return not args or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    raise TypeError(f"no check for the annotation {hint!r}")  # a field type this module does not handle


def _is_choice(value: Any, hint: Any) -> bool:
    """Whether ``hint`` offers choices of ``value``'s type (``'l1'`` for ``Literal['mse', 'l2']``)."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return any(get_origin(a) is Literal and any(type(c) is type(value) for c in get_args(a)) for a in args)


def _numbers(value: Any) -> list[float]:
    """The numbers in ``value`` (itself, or its elements): what a field's bounds apply to."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):  # not into mappings: their own rules
        return [n for v in value for n in _numbers(v)]
    return []


def _within(x: float, bounds: Mapping[str, float]) -> bool:
    return all((name != "ge" or x >= b) and (name != "gt" or x > b) and (name != "le" or x <= b)
               and (name != "lt" or x < b) for name, b in bounds.items())


def _describe(hint: Any, bounds: Mapping[str, float]) -> str:
    """What a field must be, in words: ``an integer >= 1 or null``."""
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
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} {_plural(args[0])}{_range(bounds)}"
        return f"a list of {_plural(args[0])}{_range(bounds)}"
    if origin in (dict, Mapping) or hint is Mapping or dataclasses.is_dataclass(hint):
        return "a mapping" + (f" of {_plural(args[1])}{_range(bounds)}" if len(args) == 2 and args[1] is not Any else "")
    return str(hint)


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(hint, "values")


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


def _frozen(value: Any) -> Any:
    """Lists as tuples and mappings as read-only views: a frozen group cannot change through its fields either."""
    if isinstance(value, (Checked, str, bytes)):
        return value
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, Sequence):
        return tuple(_frozen(v) for v in value)
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _options(hint: Any) -> tuple[list[type[Checked]], bool]:
    """The typed groups a field may hold, and whether it may hold a plain mapping instead (a target of the
    user's own, whose keys are then checked against its signature only)."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    groups = [a for a in args if isinstance(a, type) and issubclass(a, Checked)]
    return groups, any(a is Mapping or get_origin(a) in (Mapping, dict) for a in args)


def _choose(hint: Any, node: Mapping[str, Any], at: str) -> type[Checked] | None:
    """The typed group for ``node``: the one whose TARGET is the node's ``_target_`` (None: keep it a mapping)."""
    groups, plain = _options(hint)
    if len(groups) == 1 and not plain:
        return groups[0]
    target = node.get("_target_")
    for group in groups:
        if group.TARGET == target:
            return group
    if plain:
        return None
    known = ", ".join(repr(g.TARGET) for g in groups)
    raise ConfigError(f"{at}._target_={target!r} is not one of {known}: choose one of these (see conf/)")


def _key_problems(cls: type[Checked], node: Any, at: str) -> tuple[list[str], dict[str, list[str]]]:
    """Unknown and missing keys of ``node`` read as ``cls`` (nested groups too), and the valid keys of each
    node that has an unknown one."""
    if not isinstance(node, Mapping):
        return [f"{at}={node!r} must be a mapping of its settings"], {}
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    target = node.get("_target_") if cls.OPEN else None
    params = target_parameters(target) if target else None
    # An open group whose target takes any keyword (or names none) has no unknown keys.
    allowed = None if cls.OPEN and params is None else {*names, *cls.UNTYPED, *HYDRA_KEYS, *(params or ())}
    problems, valid = [], {}
    candidates = [*names, *cls.UNTYPED, *sorted((params or set()) - set(names))]
    for key in node:
        if allowed is not None and key not in allowed:
            close = difflib.get_close_matches(str(key), candidates, n=1)
            problems.append(f"unknown key {_join(at, key)}" + (f" (did you mean {_join(at, close[0])}?)" if close else ""))
            valid[at or "the top level"] = [*names, *cls.UNTYPED] + ([f"any other argument of {target}"] if params else [])
    for f in fields(cls):
        if not _has(node, f.name):
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"missing key {_join(at, f.name)}")
            continue
        groups, plain = _options(hints[f.name])
        value = _raw(node, f.name)
        if (groups or plain) and isinstance(value, Mapping):
            where = _join(at, f.name)
            group = _choose(hints[f.name], value, where)
            if group is not None:
                more, more_valid = _key_problems(group, value, where)
            else:
                more, more_valid = _target_key_problems(value, where), {}
            problems += more
            valid.update(more_valid)
    return problems, valid


def _target_key_problems(node: Mapping[str, Any], at: str) -> list[str]:
    """The keys of a node of the user's own ``_target_`` that it does not take."""
    params = target_parameters(node.get("_target_"))
    if params is None:
        return []
    return [f"unknown key {_join(at, k)}: {node.get('_target_')} takes {', '.join(sorted(params))}"
            for k in node if k not in params and k not in HYDRA_KEYS]


def _construct(cls: type[Checked], node: Mapping[str, Any], at: str) -> Checked:
    hints = _hints(cls)
    values = {}
    for f in fields(cls):
        if not _has(node, f.name):
            continue
        key = _join(at, f.name)
        try:
            value = node[f.name]  # resolves this key's interpolation, only
        except MissingMandatoryValue:
            raise ConfigError(f"{key}=??? must be set{_doc(f.metadata)}") from None
        groups, plain = _options(hints[f.name])
        if (groups or plain) and isinstance(value, Mapping):
            group = _choose(hints[f.name], value, key)
            value = _construct(group, value, key) if group is not None else _plain(value)
        else:
            value = _plain(value)
        values[f.name] = value
    return cls(at=at, **values)


def _has(node: Mapping[str, Any], key: str) -> bool:
    return key in node.keys()  # noqa: SIM118 (a DictConfig's `in` is False for a ``???`` value, reported later)


def _raw(node: Any, key: str) -> Any:
    """``node[key]`` without resolving it (a ``???`` or an interpolation is read later, by `_construct`)."""
    if isinstance(node, DictConfig):
        return node._get_node(key)  # OmegaConf's accessor of an unresolved child
    return node[key]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _join(at: str, key: Any) -> str:
    return f"{at}.{key}" if at else str(key)


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


# ------------------------------------------------------------------------------------------- the groups
@dataclass(frozen=True, kw_only=True)
class CrossCoderConfig(Checked):
    """``crosscoder``: the arguments of `crosscoder_pl.module.CrossCoderModule` (its docstring says what each
    does), and ``expansion``, which sizes the dictionary from d_model (`resolve`)."""

    KEY: ClassVar[str] = "crosscoder"
    TARGET: ClassVar[str] = "crosscoder_pl.module.CrossCoderModule"

    k: int = field(metadata=rule(doc="latents kept per token (BatchTopK k) at the end of the annealing, e.g. 64", ge=1))
    n_latents: int | None = field(
        default=None, metadata=rule(doc="the dictionary size (null: expansion * d_model)", ge=1))
    expansion: int | None = field(
        default=None, metadata=rule(doc="latents per d_model dimension (null: use n_latents)", ge=1))
    k_start: int | None = field(default=None, metadata=rule(doc="k at step 0, annealed down to k (null: k)", ge=1))
    k_anneal_steps: int = field(
        default=0, metadata=rule(doc="the steps over which k goes from k_start down to k (0: no annealing)", ge=0))
    lr: float = field(default=1e-4, metadata=rule(doc="Adam's learning rate, e.g. 1e-4", gt=0))
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata=rule(doc="Adam's betas, e.g. [0.9, 0.999]", ge=0, lt=1))
    lr_decay_frac: float = field(
        default=0.2, metadata=rule(doc="the last fraction of the steps over which the lr decays to 0", ge=0, le=1))
    aux_coef: float = field(default=1 / 32, metadata=rule(doc="weight of the AuxK loss (1/32; 0 turns it off)", ge=0))
    k_aux: int | None = field(
        default=None, metadata=rule(doc="dead latents AuxK uses per token (null: d_model / 2)", ge=1))
    dead_after_tokens: int = field(
        default=10_000_000, metadata=rule(doc="tokens without firing after which a latent is dead", ge=1))
    threshold_decay: float = field(
        default=0.999, metadata=rule(doc="EMA decay of the inference threshold, e.g. 0.999", gt=0, lt=1))
    threshold_start_step: int | None = field(
        default=None, metadata=rule(doc="first step that updates the threshold (null: end of k annealing)", ge=0))
    scales: tuple[float, float] | None = field(
        default=None, metadata=rule(doc="per-model scales [base, chat] (null: estimated)", gt=0))
    center: bool = field(
        default=True, metadata=rule(doc="subtract each model's activation mean before the encoder (false: the "
                                        "uncentred crosscoder of earlier versions)"))
    scale_tokens: int = field(
        default=8192, metadata=rule(doc="tokens the means, scales and bias inits are estimated from", ge=1))
    scale_by: Literal["mean_norm", "std"] = field(
        default="mean_norm", metadata=rule(doc="what the estimated scales equalise"))
    b_dec_init: Literal["mean", "zeros"] = field(default="mean", metadata=rule(doc="the decoder bias's start"))
    b_enc_init: Literal["center", "zeros"] = field(default="center", metadata=rule(doc="the encoder bias's start"))
    enc_init: Literal["equal_variance", "transpose"] = field(
        default="transpose", metadata=rule(doc="the encoder's start"))
    dec_init_norm: float = field(
        default=0.08, metadata=rule(doc="the norm of each decoder row at init, e.g. 0.08", gt=0))
    loss: Literal["mse", "l2"] = field(
        default="mse", metadata=rule(doc="the reconstruction loss (crosscoder_pl.crosscoder.LOSSES)"))
    step_impl: Literal["sparse", "dense"] = field(
        default="sparse", metadata=rule(doc="the training step (crosscoder_pl.crosscoder.STEP_IMPLS)"))
    metrics_window_steps: int = field(
        default=50,
        metadata=rule(doc="the steps pooled by the training variance explained and tokens/s (e.g. 50)", ge=1))

    def check(self) -> None:
        if self.n_latents is None and self.expansion is None:
            raise ConfigError(f"{self.key('n_latents')} and {self.key('expansion')} are both null: set one "
                              f"(e.g. {self.key('n_latents')}=2048 or {self.key('expansion')}=16)")
        # With an expansion, the dictionary size is known once d_model is (`resolve` checks again then).
        k, k_start, n = self.k, self.start_k, self.n_latents if self.expansion is None else None
        if n is not None and k > n:
            raise ConfigError(f"{self.key('k')}={k} is larger than the dictionary ({self.key('n_latents')}={n}): "
                              f"choose {self.key('k')} <= {n}")
        if k_start < k:
            raise ConfigError(f"{self.key('k_start')}={k_start} is smaller than {self.key('k')}={k}: annealing goes "
                              f"from k_start down to k; set {self.key('k_start')} >= {k} (or null)")
        if n is not None and k_start > n:
            raise ConfigError(f"{self.key('k_start')}={k_start} is larger than the dictionary "
                              f"({self.key('n_latents')}={n}): choose {self.key('k_start')} <= {n}")

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
        return dataclasses.replace(self, n_latents=n_latents, expansion=None, at=self._at)


@dataclass(frozen=True, kw_only=True)
class TextSourceConfig(Checked):
    """``data.web`` / ``data.chat`` without a target: `crosscoder_pl.data.sources.SourceConfig`'s fields."""

    KEY: ClassVar[str] = "data.web"
    path: str = field(metadata=rule(doc="a hub dataset id or a datasets builder (json, parquet, ...)"))
    field: str = field(metadata=rule(doc="the row field holding the text (web) or the conversation (chat)"))
    name: str | None = dataclasses.field(default=None, metadata=rule(doc="the dataset's configuration name"))
    split: str = dataclasses.field(default="train", metadata=rule(doc="the split read"))
    data_files: str | list[str] | None = dataclasses.field(
        default=None, metadata=rule(doc="files or globs (path=json, parquet, ...)"))


@dataclass(frozen=True, kw_only=True)
class EmbeddedSourceConfig(Checked):
    """``data.web`` / ``data.chat`` of the embedded corpus (`crosscoder_pl.data.sources.embedded_source`)."""

    KEY: ClassVar[str] = "data.web"
    TARGET: ClassVar[str] = "crosscoder_pl.data.sources.embedded_source"
    source: Literal["web", "chat"] = field(metadata=rule(doc="the corpus half"))


Source = TextSourceConfig | EmbeddedSourceConfig | Mapping[str, Any]


def check_mix(mix: Mapping[str, float] | Sequence[float], key: str = "data.mix") -> tuple[float, float]:
    """``(p_web, p_chat)`` of a mix given as ``{"web": p, "chat": p}`` or ``[p_web, p_chat]``: >= 0, summing to 1."""
    example = f"e.g. {key}={{web: 0.5, chat: 0.5}}"
    if isinstance(mix, Mapping):
        if set(mix) != set(MIX_SOURCES):
            raise ConfigError(f"{key}={dict(mix)} must have exactly the keys {MIX_SOURCES}: {example}")
        values = (mix["web"], mix["chat"])
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


@dataclass(frozen=True, kw_only=True)
class StreamDataConfig(Checked):
    """``data`` streaming text through the pair: `crosscoder_pl.data.datamodule.ActivationDataModule`."""

    KEY: ClassVar[str] = "data"
    TARGET: ClassVar[str] = "crosscoder_pl.data.datamodule.ActivationDataModule"

    web: Source = field(metadata=rule(doc="the web source"))
    chat: Source = field(metadata=rule(doc="the chat source"))
    mix: dict[str, float] | tuple[float, float] = field(
        default=(0.5, 0.5), metadata=rule(doc="the web/chat document mix, summing to 1"))
    seed: int = field(default=0, metadata=rule(doc="the mix's and the shuffle buffer's seed"))
    seq_len: int = field(default=1024, metadata=rule(doc="tokens per sequence, BOS included", ge=2))
    batch_size: int = field(default=4096, metadata=rule(doc="tokens per crosscoder step", ge=1))
    text_batch_size: int = field(default=16, metadata=rule(doc="sequences per language-model forward", ge=1))
    buffer_tokens: int = field(
        default=2**18, metadata=rule(doc="the shuffle buffer's size in tokens (at least twice batch_size)", ge=1))
    val_tokens: int = field(
        default=8192,
        metadata=rule(doc="the held-out tokens of validation and of the end-of-training analyses (e.g. 16384)", ge=1))
    heldout_fraction: float = field(
        default=0.01, metadata=rule(doc="the share of documents held out (by hash) for validation", gt=0, lt=1))
    outlier_factor: float | None = field(
        default=3.0,
        metadata=rule(doc="a token whose norm in a model exceeds this multiple of that model's median norm is an "
                          "outlier: counted per model, kept unless drop_outliers (null: none counted)", gt=0))
    drop_outliers: bool = field(
        default=False,
        metadata=rule(doc="drop the outlier tokens instead of only counting them (a non-null outlier_factor used to "
                          "drop them: to keep that, set drop_outliers=true)"))
    padding_side: Literal["left", "right"] = field(default="right", metadata=rule(doc="where sequences are padded"))
    num_workers: int = field(
        default=0, metadata=rule(doc="DataLoader workers (0: the main process, needed for an exact resume)", ge=0))
    n_probes: int = field(
        default=32, metadata=rule(doc="held-out sequences of the causal and splice-in analyses", ge=1))
    probe_len: int = field(default=64, metadata=rule(doc="tokens per probe sequence, BOS included", ge=2))
    rank_split: Literal["batch", "documents"] = field(
        default="batch", metadata=rule(doc="how DDP ranks share the data"))
    memo_gb: float = field(
        default=0.0,
        metadata=rule(doc="GiB of the first pass's activations kept for the later passes (0: off)", ge=0))

    def check(self) -> None:
        check_mix(self.mix, self.key("mix"))
        check_outliers(self.outlier_factor, self.drop_outliers, self._at)
        if self.buffer_tokens < 2 * self.batch_size:
            raise ConfigError(
                f"{self.key('buffer_tokens')}={self.buffer_tokens} must be at least twice {self.key('batch_size')}="
                f"{self.batch_size}: the shuffle buffer serves batches while half of it stays behind; set "
                f"{self.key('buffer_tokens')}={2 * self.batch_size} or more"
            )
        for role in MIX_SOURCES:
            source = getattr(self, role)
            if isinstance(source, EmbeddedSourceConfig) and source.source != role:
                raise ConfigError(f"{self.key(role)}.source={source.source!r} is the other half of the corpus: set "
                                  f"{self.key(role)}.source={role}")


@dataclass(frozen=True, kw_only=True)
class CachedDataConfig(Checked):
    """``data=cached``: `crosscoder_pl.data.datamodule.CachedActivationDataModule`."""

    KEY: ClassVar[str] = "data"
    TARGET: ClassVar[str] = "crosscoder_pl.data.datamodule.CachedActivationDataModule"

    path: str = field(metadata=rule(doc="the activation cache written by python cache_activations.py out=DIR"))
    batch_size: int = field(default=4096, metadata=rule(doc="tokens per crosscoder step", ge=1))
    seed: int = field(default=0, metadata=rule(doc="the shard and row order's seed"))
    num_workers: int = field(default=0, metadata=rule(doc="DataLoader workers", ge=0))
    rank_split: Literal["batch", "documents"] = field(
        default="batch", metadata=rule(doc="how DDP ranks share the data"))
    outlier_factor: float | None = field(
        default=None, metadata=rule(doc="a token is an outlier in a model above this multiple of the model's median "
                                        "norm over its batch (null: the factor the cache was written with)", gt=0))
    drop_outliers: bool = field(
        default=False, metadata=rule(doc="drop the outlier tokens of each batch and of the held-out set (false: "
                                         "counted, kept)"))


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(Checked):
    """``trainer``: the Lightning Trainer arguments this application relies on. The group may hold any other
    argument of its ``_target_`` (checked against its signature, left to Lightning)."""

    KEY: ClassVar[str] = "trainer"
    TARGET: ClassVar[str] = "lightning.pytorch.Trainer"
    OPEN: ClassVar[bool] = True

    max_steps: int = field(
        metadata=rule(doc="the training steps (the lr schedule and the stream need a finite run)", ge=1))
    val_check_interval: int | str | Mapping[str, Any] | None = field(
        default=None,
        metadata=rule(ge=1, doc="the training steps between validations (e.g. 500; the stream has no epochs to take a "
                                "fraction of)"))
    devices: int | str | list[int] = field(
        default="auto", metadata=rule(doc="devices per node: a count (-1: all), 'auto' or a list of ids"))
    num_nodes: int = field(default=1, metadata=rule(doc="machines in a multi-node run", ge=1))
    strategy: str | Mapping[str, Any] = field(default="auto", metadata=rule(doc="Lightning's strategy, e.g. auto, ddp"))
    accelerator: str | Mapping[str, Any] = field(
        default="auto", metadata=rule(doc="Lightning's accelerator, e.g. auto, cpu, gpu"))
    gradient_clip_val: float | None = field(
        default=None, metadata=rule(doc="gradient norm clipping (null: none)", ge=0))

    def check(self) -> None:
        d = self.devices
        if (isinstance(d, int) and d != -1 and d < 1) or (isinstance(d, tuple) and not d):
            raise ConfigError(f"{self.key('devices')}={d!r} must be a count >= 1, -1 (all), 'auto' or a non-empty "
                              "list of device ids: e.g. trainer.devices=1")

    @property
    def processes(self) -> int | None:
        """Training processes (devices x nodes) when the device count is explicit, else None."""
        return self.devices * self.num_nodes if isinstance(self.devices, int) and self.devices > 0 else None


@dataclass(frozen=True, kw_only=True)
class ModelPairConfig(Checked):
    """``model_pair`` loaded from names: `crosscoder_pl.models.pair.load_model_pair`."""

    KEY: ClassVar[str] = "model_pair"
    TARGET: ClassVar[str] = "crosscoder_pl.models.pair.load_model_pair"

    base: str | None = field(metadata=rule(doc="the base model: a save_pretrained directory, a .gguf file or a hub id"))
    chat: str | None = field(metadata=rule(doc="its chat fine-tune (same kinds of name)"))
    layer: int | None = field(metadata=rule(doc="the hooked decoder block, 0-based (null: the middle one)", ge=0))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=rule(doc="the language models' dtype"))
    device: str = field(default="auto", metadata=rule(doc="auto, cpu, cuda or cuda:N"))
    token: str | None = field(default=None, metadata=rule(doc="a Hugging Face token (null: the login's)"))
    seq_len: int | None = field(
        default=None, metadata=rule(doc="the longest sequence read, checked against the models' positions", ge=2))
    chat_template: str | None = field(default=None, metadata=rule(doc="a Jinja chat template, or a file holding one"))

    def check(self) -> None:
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{self.key('device')}={self.device!r} must be auto, cpu, cuda or cuda:N")


def check_models(node: Mapping[str, Any] | ModelPairConfig) -> None:
    """Both models named (``+experiment=own_pair`` leaves them to the command line)."""
    get = (lambda role: getattr(node, role)) if isinstance(node, ModelPairConfig) else node.get
    missing = [f"model_pair.{role}" for role in ("base", "chat") if get(role) is None]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not set: name both models, e.g. python train.py +experiment=own_pair "
            "model_pair.base=DIR model_pair.chat=DIR (a save_pretrained directory, a .gguf file or a hub id)"
        )


@dataclass(frozen=True, kw_only=True)
class TaxonomySettings(Checked):
    KEY: ClassVar[str] = "analysis.taxonomy"
    enabled: bool = field(metadata=rule(doc="classify the latents by relative decoder norm"))
    base_only_max: float = field(metadata=rule(doc="base_only: delta <= base_only_max", ge=0, le=1))
    chat_only_min: float = field(metadata=rule(doc="chat_only: delta >= chat_only_min", ge=0, le=1))
    shared_min: float = field(metadata=rule(doc="shared: shared_min <= delta < shared_max", ge=0, le=1))
    shared_max: float = field(metadata=rule(doc="shared: shared_min <= delta < shared_max", ge=0, le=1))

    def check(self) -> None:
        order = ("base_only_max", "shared_min", "shared_max", "chat_only_min")
        values = [getattr(self, name) for name in order]
        if not values[0] < values[1] < values[2] <= values[3]:
            shown = ", ".join(f"{self.key(n)}={v}" for n, v in zip(order, values))
            raise ConfigError(f"{shown}: the classes need base_only_max < shared_min < shared_max <= chat_only_min "
                              "(Minder et al.: 0.1, 0.4, 0.6, 0.9)")


@dataclass(frozen=True, kw_only=True)
class ScalingSettings(Checked):
    KEY: ClassVar[str] = "analysis.scaling"
    enabled: bool = field(metadata=rule(doc="latent scaling (base uselessness) of chat-only latents"))
    max_chat_only: int = field(metadata=rule(doc="chat-only latents tested", ge=1))
    max_shared: int = field(metadata=rule(doc="shared latents tested as the comparison group", ge=1))
    seed: int = field(metadata=rule(doc="the sample's seed"))
    nu_eps_max: float = field(metadata=rule(doc="chat-specific: nu_eps < nu_eps_max", gt=0))
    nu_r_max: float = field(metadata=rule(doc="chat-specific: nu_r < nu_r_max", gt=0))
    top_latents: int = field(metadata=rule(doc="chat-specific latents listed in the card (0: none)", ge=0))
    top_tokens: int = field(metadata=rule(doc="probe tokens shown per listed latent", ge=1))


@dataclass(frozen=True, kw_only=True)
class CausalSettings(Checked):
    KEY: ClassVar[str] = "analysis.causal"
    enabled: bool = field(metadata=rule(doc="ablation-based causal equivalence of shared latents"))
    max_latents: int = field(metadata=rule(doc="the most frequent shared latents tested", ge=1))
    latents_per_batch: int | None = field(
        metadata=rule(doc="latents per forward (null: as many as the memory budget allows)", ge=1))


@dataclass(frozen=True, kw_only=True)
class SpliceSettings(Checked):
    KEY: ClassVar[str] = "analysis.splice"
    enabled: bool = field(metadata=rule(doc="CE / KL with the layer replaced by its reconstruction"))


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig(Checked):
    """``analysis`` (conf/analysis): the end-of-training analyses; every key is required."""

    KEY: ClassVar[str] = "analysis"
    chunk_tokens: int = field(metadata=rule(doc="held-out tokens encoded per step", ge=1))
    memory_budget_mb: float | None = field(
        metadata=rule(doc="working memory of the causal and splice-in forwards (null: from the device)", gt=0))
    taxonomy: TaxonomySettings = field(metadata=rule(doc="Δnorm classes"))
    scaling: ScalingSettings = field(metadata=rule(doc="latent scaling"))
    causal: CausalSettings = field(metadata=rule(doc="causal validation"))
    splice: SpliceSettings = field(metadata=rule(doc="splice-in evaluation"))

    def check(self) -> None:
        needs = [g for g in ("scaling", "causal") if getattr(self, g).enabled]
        if needs and not self.taxonomy.enabled:
            raise ConfigError(f"{' and '.join(self.key(g) for g in needs)} use the taxonomy's classes: enable "
                              f"{self.key('taxonomy')} ({self.key('taxonomy')}.enabled=true) or disable them")


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig(Checked):
    KEY: ClassVar[str] = "objective"
    max_dead_frac: float = field(
        default=0.1, metadata=rule(doc="dead fraction above which the sweep objective is penalised", ge=0, le=1))
    penalty: float = field(
        default=10.0, metadata=rule(doc="penalty per unit of dead fraction above max_dead_frac", ge=0))


@dataclass(frozen=True, kw_only=True)
class RunConfig(Checked):
    """The composed ``conf/train.yaml``: the typed groups and the run's own settings; `check` holds the rules
    between groups. Build it with `from_hydra`."""

    # Not typed here: Hydra's node, the paths derived from it, and groups of targets only.
    UNTYPED: ClassVar[tuple[str, ...]] = ("hydra", "output_dir", "artifact_dir", "logger", "callbacks", "dashboard")

    crosscoder: CrossCoderConfig = field(metadata=rule(doc="the crosscoder"))
    data: StreamDataConfig | CachedDataConfig | Mapping[str, Any] = field(metadata=rule(doc="the data module"))
    trainer: TrainerConfig = field(metadata=rule(doc="the Lightning Trainer"))
    model_pair: ModelPairConfig | Mapping[str, Any] = field(metadata=rule(doc="the language models"))
    analysis: AnalysisConfig = field(metadata=rule(doc="the end-of-training analyses"))
    objective: ObjectiveConfig = field(
        default=ObjectiveConfig(), metadata=rule(doc="what train.py returns to a sweeper"))
    seed: int = field(default=0, metadata=rule(doc="the run's seed"))
    threads: int | None = field(
        default=None, metadata=rule(doc="torch CPU threads for the run (null: torch's default, one per core)", ge=1))
    matmul_precision: Literal["highest", "high", "medium"] = field(
        default="high", metadata=rule(doc="torch.set_float32_matmul_precision"))
    run_name: str = field(default="crosscoder", metadata=rule(doc="names the output directory"))
    resume: str | None = field(
        default=None, metadata=rule(doc="an earlier run's output dir to continue (outputs/<run_name>/<date_time>)"))
    ckpt_path: str | None = field(
        default=None, metadata=rule(doc="a checkpoint file to start from, or last / best / hpc"))

    def check(self) -> None:
        check_models(self.model_pair)
        c, t = self.crosscoder, self.trainer
        if c.threshold_start >= t.max_steps:
            raise ConfigError(
                f"the inference threshold starts at step {c.threshold_start} (crosscoder.threshold_start_step, "
                f"default crosscoder.k_anneal_steps={c.k_anneal_steps}) but training stops at trainer.max_steps="
                f"{t.max_steps}: the saved crosscoder would have no threshold; raise trainer.max_steps or lower them"
            )

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """The typed view of a composed training config (after Hydra composition, before anything is built).
        Unknown top-level keys are refused; the groups of `UNTYPED` are left to their targets."""
        return cls.from_mapping(cfg, "")  # type: ignore[return-value]

    def resolve(self, d_model: int) -> RunConfig:
        """With the dictionary size known (``crosscoder.expansion * d_model``), checked again."""
        return dataclasses.replace(self, crosscoder=self.crosscoder.resolve(d_model), at="")
