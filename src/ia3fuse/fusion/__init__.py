"""Fusion methods: one registry of pure tensor functions (see ``registry``)."""

from . import builtin as _builtin  # noqa: F401  (registers the built-in methods)
from .registry import FORMS, MethodSpec, ParamSpec, get_method, join_params, method_names, methods, register

__all__ = ["FORMS", "MethodSpec", "ParamSpec", "get_method", "join_params", "method_names", "methods", "register"]
