"""The base of every configuration group (`Group`: a frozen pydantic model refusing unknown keys) and the one
translation of pydantic's errors into one-line `ConfigError` messages naming the full dotted key, the value,
what it must be and the fix (with "did you mean" for a misspelt key).

`crosscoder_pl.config` declares the groups on this base; nothing here knows any group. This module imports no
model code.
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
    Strict,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

# Keys Hydra's instantiate reads itself: allowed in any group next to its fields.
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


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


def frozen(hint: Any, *validators: Any) -> Any:
    """``hint`` read-only once validated (after ``validators``), plain again when dumped."""
    return Annotated[(hint, *validators, AfterValidator(_freeze), PlainSerializer(thaw))]


AnyMapping = frozen(dict[str, Any])


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
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


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


OwnTarget = frozen(dict[str, Any], AfterValidator(_own_target))


def _by_target(*groups: type[Group]) -> Discriminator:
    """A choice between ``groups`` by the node's ``_target_`` (tag: the group's name), else the user's own
    target (tag ``own``)."""
    def tag(node: Any) -> str:
        if isinstance(node, Group):
            return type(node).__name__
        target = node.get("_target_") if isinstance(node, Mapping) else None
        return next((g.__name__ for g in groups if g.TARGET == target), "own")
    return Discriminator(tag)


