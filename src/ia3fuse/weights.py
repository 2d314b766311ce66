"""Fusion weight schedules: per adapter, per module kind, per module (regex), over depth.

A *per-adapter list* has one value per adapter (or is a mapping adapter name -> value). A
value is a number, or a list of numbers: a depth gradient, interpolated linearly over the
layer index as mergekit does (first value at the first layer, last value at the last).
A `WeightSchedule` picks the list for each module: the first ``overrides`` entry whose regex
matches the module path (``re.search``), else the list for the module's kind
(``attention`` / ``feedforward``), else ``default``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from .errors import InvalidWeightsError

__all__ = [
    "WeightSchedule",
    "WeightPlan",
    "plan_weights",
    "weights_to_plain",
    "layer_positions",
    "layer_index",
    "KINDS",
]

KINDS = ("attention", "feedforward")
WeightValue = Union[float, Sequence[float]]
PerAdapter = Union[Sequence[WeightValue], Mapping[str, WeightValue]]
_SCHEDULE_KEYS = {"default", "kinds", "overrides"}


class WeightSchedule(BaseModel):
    """Weights that vary by module: ``default``, per-kind lists and regex overrides.

    The one representation of a schedule: `ia3fuse.merge` takes it, a recipe's ``weights:``
    mapping is one, and `plain` dumps it back to that YAML form. Its values are checked against
    the adapter names by `plan_weights` (the messages name the entry and the fix); the model
    itself only refuses unknown fields. ``overrides`` entries are ``(regex, weights)`` pairs or
    ``{filter: REGEX, weights: [...]}`` mappings.

    Example:
        >>> WeightSchedule(default=[0.5, 0.5], kinds={"feedforward": [1.0, 0.0]},
        ...                overrides=[(r"layers\\.0\\.", [0.0, 1.0])])  # doctest: +ELLIPSIS
        WeightSchedule(...)
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    default: Any = None
    kinds: Any = Field(default_factory=dict)
    overrides: Any = ()

    def plain(self) -> dict[str, Any]:
        """The schedule as YAML/JSON data, in the recipe's form (fields at their defaults left out)."""
        out: dict[str, Any] = {}
        if self.default is not None:
            out["default"] = weights_to_plain(self.default)
        if self.kinds:
            out["kinds"] = {str(k): weights_to_plain(v) for k, v in dict(self.kinds).items()}
        if self.overrides:
            out["overrides"] = [{"filter": f, "weights": weights_to_plain(w)} for f, w in _pairs(self.overrides)]
        return out


def weights_to_plain(weights: Any) -> Any:
    """Weights (any form `plan_weights` takes) as plain YAML/JSON data, for recipes and model cards."""
    if weights is None:
        return None
    if isinstance(weights, WeightSchedule):
        return weights.plain()
    if isinstance(weights, Mapping):
        return {str(k): weights_to_plain(v) for k, v in weights.items()}
    if isinstance(weights, (list, tuple)):
        return [weights_to_plain(v) for v in weights]
    if isinstance(weights, Tensor):
        return weights.tolist()
    return float(weights) if isinstance(weights, (int, float)) else weights


WeightsArg = Union[None, PerAdapter, WeightSchedule, Mapping[str, Any]]


