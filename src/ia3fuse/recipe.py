"""The YAML recipe: one frozen pydantic schema for a fusion (also the source of CLI options).

Example recipe::

    adapters:
      - {path: adapters/math, name: math}
      - adapters/code
    method: ties
    weights: {math: 0.6, code: 0.4}
    parameters: {density: 0.5}
    output: fused
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from .errors import IA3FuseError, RecipeError
from .fusion import get_method
from .weights import WeightSchedule, plan_weights, weights_to_plain

__all__ = ["Recipe", "AdapterRef", "Schedule", "load_recipe", "parse_recipe"]

WeightValue = Union[float, list[float]]
PerAdapter = Union[list[WeightValue], dict[str, WeightValue]]


class AdapterRef(BaseModel):
    """One input adapter: a directory and an optional name (an adapter fused in memory, with no
    directory, is recorded by name only; such a recipe documents a fusion but cannot be run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Optional[str] = None
    name: Optional[str] = None

    @pydantic.model_validator(mode="after")
    def _named(self) -> "AdapterRef":
        if self.path is None and self.name is None:
            raise ValueError("an adapter entry needs a path (or at least a name)")
        return self

    def label(self) -> str:
        return self.name or Path(self.path or "").name


# The recipe's ``weights:`` mapping form is the API's schedule: one class, one set of checks.
Schedule = WeightSchedule


_WEIGHTS = pydantic.TypeAdapter(Optional[Union[Schedule, PerAdapter]])


def _names(adapters: list[Union[str, AdapterRef]]) -> list[str]:
    refs = [a if isinstance(a, AdapterRef) else AdapterRef(path=a) for a in adapters]
    return [r.label() for r in refs]


class Recipe(BaseModel):
    """A complete fusion: inputs, weights, method and parameters, output.

    Cross-field checks (method, parameters, weights against the adapter names) run in one
    validator and report every problem together.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    adapters: list[Union[str, AdapterRef]] = Field(min_length=1)
    method: str = "task_arithmetic"
    weights: Optional[Union[Schedule, PerAdapter]] = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    missing: Literal["identity", "zero"] = "identity"
    strict: bool = False
    mixed_bases: bool = False
    extras: Literal["error", "first", "average", "drop"] = "error"
    name: str = "fused"
    output: Optional[str] = None

    @property
    def refs(self) -> list[AdapterRef]:
        return [a if isinstance(a, AdapterRef) else AdapterRef(path=a) for a in self.adapters]

    def adapter_names(self) -> list[str]:
        return _names(self.adapters)

    def weights_arg(self) -> Any:
        """The weights in the form `ia3fuse.merge` takes."""
        return self.weights

    @pydantic.field_validator("weights", mode="before")
    @classmethod
    def _weights_form(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        # pydantic reports a value that fits no branch of the union once per branch, naming
        # neither the value nor the fix; plan_weights' message names both.
        if value is None or "adapters" not in info.data:
            return value
        try:
            _WEIGHTS.validate_python(value)
        except pydantic.ValidationError:
            try:
                plan_weights(value, _names(info.data["adapters"]))
            except IA3FuseError as exc:
                raise ValueError(str(exc)) from None
        return value

    @pydantic.model_validator(mode="after")
    def _check(self) -> "Recipe":
        problems = []
        try:
            get_method(self.method).validate(self.parameters)
        except IA3FuseError as exc:
            problems.append(str(exc))
        names = self.adapter_names()
        if len(set(names)) != len(names) and isinstance(self.weights, dict):
            problems.append(f"adapter names repeat ({', '.join(names)}); give each adapter a distinct name")
        else:
            try:
                plan_weights(self.weights_arg(), names)
            except IA3FuseError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def plain(self) -> dict[str, Any]:
        """The recipe as YAML/JSON data (model cards, recipe.yaml, GGUF metadata): every field that
        changes the result, options at their defaults left out."""
        out: dict[str, Any] = {
            "adapters": [{k: v for k, v in (("path", r.path), ("name", r.name)) if v is not None} for r in self.refs],
            "method": self.method,
            "weights": weights_to_plain(self.weights),
            "parameters": dict(self.parameters),
            "missing": self.missing,
        }
        for key, default in (("strict", False), ("mixed_bases", False), ("extras", "error")):
            if getattr(self, key) != default:
                out[key] = getattr(self, key)
        out["name"] = self.name
        if self.output is not None:
            out["output"] = self.output
        return out

    def resolved(self, base: Path) -> "Recipe":
        """The same recipe with relative adapter and output paths made relative to ``base``."""
        refs = [
            r
            if r.path is None
            else AdapterRef(path=str(base / r.path if not Path(r.path).is_absolute() else r.path), name=r.name)
            for r in self.refs
        ]
        out = (
            None
            if self.output is None
            else str(base / self.output if not Path(self.output).is_absolute() else self.output)
        )
        return self.model_copy(update={"adapters": refs, "output": out})


# The fields the cross-field checks (Recipe._check) read.
_CROSS_FIELDS = ("adapters", "method", "weights", "parameters")


def _problems(exc: pydantic.ValidationError) -> list[str]:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return parts


def _all_problems(data: dict[str, Any], exc: pydantic.ValidationError) -> list[str]:
    """Every problem of ``data``: pydantic skips the cross-field checks when any field fails, so
    they run again on the cross-checked fields alone when those are all valid."""
    problems = _problems(exc)
    failed = {err["loc"][0] for err in exc.errors() if err["loc"]}
    if not failed & set(_CROSS_FIELDS):
        try:
            Recipe.model_validate({k: data[k] for k in _CROSS_FIELDS if k in data})
        except pydantic.ValidationError as more:
            problems += _problems(more)
    return list(dict.fromkeys(problems))


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate already-parsed recipe data.

    Raises:
        RecipeError: listing every problem found.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source} holds a {type(data).__name__}, not a mapping; see docs/recipes.md for the format")
    try:
        return Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise RecipeError(f"{source} is invalid: {'; '.join(_all_problems(data, exc))}") from None


def load_recipe(path: Union[str, Path]) -> Recipe:
    """Read and validate a YAML recipe; relative paths in it are relative to its folder.

    Raises:
        RecipeError: unreadable file, malformed YAML, or invalid fields (all listed together).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {str(path)!r} cannot be read ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except (
        Exception
    ) as exc:  # PyYAML's constructors also raise ValueError, KeyError... on bad tags, RecursionError on nesting
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML ({detail}); fix the syntax") from None
    return parse_recipe(data, source=f"recipe {str(path)!r}").resolved(p.parent)
