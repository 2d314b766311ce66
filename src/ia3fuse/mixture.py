"""Dynamic IA3 mixtures: a different mixture of K adapters per request, per sample, or per
token, in one batch, without re-merging; optionally chosen by a learned router.

Per sample b the IA3 vector of a module is ``1 + lam * sum_k alpha_bk tau_k`` (delta form, as
``task_arithmetic``) or ``exp(sum_k alpha_bk log l_k)`` (geometric form, as ``geometric``):
one ``(B, K) x (K, N)`` product per forward, then each IA3 module multiplies its slice
(`ia3fuse.scaling.ScaleHooks`). k/v scaling is per sample, so the KV cache stays consistent
during ``generate()``; beam search and ``num_return_sequences`` repeat each sample's row.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._io import atomic_output_dir, check_output_path
from ._runtime import model_device
from .adapter import IA3Adapter, PathLike, as_adapters, load_adapter
from .errors import IA3FuseError, InvalidParameterError, InvalidWeightsError, MethodInputError
from .forms import MethodForm, mix
from .fusion import get_method
from .merging import merge, trained_modules
from .router import Router, train_router
from .scaling import ScaleHooks, TaskStack

__all__ = ["Mixture", "Router", "train_router", "FORMS"]

FORMS = ("delta", "geometric")
WeightsLike = Union[Tensor, Sequence[Any], Mapping[str, float]]
_CACHE_KEYS = ("past_key_values", "cache")


class Mixture(nn.Module):
    """K IA3 adapters applied to one base model with run-time mixture weights.

    Weights are ``(K,)`` for the whole batch, ``(B, K)`` per sample (one-hot rows select one
    adapter per sample) or ``(B, T, K)`` per token; a mapping adapter name -> weight is a
    ``(K,)``. Set them with ``with mixture.using(weights): ...``, or pass ``mixture_weights=``
    to ``mixture(...)`` / ``mixture.generate(...)``. With a `Router` and no weights given, the
    router picks them from the base model's hidden states (computed in a routing pass over the
    prompt; later cached decoding steps reuse them).

    The module's parameters are the router's only; the base model stays frozen and is not a
    submodule (so ``Trainer`` or a plain loop trains just the router).

    Args:
        model: the base transformers model (or any module holding the IA3 target modules).
        adapters: IA3 adapters (objects or directories), a list or a mapping name -> adapter.
        form: ``"delta"`` (``1 + lam * sum alpha_k tau_k``, the default) or ``"geometric"``
            (``exp(sum alpha_k log l_k)``).
        lam: scale of the delta form.
        method, params: instead of ``form``, any fusion method that declares a form (TIES, DARE,
            magnitude pruning, breadcrumbs, SVD, a method you registered with ``form=``) and its
            parameters: each sample's scales are then that method's fusion with the sample's
            weights (`ia3fuse.forms`; sign-elected methods fix their election at uniform weights).
        router: an optional `Router`.
        extras: the adapters' trained modules (``modules_to_save``, e.g. a classifier head), which
            cannot vary per sample: ``"error"`` (default) runs with them when the adapters agree
            and refuses when they differ, ``"first"`` runs with the first adapter's, ``"drop"``
            with the model's own. They are copied into the model while the mixture is open;
            `close` restores the model's.

    Raises:
        IncompatibleAdaptersError: adapters that do not fit the model or each other.

    Example:
        >>> mix = ia3fuse.Mixture(model, {"math": "a/math", "code": "a/code"})  # doctest: +SKIP
        >>> with mix.using([[1.0, 0.0], [0.3, 0.7]]):  # doctest: +SKIP
        ...     out = model.generate(**batch)  # sample 0: math; sample 1: 0.3 math + 0.7 code
    """

    # Set with object.__setattr__ (not submodules) and register_buffer, which nn.Module's types
    # would otherwise read back as ``Tensor | Module``. The model's own methods (generate,
    # get_encoder) still read that way: the ignores below.
    model: nn.Module
    _tuner: Any  # PEFT's tuner model (from_peft) or None
    basis: Tensor
    _ones: Tensor

    def __init__(
        self,
        model: nn.Module,
        adapters: Any,
        *,
        form: Optional[str] = None,
        lam: float = 1.0,
        method: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
        router: Optional[Router] = None,
        allow_pickle: bool = False,
        extras: str = "error",
        _peft_tuner: Any = None,
    ):
        super().__init__()
        if method is not None and (form is not None or lam != 1.0):
            raise InvalidParameterError(
                f"method={method!r} takes its parameters (lam included) in params=...; pass either method (and params) "
                "or form and lam"
            )
        if method is None and params:
            raise InvalidParameterError("params apply to a method; pass method=... with them")
        form = "delta" if form is None and method is None else form
        if method is None and form not in FORMS:
            raise InvalidParameterError(f"form={form!r} is not a mixture form; pass one of {', '.join(FORMS)}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise InvalidParameterError(f"lam={lam!r}; pass a finite number")
        spec = get_method(method) if method is not None else None
        checked = spec.validate(dict(params or {})) if spec is not None else {}
        if hasattr(model, "peft_config") and _peft_tuner is None:
            raise IA3FuseError(
                f"the model is a {type(model).__name__}; build the mixture with Mixture.from_peft(peft_model) "
                "or pass the base model"
            )
        loaded = as_adapters(adapters, allow_pickle=allow_pickle)
        trained = trained_modules(model, loaded, extras)
        device = model_device(model)
        stack = TaskStack(loaded, device=device)
        agree = None
        if method is not None:  # the method's form (ia3fuse.forms), shared with the weight search
            k = len(stack.adapters)
            uniform = torch.full((k, stack.vectors.shape[1]), 1.0 / k)  # sign elections are fixed here
            shape = MethodForm(stack, method, checked, uniform, device)
            kind, basis, agree, lam = shape.kind, shape.basis, shape.agree, shape.lam
        elif form == "geometric":
            low = float(stack.vectors.min())
            if not low > 0:
                raise MethodInputError(
                    f"the geometric form takes log(l), so every IA3 value must be > 0, but the adapters hold {low:.6g}; "
                    "use form='delta'"
                )
            kind, basis = "log", stack.vectors.double().log().float()
        else:
            kind, basis = "delta", stack.vectors - 1
        object.__setattr__(self, "model", model)  # not a submodule: never trained, moved or saved with the router
        object.__setattr__(self, "_tuner", _peft_tuner)
        self.adapters: list[IA3Adapter] = stack.adapters
        self.segments = stack.segments
        self.form, self.lam, self.kind = form, float(lam), kind
        self.method = method if method is not None else ("task_arithmetic" if form == "delta" else "geometric")
        self.params = checked if method is not None else ({"lam": float(lam)} if form == "delta" else {})
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("agree", agree, persistent=False)
        self.register_buffer("_ones", torch.ones(1, basis.shape[1], device=basis.device), persistent=False)
        self.router = router
        if router is not None:
            self._check_router(router)
        self.hooks = ScaleHooks(model, stack.segments)
        self._route_cache: Optional[Tensor] = None
        with torch.no_grad():  # the chosen trained modules (e.g. a classifier head); close() restores the model's
            self._trained_originals = {name: t.detach().clone() for name, (t, _) in trained.items()}
            for t, value in trained.values():
                t.copy_(value.to(t.device, t.dtype))
        self._trained = {name: t for name, (t, _) in trained.items()}
        self.extras = extras

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_peft(cls, peft_model: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> "Mixture":
        """A mixture of IA3 adapters loaded in a PeftModel (all of them by default).

        PEFT's own IA3 layers are disabled while the mixture is open (`close` re-enables them).
        """
        from .live import _tuner, adapter_from_peft

        tuner = _tuner(peft_model)
        names = list(adapter_names) if adapter_names is not None else list(tuner.peft_config)
        adapters = [adapter_from_peft(peft_model, n) for n in names]
        tuner.disable_adapter_layers()
        try:
            return cls(tuner.model, adapters, _peft_tuner=tuner, **kwargs)
        except BaseException:
            tuner.enable_adapter_layers()
            raise

    def close(self) -> None:
        """Remove the hooks (and re-enable PEFT's layers for `from_peft`); the model is as before."""
        self.hooks.remove()
        with torch.no_grad():
            for name, original in self._trained_originals.items():
                self._trained[name].copy_(original)
        self._trained_originals = {}
        if self._tuner is not None:
            self._tuner.enable_adapter_layers()
            object.__setattr__(self, "_tuner", None)

    def __enter__(self) -> "Mixture":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def get_base_model(self) -> nn.Module:
        """The hooked model (as PeftModel names it), for code that inspects its forward."""
        return self.model

    # ------------------------------------------------------------------ weights
    def weights_tensor(self, weights: WeightsLike) -> Tensor:
        """Check ``weights`` and return them as a float32 tensor ``(K,)``, ``(B, K)`` or ``(B, T, K)``.

        Raises:
            InvalidWeightsError: wrong last dimension, rank, unknown names, NaN/Inf.
        """
        k = len(self.adapters)
        if isinstance(weights, Mapping):
            unknown = [n for n in weights if n not in self.names]
            if unknown:
                raise InvalidWeightsError(
                    f"mixture weights name no adapter {', '.join(map(repr, unknown))}; the adapters are {', '.join(map(repr, self.names))}"
                )
            weights = [float(weights.get(n, 0.0)) for n in self.names]
        try:
            # a tensor keeps its autograd graph (the mixture is differentiable in its weights)
            w = (
                weights.to(torch.float32)
                if isinstance(weights, Tensor)
                else torch.as_tensor(weights, dtype=torch.float32)
            )
        except (TypeError, ValueError) as exc:
            raise InvalidWeightsError(
                f"mixture weights {weights!r} are not numbers of shape (K,), (B, K) or (B, T, K) ({exc})"
            ) from None
        if w.dim() not in (1, 2, 3) or w.shape[-1] != k:
            raise InvalidWeightsError(
                f"mixture weights have shape {tuple(w.shape)} for {k} adapters ({', '.join(self.names)}); pass shape "
                f"({k},) for the batch, (B, {k}) per sample or (B, T, {k}) per token"
            )
        if not torch.isfinite(w).all():
            raise InvalidWeightsError("mixture weights hold NaN or Inf; pass finite numbers")
        return w

    def scales(self, weights: WeightsLike) -> Tensor:
        """The flat IA3 vectors for ``weights``: ``(N,)``, ``(B, N)`` or ``(B, T, N)``."""
        w = self.weights_tensor(weights).to(self.basis.device)
        rows = w.reshape(-1, w.shape[-1])
        flat = mix(self.kind, rows, self.basis, self.lam, self.agree, self._ones)
        return flat.reshape(*w.shape[:-1], flat.shape[-1])

    @contextlib.contextmanager
    def using(self, weights: WeightsLike) -> Iterator[None]:
        """Apply ``weights`` to every forward inside the block (the model's own calls too)."""
        before = self.hooks.scales
        self.hooks.scales = self.scales(weights)
        try:
            yield
        finally:
            self.hooks.scales = before

    # ------------------------------------------------------------------ running
    def route(
        self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **kwargs: Any
    ) -> Tensor:
        """The router's weights for a batch, from a pass of the base model (no IA3 applied)."""
        if self.router is None:
            raise IA3FuseError(
                "the mixture has no router; pass mixture_weights=..., or set mixture.router = Router(...)"
            )
        before = self.hooks.scales
        self.hooks.scales = None
        extra = {k: v for k, v in kwargs.items() if k in ("token_type_ids", "position_ids")}
        try:
            with torch.no_grad():
                if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
                    # route on the encoder's view of the input: the decoder has not started yet
                    encoder = self.model.get_encoder()  # type: ignore[operator]
                    out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
                else:
                    out = self.model(
                        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra
                    )
        finally:
            self.hooks.scales = before
        states = out.hidden_states
        hidden = states[self.router.config["layer"]]
        return self.router(hidden, attention_mask)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        decoder_input_ids: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        *args: Any,
        mixture_weights: Optional[WeightsLike] = None,
        **kwargs: Any,
    ) -> Any:
        """``model(...)`` under ``mixture_weights``, the router's, or those set by `using`.

        The common inputs are named so that ``Trainer`` keeps those dataset columns.
        """
        named = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
        }
        kwargs = {**{k: v for k, v in named.items() if v is not None}, **kwargs}
        if mixture_weights is not None:
            with self.using(mixture_weights):
                return self.model(*args, **kwargs)
        if self.router is None or self.hooks.scales is not None:
            if self.hooks.scales is None:
                raise IA3FuseError(
                    "no mixture weights: pass mixture_weights=..., use `with mixture.using(...)`, or add a router"
                )
            return self.model(*args, **kwargs)
        cached = any(kwargs.get(k) is not None for k in _CACHE_KEYS)
        if not cached or self._route_cache is None:
            self._route_cache = self.route(
                kwargs.get("input_ids"),
                kwargs.get("attention_mask"),
                **{k: v for k, v in kwargs.items() if k in ("token_type_ids", "position_ids")},
            )
        weights = self._route_cache
        self.hooks.scales = self.scales(weights)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.hooks.scales = None

    def generate(self, *args: Any, mixture_weights: Optional[WeightsLike] = None, **kwargs: Any) -> Any:
        """``model.generate`` with per-request or per-sample weights (or the router's, from the prompt)."""
        if mixture_weights is None:
            if self.hooks.scales is not None:
                return self.model.generate(*args, **kwargs)  # type: ignore[operator]
            ids = kwargs.get("input_ids", args[0] if args else None)
            mixture_weights = self.route(ids, kwargs.get("attention_mask"))
            if mixture_weights.dim() == 3:
                raise IA3FuseError(
                    "a token-level router cannot drive generate(): each step sees one new token; use a "
                    "sequence-level router (Router(level='sequence')) for generation"
                )
        w = self.weights_tensor(mixture_weights)
        if w.dim() == 3:
            raise InvalidWeightsError(
                "per-token weights (B, T, K) cannot drive generate(): each step sees one new token; pass (K,) or (B, K)"
            )
        with self.using(w.detach()):
            return self.model.generate(*args, **kwargs)  # type: ignore[operator]

    def export(self, weights: WeightsLike, *, name: str = "mixture") -> IA3Adapter:
        """A fixed mixture as an ordinary adapter: ``ia3fuse.merge`` with the same weights and the
        mixture's method (``task_arithmetic`` with ``lam`` for the delta form, ``geometric`` for the
        geometric one). For a sign-elected method (TIES), merge elects at these weights, while the
        mixture's election is fixed at uniform weights: the two agree at uniform weights."""
        w = self.weights_tensor(weights)
        if w.dim() != 1:
            raise InvalidWeightsError(
                f"export takes one mixture (K,), not weights of shape {tuple(w.shape)}; export each sample's row separately"
            )
        # the weights as given (float64), not their float32 copy: export equals merge bit for bit
        if isinstance(weights, Mapping):
            values = [float(weights.get(n, 0.0)) for n in self.names]
        else:
            values = torch.as_tensor(weights, dtype=torch.float64).tolist()
        return merge(self.adapters, values, self.method, name=name, **self.params)

    # ------------------------------------------------------------------ router I/O
    def _check_router(self, router: Router) -> None:
        if router.config["num_adapters"] != len(self.adapters):
            raise InvalidParameterError(
                f"the router maps to {router.config['num_adapters']} adapters but the mixture has {len(self.adapters)}; "
                "build Router(hidden_size, num_adapters=len(mixture.adapters))"
            )

    def add_router(
        self, *, level: str = "sequence", layer: int = -1, hidden: int = 0, temperature: float = 1.0
    ) -> Router:
        """Attach a new `Router` sized for this model and these adapters (on the model's device)."""
        size = getattr(getattr(self.model, "config", None), "hidden_size", None) or getattr(
            self.model.config, "d_model", None
        )
        if size is None:
            raise IA3FuseError(
                "the model's config names no hidden_size; build Router(hidden_size, K) yourself and assign it"
            )
        router = Router(size, len(self.adapters), level=level, layer=layer, hidden=hidden, temperature=temperature)
        self.router = router.to(self.basis.device)
        return self.router

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the mixture (its adapters, form, and router if any) to a directory, atomically."""
        from .adapter import _save_safetensors

        out = check_output_path(Path(path), overwrite=overwrite)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            (tmp / "adapters").mkdir()
            for i, a in enumerate(self.adapters):
                (tmp / "adapters" / str(i)).mkdir()
                a._write_files(tmp / "adapters" / str(i))  # inside this atomic write: errors name `out`
            meta = {
                "format": "ia3fuse-mixture",
                "version": 1,
                "names": self.names,
                "form": self.form,
                "lam": self.lam,
                "method": self.method,
                "params": self.params,
                "extras": self.extras,
                "router": None if self.router is None else self.router.config,
            }
            (tmp / "mixture.json").write_text(json.dumps(meta, indent=2) + "\n")
            if self.router is not None:
                state = {k: v.detach().contiguous().cpu() for k, v in self.router.state_dict().items()}
                _save_safetensors(state, tmp / "router.safetensors")
        return out

    @classmethod
    def load(cls, path: PathLike, model: nn.Module) -> "Mixture":
        """Load a mixture saved by `save` onto ``model`` (the same base).

        Raises:
            IA3FuseError: not a mixture directory, or a malformed one.
        """
        from safetensors.torch import load_file

        root = Path(path)
        try:
            meta = json.loads((root / "mixture.json").read_text())
        except (OSError, ValueError) as exc:
            raise IA3FuseError(
                f"{str(path)!r} is not a saved mixture (mixture.json: {exc}); pass a folder written by Mixture.save"
            ) from None
        if meta.get("format") != "ia3fuse-mixture" or not isinstance(meta.get("names"), list):
            raise IA3FuseError(f"{str(path)!r} holds no ia3fuse mixture (mixture.json format {meta.get('format')!r})")
        adapters = {n: load_adapter(root / "adapters" / str(i), name=n) for i, n in enumerate(meta["names"])}
        router = None
        if meta.get("router"):
            cfg = dict(meta["router"])
            router = Router(cfg.pop("hidden_size"), cfg.pop("num_adapters"), **cfg)
            router.load_state_dict(load_file(str(root / "router.safetensors")))
        if meta.get("form") is None and meta.get("method"):  # a mixture of a method's form
            mix = cls(
                model,
                adapters,
                method=meta["method"],
                params=meta.get("params") or {},
                extras=meta.get("extras", "error"),
            )
        else:
            mix = cls(model, adapters, form=meta["form"], lam=meta["lam"], extras=meta.get("extras", "error"))
        if router is not None:
            mix._check_router(router)
            mix.router = router.to(mix.basis.device)
        return mix
