"""The registry of fusion methods: name -> pure function, summary, paper, parameter schema.

A method is a function ``fn(vectors, weights, **params) -> Tensor`` where ``vectors`` is the
stack ``(k, *shape)`` of the k adapters' IA3 vectors for one module (identity = 1) and
``weights`` is a float64 tensor ``(k,)``. It returns the fused vector of shape ``shape``.
Its keyword-only parameters, with their type hints (``Annotated[..., Field(...)]`` for
ranges) and defaults, are its schema: validation, CLI flags and docs all read them.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import pydantic

from ..errors import InvalidParameterError, UnknownMethodError

if TYPE_CHECKING:  # the schema is read without torch, so the CLI's --help does not import it
    from torch import Tensor

__all__ = ["MethodSpec", "ParamSpec", "register", "get_method", "methods", "method_names", "FORMS", "join_params"]

MethodFn = Callable[..., "Tensor"]


@dataclass(frozen=True)
class ParamSpec:
    """One keyword parameter of a method."""

    name: str
    annotation: Any
    default: Any
    description: str

    @property
    def type_name(self) -> str:
        base = (
            typing.get_args(self.annotation)[0]
            if typing.get_origin(self.annotation) is typing.Annotated
            else self.annotation
        )
        if typing.get_origin(base) is typing.Literal:
            return "|".join(str(a) for a in typing.get_args(base))
        if typing.get_origin(base) in (typing.Union, types.UnionType):
            return "|".join(
                "None" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(base)
            )
        return getattr(base, "__name__", str(base))


@dataclass(frozen=True)
class MethodSpec:
    """A registered fusion method."""

    name: str
    fn: MethodFn
    summary: str
    paper: str
    params: tuple[ParamSpec, ...]
    randomized: bool
    _model: type[pydantic.BaseModel]
    _check: Optional[Callable[[dict[str, Any]], None]] = None
    form: Optional[str] = None  # its structure in the weights (see FORMS); None: merge only

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check parameter names, types and ranges; return them with defaults filled in.

        Raises:
            InvalidParameterError: naming every bad parameter and the valid ones.
        """
        valid = [p.name for p in self.params]
        unknown = sorted(set(params) - set(valid))
        problems = []
        if unknown:  # reported together with the known parameters' problems, all in one message
            listing = ", ".join(valid) if valid else "none"
            problems.append(
                f"method {self.name!r} has no parameter {', '.join(repr(u) for u in unknown)}; "
                f"its parameters are: {listing}"
            )
        known = {k: v for k, v in params.items() if k in valid}
        try:
            model = self._model(**known)
        except pydantic.ValidationError as exc:
            bad = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "?"
                spec = next(p for p in self.params if p.name == name)
                bad.append(f"{name}={params.get(name)!r} is invalid ({err['msg']}); {spec.description}")
            problems.append(f"method {self.name!r}: " + "; ".join(bad))
        if problems:
            raise InvalidParameterError("; ".join(problems))
        values = {p.name: getattr(model, p.name) for p in self.params}
        if self._check is not None:
            self._check(values)
        return values

    def __call__(self, vectors: Tensor, weights: Tensor, **params: Any) -> Tensor:
        return self.fn(vectors, weights, **self.validate(params))


_REGISTRY: dict[str, MethodSpec] = {}
FORMS = ("linear", "log", "delta", "elected")


def register(
    name: str,
    *,
    summary: str,
    paper: str,
    randomized: bool = False,
    check: Optional[Callable[[dict[str, Any]], None]] = None,
    form: Optional[str] = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register a pure fusion function under ``name``; its keyword-only parameters are its schema.

    ``check`` validates combinations of parameters (raising InvalidParameterError) before any
    work starts; single-parameter ranges belong in the type hints.

    ``form`` declares the method's structure in the weights, which makes it searchable
    (`ia3fuse.search_weights`) and mixable (`ia3fuse.Mixture`) through one differentiable
    function (`ia3fuse.forms`): ``"linear"`` (``sum_k w_k l_k``), ``"log"``
    (``exp(sum_k w_k log l_k)``), ``"delta"`` (``1 + lam * sum_k w_k B_k``, where ``B_k + 1`` is
    what the method makes of adapter k alone with weight 1 and ``lam=1``: true of every method
    whose preprocessing of the task vectors does not depend on the weights) or ``"elected"`` (TIES-style:
    the ``delta`` basis, a sign election per entry, the weighted mean of the agreeing entries).
    None: the method only merges.
    """
    if form is not None and form not in FORMS:
        raise ValueError(f"form={form!r} is not a method form; pass one of {', '.join(FORMS)} or None")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise RuntimeError(f"fusion method {name!r} is registered twice")
        hints = _keyword_hints(fn)
        fields: dict[str, Any] = {}
        params = []
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            ann = hints[p.name]
            description = ""
            if typing.get_origin(ann) is typing.Annotated:
                for meta in typing.get_args(ann)[1:]:
                    if isinstance(meta, pydantic.fields.FieldInfo) and meta.description:
                        description = meta.description
            fields[p.name] = (ann, p.default)
            params.append(ParamSpec(p.name, ann, p.default, description))
        model = pydantic.create_model(
            f"{name}_params", __config__=pydantic.ConfigDict(strict=False, extra="forbid"), **fields
        )
        _REGISTRY[name] = MethodSpec(name, fn, summary, paper, tuple(params), randomized, model, check, form)
        return fn

    return decorate


def _keyword_hints(fn: MethodFn) -> dict[str, Any]:
    """The resolved type hints of ``fn``'s keyword-only parameters (the schema) alone: the
    tensors' hints stay unresolved, so a module of methods needs torch only inside its functions."""
    keyword = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    holder = types.SimpleNamespace(__annotations__={n: fn.__annotations__[n] for n in keyword})
    return typing.get_type_hints(holder, globalns=fn.__globals__, include_extras=True)


def get_method(name: str) -> MethodSpec:
    """Return the registered method ``name``.

    Raises:
        UnknownMethodError: listing the valid names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown fusion method {name!r}; valid methods are: {', '.join(method_names())}"
        ) from None


def method_names() -> list[str]:
    """Names of all registered methods, in registration order."""
    return list(_REGISTRY)


def methods() -> list[MethodSpec]:
    """All registered methods with their summary, paper and parameters.

    Example:
        >>> import ia3fuse
        >>> [m.name for m in ia3fuse.methods()][:3]
        ['linear', 'task_arithmetic', 'geometric']
    """
    return list(_REGISTRY.values())


def join_params(params: Optional[Mapping[str, Any]], keywords: Mapping[str, Any]) -> dict[str, Any]:
    """A call's method parameters: ``params={...}`` plus the same given as keyword arguments
    (sugar); a name given both ways is refused rather than silently overridden."""
    if params is not None and not isinstance(params, Mapping):
        raise InvalidParameterError(f"params={params!r} is not a mapping; pass the method's parameters as a dict")
    clash = sorted(set(params or {}) & set(keywords))
    if clash:
        raise InvalidParameterError(
            f"method parameter(s) {', '.join(map(repr, clash))} given both in params= and as keyword arguments; "
            "pass each once"
        )
    return {**(params or {}), **keywords}