def layer_index(path: str) -> Optional[tuple[str, int]]:
    """(stack, index) from the first numeric component of a module path, e.g.
    ``"model.layers.3.mlp"`` -> ``("model.layers", 3)``; None outside numbered layers."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def layer_positions(paths: Sequence[str], layers: Optional[Mapping[str, int]] = None) -> dict[str, Optional[float]]:
    """Relative depth t in [0, 1] of each module: ``index / (n - 1)`` for a stack of ``n`` layers,
    as mergekit's gradients use it (a stack of one layer has t = 1).

    ``n`` is the model's layer count where ``layers`` gives it (stack path -> count, e.g.
    ``{"model.layers": 32}``); without a model (offline, on adapter files), the highest layer
    index among ``paths`` plus one, so adapters on a subset of the layers are spread over the
    layers they cover. Layers are counted per stack, so an encoder and a decoder each run from
    0 to 1. Modules outside numbered layers get None.
    """
    found = {p: layer_index(p) for p in paths}
    count: dict[str, int] = {}
    for where in found.values():
        if where is not None:
            count[where[0]] = max(count.get(where[0], 0), where[1] + 1)
    for stack, n in (layers or {}).items():
        if stack in count:
            count[stack] = max(count[stack], int(n))
    out: dict[str, Optional[float]] = {}
    for p, where in found.items():
        if where is None:
            out[p] = None
        else:
            n = count[where[0]]
            out[p] = where[1] / (n - 1) if n > 1 else 1.0
    return out


def _interp(anchors: Sequence[float], t: Optional[float]) -> float:
    if len(anchors) == 1 or t is None or t <= 0:
        return float(anchors[0])
    pos = t * (len(anchors) - 1)
    lo = min(int(math.floor(pos)), len(anchors) - 2)
    frac = pos - lo
    return float(anchors[lo]) * (1 - frac) + float(anchors[lo + 1]) * frac


def _check_value(value: Any, where: str) -> Union[float, tuple[float, ...]]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidWeightsError(f"{where} is an empty list; a depth gradient needs at least one number")
        for v in value:
            if isinstance(v, (list, tuple)):
                raise InvalidWeightsError(f"{where} holds the list {v!r}; a depth gradient is a flat list of numbers")
        return tuple(_check_number(v, where) for v in value)
    return _check_number(value, where)


def _check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidWeightsError(f"{where} is {value!r}; a weight is a number or a list of numbers (a depth gradient)")
    if not math.isfinite(value):
        raise InvalidWeightsError(f"{where} is {value!r}; weights must be finite numbers")
    return float(value)


def _per_adapter(values: PerAdapter, names: Sequence[str], where: str) -> tuple[Union[float, tuple[float, ...]], ...]:
    k = len(names)
    if isinstance(values, Mapping):
        unknown = [n for n in values if n not in names]
        missing = [n for n in names if n not in values]
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"names no adapter {', '.join(map(repr, unknown))}")
            if missing:
                parts.append(f"lacks {', '.join(map(repr, missing))}")
            raise InvalidWeightsError(
                f"{where} {' and '.join(parts)}; give one weight for each adapter: {', '.join(map(repr, names))}"
            )
        return tuple(_check_value(values[n], f"{where}[{n!r}]") for n in names)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidWeightsError(
            f"{where} is {values!r}; pass one weight per adapter as a list, or a mapping adapter name -> weight"
        )
    if len(values) != k:
        raise InvalidWeightsError(
            f"{where} has {len(values)} value{'s' if len(values) != 1 else ''} for {k} adapter{'s' if k != 1 else ''}; "
            "pass one weight per adapter or a mapping"
        )
    return tuple(_check_value(v, f"{where}[{i}]") for i, v in enumerate(values))


@dataclass(frozen=True)
class WeightPlan:
    """A checked weight schedule for a fixed list of adapter names."""

    default: tuple[Union[float, tuple[float, ...]], ...]
    kinds: Mapping[str, tuple[Union[float, tuple[float, ...]], ...]]
    overrides: tuple[tuple[re.Pattern[str], tuple[Union[float, tuple[float, ...]], ...]], ...]

    def for_module(self, path: str, kind: str, depth: Optional[float]) -> Tensor:
        """The weights ``(k,)`` (float64) that apply to module ``path``."""
        chosen = self.kinds.get(kind, self.default)
        for pattern, values in self.overrides:
            if pattern.search(path):
                chosen = values
                break
        return torch.tensor([v if isinstance(v, float) else _interp(v, depth) for v in chosen], dtype=torch.float64)

    @property
    def is_uniform(self) -> bool:
        """True when every module gets the same scalar weights."""
        return not self.kinds and not self.overrides and all(isinstance(v, float) for v in self.default)


def plan_weights(weights: WeightsArg, names: Sequence[str]) -> WeightPlan:
    """Check ``weights`` against the adapter ``names`` and return a plan.

    ``None`` means the mean: 1/k for every adapter.

    Raises:
        InvalidWeightsError: wrong count, unknown names, NaN/Inf, bad regex or kind.
    """
    k = len(names)
    if weights is None:
        return WeightPlan(tuple(1.0 / k for _ in names), {}, ())
    if isinstance(weights, Mapping) and weights and set(weights) <= _SCHEDULE_KEYS and not set(weights) & set(names):
        schedule: Mapping[str, Any] = weights  # plain data (YAML): its values are checked below
        weights = WeightSchedule(
            default=schedule.get("default"),
            kinds=schedule.get("kinds") or {},
            overrides=_pairs(schedule.get("overrides") or ()),
        )
    if not isinstance(weights, WeightSchedule):
        return WeightPlan(_per_adapter(weights, names, "weights"), {}, ())
    pairs = _pairs(weights.overrides)  # the form of the list first, as a recipe's YAML is read
    default = (
        _per_adapter(weights.default, names, "weights.default")
        if weights.default is not None
        else tuple(1.0 / k for _ in names)
    )
    if not isinstance(weights.kinds, Mapping):
        raise InvalidWeightsError(
            f"weights.kinds is {weights.kinds!r}; pass a mapping kind -> weights, kinds are {', '.join(KINDS)}"
        )
    kinds = {}
    for kind, values in weights.kinds.items():
        if kind not in KINDS:
            raise InvalidWeightsError(f"weights.kinds has unknown kind {kind!r}; valid kinds are {', '.join(KINDS)}")
        kinds[kind] = _per_adapter(values, names, f"weights.kinds[{kind!r}]")
    overrides = []
    for i, (pattern, values) in enumerate(pairs):
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise InvalidWeightsError(
                f"weights.overrides[{i}] filter {pattern!r} is not a valid regular expression ({exc}); fix the pattern"
            ) from None
        overrides.append((compiled, _per_adapter(values, names, f"weights.overrides[{i}] ({pattern!r})")))
    return WeightPlan(default, kinds, tuple(overrides))


def _pairs(overrides: Any) -> list[tuple[str, PerAdapter]]:
    if not isinstance(overrides, (list, tuple)):
        raise InvalidWeightsError(
            f"weights.overrides is {overrides!r}; pass a list of {{filter: REGEX, weights: [...]}} entries"
        )
    out = []
    for i, item in enumerate(overrides):
        if isinstance(item, Mapping) and set(item) == {"filter", "weights"}:
            out.append((item["filter"], item["weights"]))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        else:
            raise InvalidWeightsError(
                f"weights.overrides[{i}] is {item!r}; each override is {{filter: REGEX, weights: [...]}} or a (regex, weights) pair"
            )
    return out
