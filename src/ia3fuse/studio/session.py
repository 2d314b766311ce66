"""The studio's logic, without a web server: a fusion's settings -> outputs and scores on the
page's prompts and examples, weight search, export. `ia3fuse.studio.server` only routes
requests here; the unit tests drive this class directly.

A fusion is fused by `ia3fuse.merge` itself (vector arithmetic over the adapters' entries,
milliseconds) and applied to the base model through one `ScaleHooks` tensor assignment: no
PEFT, no reload, and what the page shows is exactly what an export writes.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._io import atomic_output_dir, check_output_path
from .._runtime import model_device
from ..adapter import IA3Adapter, PathLike, as_adapters
from ..errors import DataError, IA3FuseError, InvalidParameterError, InvalidWeightsError
from ..forms import formed_methods
from ..fusion import get_method, methods
from ..merging import Extras, merge, trained_modules
from ..recipe import AdapterRef, Recipe
from ..scaling import ScaleHooks, TaskStack
from ..search import SearchResult, make_batches, search_weights
from ..search.data import model_family
from ..search.space import WeightSpace
from ..weights import weights_to_plain

__all__ = ["Studio", "Fusion", "MAX_NEW_TOKENS", "MAX_PROMPTS"]

MAX_NEW_TOKENS = 256
MAX_PROMPTS = 16
BASE = "base"
FUSED = "fusion"


class Fusion:
    """One fusion as the page sets it: a weight per adapter, or a per-layer map, a method and
    its parameters. Checked on construction (the messages name the value and the fix)."""

    def __init__(self, studio: "Studio", data: Mapping[str, Any]):
        k, groups = len(studio.names), studio.groups
        method = data.get("method", "task_arithmetic")
        if not isinstance(method, str):
            raise InvalidParameterError(f"method {method!r} is not a method name; pick one of the listed methods")
        self.method = method
        spec = get_method(method)
        raw = data.get("params") or {}
        if not isinstance(raw, Mapping):
            raise InvalidParameterError(f"params {raw!r} are not a mapping of parameter names to values")
        # blank fields on the page arrive as None: the parameter's default
        given = {str(n): v for n, v in raw.items() if v is not None and v != ""}
        self.params = spec.validate(given)
        self.weights = _numbers(data.get("weights"), (k,), f"one weight per adapter ({', '.join(studio.names)})")
        table = data.get("layer_weights")
        self.layer_weights = (
            None
            if table is None
            else _numbers(table, (k, len(groups)), f"a {k} x {len(groups)} table (adapters x layer groups)")
        )

    def theta(self) -> Tensor:
        """The weights as search's ``(K, G)`` table over the studio's layer groups."""
        if self.layer_weights is not None:
            return torch.tensor(self.layer_weights, dtype=torch.float64)
        return torch.tensor(self.weights, dtype=torch.float64).unsqueeze(1)

    def schedule(self, studio: "Studio") -> Any:
        """The weights in the form `ia3fuse.merge` and a recipe take: a list, or a `WeightSchedule`
        with one override per layer (`WeightSpace.schedule`, as the layer-wise search writes)."""
        if self.layer_weights is None:
            return list(self.weights)
        return studio.space.schedule(self.theta())

    def plain(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": dict(self.params),
            "weights": list(self.weights),
            "layer_weights": self.layer_weights,
        }


def _numbers(value: Any, shape: tuple[int, ...], what: str) -> Any:
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidWeightsError(f"weights {value!r} are not numbers; pass {what}") from None
    if tuple(t.shape) != shape:
        raise InvalidWeightsError(f"weights have shape {tuple(t.shape)}; pass {what}")
    if not torch.isfinite(t).all():
        raise InvalidWeightsError("weights hold NaN or Inf; pass finite numbers")
    return t.tolist()


class Studio:
    """A base model with K adapters, hooked once, ready to show any fusion of them.

    Args:
        model: the base transformers model (causal LM, seq2seq LM or sequence classifier; any
            other module shows how far its output moves from the base's).
        adapters: IA3 adapters (objects or directories), a list or a mapping name -> adapter.
        tokenizer: the base model's tokenizer (needed for prompts and text examples).
        records: examples as `ia3fuse.search_weights` reads them (``input`` with ``target`` or
            ``label`` for scores and search; ``input`` alone for prompts and the entropy search).
        base_dir: the base model's folder, for exports that fold into it.
        extras: the adapters' heads (``modules_to_save``): as in `ia3fuse.Mixture`.

    Raises:
        IncompatibleAdaptersError: adapters that do not fit the model or each other.
        DataError: examples the model cannot take.
    """

    def __init__(
        self,
        model: Any,
        adapters: Any,
        *,
        tokenizer: Any = None,
        records: Optional[Sequence[Mapping[str, Any]]] = None,
        base_dir: Optional[PathLike] = None,
        extras: Extras = "error",
        title: str = "",
    ):
        self.model = model.eval()
        self.adapters: list[IA3Adapter] = as_adapters(adapters)
        if not self.adapters:
            raise IA3FuseError("no adapters given; pass at least one adapter")
        self.tokenizer = tokenizer
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.extras = extras
        self.title = title or type(model).__name__
        self.family = model_family(model)
        self.device = model_device(model)
        self.stack = TaskStack(self.adapters, device=self.device)
        self.space = WeightSpace(self.stack, "layer")
        trained = trained_modules(model, self.adapters, extras)
        self.hooks = ScaleHooks(model, self.stack.segments)
        with torch.no_grad():  # the adapters' shared heads, restored by close()
            self._originals = {n: t.detach().clone() for n, (t, _) in trained.items()}
            for t, v in trained.values():
                t.copy_(v.to(t.device, t.dtype))
        self._trained = {n: t for n, (t, _) in trained.items()}
        self.records = [dict(r) for r in (records or [])]
        self.labeled = bool(self.records) and all(("target" in r or "label" in r) for r in self.records)
        self.batches = (
            make_batches(self.records, model, tokenizer=tokenizer, batch_size=8, need_labels=True)
            if self.labeled
            else []
        )
        if self.records and not self.labeled:  # unlabeled examples are prompts; check they encode
            make_batches(self.records, model, tokenizer=tokenizer, batch_size=8, need_labels=False)
        self._lock = threading.Lock()
        self._busy: Optional[str] = None
        self._cache: dict[Any, Any] = {}

    @classmethod
    def from_dirs(
        cls,
        model_dir: PathLike,
        adapters: Sequence[PathLike],
        *,
        data: Optional[PathLike] = None,
        tokenizer_dir: Optional[PathLike] = None,
        extras: Extras = "error",
    ) -> "Studio":
        """Load the base model (a classifier when the examples have labels or its config names a
        ``...ForSequenceClassification``), its tokenizer and the adapters from local folders.

        Raises:
            DataError: no model or tokenizer in the folder, unreadable examples.
        """
        import json

        from ..search import load_model, load_tokenizer, read_records

        records = read_records(data) if data is not None else []
        try:
            archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            archs = []
        classifier = any("label" in r for r in records) or any("SequenceClassification" in a for a in archs)
        model = load_model(model_dir, classifier=classifier)
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        return cls(
            model,
            list(adapters),
            tokenizer=tokenizer,
            records=records,
            base_dir=model_dir,
            extras=extras,
            title=Path(model_dir).name,
        )

    # ------------------------------------------------------------------ description
    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def groups(self) -> list[str]:
        return list(self.space.groups)

    def info(self) -> dict[str, Any]:
        """What the page needs to draw itself: adapters, layer groups, methods and their
        parameters, the examples, the model's family."""
        searchable = set(formed_methods())
        listed = []
        for spec in methods():
            listed.append(
                {
                    "name": spec.name,
                    "summary": spec.summary,
                    "searchable": spec.name in searchable,
                    "params": [
                        {
                            "name": p.name,
                            "type": p.type_name,
                            "default": p.default if _plain(p.default) else None,
                            "description": p.description,
                        }
                        for p in spec.params
                    ],
                }
            )
        return {
            "title": self.title,
            "family": self.family,
            "adapters": self.names,
            "groups": self.groups,
            "methods": listed,
            "prompts": self.default_prompts(),
            "examples": len(self.records),
            "labeled": self.labeled,
            "can_fold": self.base_dir is not None,
            "metric": self._metric_name(),
        }

    def default_prompts(self) -> list[str]:
        return [str(r.get("input", r.get("text", ""))) for r in self.records[:4]]

    def _metric_name(self) -> str:
        return "accuracy" if self.family == "classifier" else "target-token accuracy"

    # ------------------------------------------------------------------ fusions
    def fusion(self, data: Mapping[str, Any]) -> Fusion:
        return Fusion(self, data)

    def fuse(self, fusion: Fusion, *, name: str = "fused") -> IA3Adapter:
        """The fused adapter for ``fusion``: `ia3fuse.merge` with its weights, method and parameters."""
        return merge(
            self.adapters, fusion.schedule(self), fusion.method, extras=self.extras, name=name, **fusion.params
        )

    def _flat(self, adapter: IA3Adapter) -> Tensor:
        return torch.cat(
            [adapter.vectors[s.path].reshape(-1).to(self.device, torch.float32) for s in self.stack.segments]
        )

    @contextlib.contextmanager
    def _model(self, why: str) -> Iterator[None]:
        """The model for one piece of work; another request meanwhile is told what runs."""
        if not self._lock.acquire(blocking=False):
            # a short wait for another page request; a search holds the model for its whole run
            if self._busy == "search" or not self._lock.acquire(timeout=120):
                raise IA3FuseError(
                    f"the model is busy with a {self._busy or 'request'}; wait for it to finish, then try again"
                )
        self._busy = why
        try:
            yield
        finally:
            self.hooks.scales = None
            self._busy = None
            self._lock.release()

    def outputs(
        self, fusion: Union[Fusion, Mapping[str, Any]], prompts: Sequence[str], *, max_new_tokens: int = 20
    ) -> dict[str, Any]:
        """The outputs of the base model, each single adapter and ``fusion`` on ``prompts``, and
        their scores on the labeled examples.

        Returns:
            ``columns`` (base, the adapters, fusion), ``rows`` (one list per prompt, one cell
            per column: text for LMs, ``label (score)`` for classifiers), ``scores`` (column ->
            ``{"loss", "accuracy"}``, labeled examples only), ``ms`` (the fusion's fuse + forward
            time).

        Raises:
            InvalidWeightsError, InvalidParameterError, MethodInputError: a bad fusion.
            DataError: prompts the model cannot take.
        """
        fusion = fusion if isinstance(fusion, Fusion) else self.fusion(fusion)
        prompts = self._check_prompts(prompts, max_new_tokens)
        columns = [BASE, *self.names, FUSED]
        with self._model("request"):
            start = time.perf_counter()
            fused_flat = self._flat(self.fuse(fusion))
            fused_cells = self._column(fused_flat, prompts, max_new_tokens)
            fused_scores = self._scores(fused_flat)
            took = (time.perf_counter() - start) * 1e3
            cells = []
            scores = {}
            for i, col in enumerate(columns[:-1]):  # the fixed columns: computed once per prompt set
                flat = None if col == BASE else self.stack.vectors[i - 1].to(self.device, torch.float32)
                key = (col, tuple(prompts), max_new_tokens)
                if key not in self._cache:
                    self._cache[key] = self._column(flat, prompts, max_new_tokens)
                if ("scores", col) not in self._cache:
                    self._cache[("scores", col)] = self._scores(flat)
                cells.append(self._cache[key])
                scores[col] = self._cache[("scores", col)]
        cells.append(fused_cells)
        scores[FUSED] = fused_scores
        rows = [[column[j] for column in cells] for j in range(len(prompts))]
        return {
            "columns": columns,
            "rows": rows,
            "prompts": prompts,
            "scores": {k: v for k, v in scores.items() if v is not None},
            "ms": took,
            "fusion": fusion.plain(),
        }

    def _check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise DataError("prompts must be a list of strings, one per line")
        prompts = [p for p in prompts if p.strip()]
        if len(prompts) > MAX_PROMPTS:
            raise DataError(f"{len(prompts)} prompts; the page shows at most {MAX_PROMPTS}, remove some")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 256:
            raise InvalidParameterError(
                f"max tokens {max_new_tokens!r}; pass a whole number from 1 to {MAX_NEW_TOKENS}"
            )
        if prompts and self.tokenizer is None:
            raise DataError("the studio has no tokenizer, so it cannot read prompts; start it with --tokenizer DIR")
        return prompts

    def _column(self, flat: Optional[Tensor], prompts: list[str], max_new_tokens: int) -> list[str]:
        if not prompts:
            return []
        self.hooks.scales = flat
        try:
            with torch.no_grad():
                if self.family in ("causal", "seq2seq"):
                    return self._generate(prompts, max_new_tokens)
                if self.family == "classifier":
                    return self._classify(prompts)
                return self._represent(prompts, flat)
        finally:
            self.hooks.scales = None

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _encode(self, prompts: list[str], left: bool) -> dict[str, Tensor]:
        """Tokenize a batch, padded on the left for causal generation; the tokenizer's own
        settings (padding side, a missing pad token) are put back afterwards."""
        tok = self.tokenizer
        side, pad_token = getattr(tok, "padding_side", "right"), tok.pad_token
        if pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
        tok.padding_side = "left" if left else "right"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
            if pad_token is None:
                tok.pad_token = None
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        causal = self.family == "causal"
        enc = self._encode(prompts, left=causal)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if causal and isinstance(context, int) and enc["input_ids"].shape[1] + max_new_tokens > context:
            raise DataError(
                f"a prompt of {enc['input_ids'].shape[1]} tokens plus {max_new_tokens} new ones exceeds the model's "
                f"context of {context}; shorten the prompt or lower max tokens"
            )
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self._pad_id(),
        )
        new = out[:, enc["input_ids"].shape[1] :] if causal else out
        return [t for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _classify(self, prompts: list[str]) -> list[str]:
        logits = self.model(**self._encode(prompts, left=False)).logits.float()
        probs = logits.softmax(-1)
        labels = getattr(self.model.config, "id2label", None) or {}
        cells = []
        for row in probs:
            j = int(row.argmax())
            cells.append(f"{labels.get(j, str(j))} ({float(row[j]):.3f})")
        return cells

    def _represent(self, prompts: list[str], flat: Optional[Tensor]) -> list[str]:
        out = self.model(**self._encode(prompts, left=False))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            return ["(no text output)"] * len(prompts)
        pooled = hidden.float().mean(1)
        key = ("pooled", tuple(prompts))
        if flat is None:
            self._cache[key] = pooled
        base = self._cache.get(key, pooled)
        cos = torch.nn.functional.cosine_similarity(pooled, base, dim=-1)
        return [f"cosine to base {float(c):.4f}" for c in cos]

    def _scores(self, flat: Optional[Tensor]) -> Optional[dict[str, float]]:
        """Mean loss (each batch's mean weighted by its size, as the search's objective) and
        accuracy on the labeled examples."""
        if not self.batches:
            return None
        self.hooks.scales = flat
        total, right, count, n = 0.0, 0, 0, 0
        try:
            with torch.no_grad():
                for b in self.batches:
                    inputs = b.to(self.device).model_inputs
                    out = self.model(**inputs)
                    total += float(out.loss) * b.size
                    n += b.size
                    labels = inputs["labels"]
                    logits = out.logits
                    if self.family == "causal":
                        pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
                    else:
                        pred, gold = logits.argmax(-1), labels
                    mask = gold != -100
                    right += int((pred[mask] == gold[mask]).sum())
                    count += int(mask.sum())
        finally:
            self.hooks.scales = None
        return {"loss": total / n, "accuracy": right / count if count else math.nan}

    # ------------------------------------------------------------------ search
    def search(
        self,
        fusion: Union[Fusion, Mapping[str, Any]],
        *,
        optimizer: str = "adam",
        granularity: str = "task",
        budget: Optional[int] = None,
        objective: str = "loss",
        on_step: Optional[Callable[[dict[str, float]], None]] = None,
    ) -> dict[str, Any]:
        """`ia3fuse.search_weights` on the studio's examples, starting from ``fusion``'s weights,
        with its method and parameters; returns the found fusion (for the sliders) and the run.

        Raises:
            DataError: no examples (or unlabeled ones for the loss).
            InvalidParameterError: a method with no differentiable form, a bad budget, optimizer
                or granularity.
        """
        fusion = fusion if isinstance(fusion, Fusion) else self.fusion(fusion)
        if not self.records:
            raise DataError("the studio has no examples to search on; start it with --data FILE.jsonl")
        if granularity not in ("task", "layer"):
            raise InvalidParameterError(f"granularity {granularity!r}; pick task or layer")
        init = fusion.theta()
        if granularity == "task":
            init = init.mean(1)  # a per-layer map starts a task-wise search from its row means
        elif init.shape[1] == 1:
            init = init.expand(-1, len(self.groups)).clone()
        with self._model("search"):
            result: SearchResult = search_weights(
                self.model,
                self.adapters,
                self.records,
                tokenizer=self.tokenizer,
                objective=objective,
                granularity=granularity,
                optimizer=optimizer,
                method=fusion.method,
                budget=budget,
                init=init,
                extras=self.extras,
                callback=on_step,
                seed=int(fusion.params.get("seed", 0)),  # search sets a randomized method's seed itself
                params={k: v for k, v in fusion.params.items() if k != "seed"},
            )
        table = result.weights.to(torch.float64)
        found: dict[str, Any] = {"method": fusion.method, "params": dict(fusion.params)}
        if granularity == "task":
            found.update(weights=table[:, 0].tolist(), layer_weights=None)
        else:
            found.update(weights=table.mean(1).tolist(), layer_weights=table.tolist())
        return {
            "fusion": found,
            "objective": result.objective,
            "initial": result.initial_objective,
            "final": result.final_objective,
            "history": [{"forwards": h["forwards"], "objective": h["objective"]} for h in result.history],
        }

    # ------------------------------------------------------------------ export
    def recipe(self, fusion: Fusion, *, name: str = "fused", relative_to: Optional[Path] = None) -> Recipe:
        """The recipe that ``ia3fuse merge`` turns into the export's adapter bit for bit."""
        import os

        refs: list[Union[str, AdapterRef]] = []
        for a in self.adapters:
            if a.source is None:
                refs.append(AdapterRef(name=a.name))
                continue
            where = Path(a.source).resolve()
            path = where if relative_to is None else Path(os.path.relpath(where, relative_to.resolve()))
            refs.append(AdapterRef(path=str(path), name=a.name))
        return Recipe(
            adapters=refs,
            method=fusion.method,
            weights=weights_to_plain(fusion.schedule(self)),
            parameters=dict(fusion.params),
            extras=self.extras,
            name=name,
        )

    def export(
        self,
        fusion: Union[Fusion, Mapping[str, Any]],
        folder: PathLike,
        *,
        adapter: bool = True,
        recipe: bool = True,
        fold: bool = False,
        overwrite: bool = False,
        name: str = "fused",
    ) -> dict[str, Any]:
        """Write the fusion to ``folder`` atomically: ``adapter/`` (loads with
        ``PeftModel.from_pretrained``), ``recipe.yaml`` (``ia3fuse merge recipe.yaml -o OUT``
        reproduces the adapter bit for bit) and, with ``fold``, ``model/``: the base with the
        fusion folded in (`ia3fuse.fold_checkpoint`).

        Raises:
            OutputPathError: the folder exists and ``overwrite`` is False, or it is an input.
            IA3FuseError: nothing to write, or ``fold`` without the base model's folder.
        """
        import yaml

        from ..folding import fold_checkpoint

        fusion = fusion if isinstance(fusion, Fusion) else self.fusion(fusion)
        if not (adapter or recipe or fold):
            raise IA3FuseError("nothing to export; tick the adapter, the recipe or the folded model")
        if fold and self.base_dir is None:
            raise IA3FuseError(
                "the studio was given a model in memory, not its folder, so it cannot fold; start it with --model DIR"
            )
        if not isinstance(folder, (str, Path)) or not str(folder).strip():
            raise IA3FuseError("no export folder given; type a folder path")
        inputs = [Path(a.source) for a in self.adapters if a.source is not None]
        if self.base_dir is not None:
            inputs.append(self.base_dir)
        out = check_output_path(Path(folder).expanduser(), inputs, overwrite=overwrite)
        fused = self.fuse(fusion, name=name)
        written = []
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            if adapter:
                (tmp / "adapter").mkdir()
                fused._write_files(tmp / "adapter")
                written.append("adapter/")
            if recipe:
                plain = self.recipe(fusion, name=name, relative_to=out).plain()
                (tmp / "recipe.yaml").write_text(
                    "# ia3fuse studio export; reproduce the adapter with: ia3fuse merge recipe.yaml -o OUT\n"
                    + yaml.safe_dump(plain, sort_keys=False)
                )
                written.append("recipe.yaml")
            if fold:
                assert self.base_dir is not None
                fold_checkpoint(self.base_dir, fused, tmp / "model", progress=False)
                written.append("model/")
        return {"folder": str(out), "written": written}

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Take the hooks off and put the model's own heads back."""
        self.hooks.remove()
        with torch.no_grad():
            for n, original in self._originals.items():
                self._trained[n].copy_(original)
        self._originals = {}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
