"""IA3Adapter: a PEFT IA3 adapter as plain data (config + {module path: vector}); load and save.

Plumbing only: module paths, feed-forward flags and PEFT's file layout. No fusion math.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._io import atomic_output_dir, check_output_path
from .errors import AdapterFormatError, InvalidParameterError
from ._text import count

if TYPE_CHECKING:
    from .recipe import Recipe

__all__ = ["IA3Adapter", "load_adapter", "is_feedforward_module", "KEY_PREFIX"]

KEY_PREFIX = "base_model.model."
_SUFFIX = ".ia3_l"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

PathLike = Union[str, Path]


def is_feedforward_module(feedforward_modules: Any, path: str) -> bool:
    """PEFT's own rule: a regex string must fullmatch the path; a list entry must end it."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(name) for name in feedforward_modules)


def _targets_module(target_modules: Any, path: str) -> bool:
    """PEFT's rule for target_modules: regex fullmatch, or exact name / dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules or ())


@dataclass
class IA3Adapter:
    """A PEFT IA3 adapter held in memory.

    Attributes:
        vectors: module path (relative to the base model, e.g.
            ``model.layers.0.self_attn.k_proj``) -> IA3 vector ``l`` in PEFT's shape:
            ``(out, 1)`` output-side, ``(1, in)`` feed-forward, ``(1, C, 1, 1)`` for convolutions.
        feedforward: module path -> True when ``l`` scales the module's input.
        config: the ``adapter_config.json`` content (a PEFT ``IA3Config`` as a dict).
        name: a short name used in recipes, weight mappings and messages.
        extras: tensors that are not IA3 vectors (``modules_to_save``), by their saved key.
        recipe: how this adapter was fused, when it was (written to its model card).
        source: the directory it was loaded from, if any.
    """

    vectors: dict[str, Tensor]
    feedforward: dict[str, bool]
    config: dict[str, Any]
    name: str = "adapter"
    extras: dict[str, Tensor] = field(default_factory=dict)
    recipe: Optional["Recipe"] = None
    source: Optional[str] = None

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def base_model(self) -> Optional[str]:
        """The ``base_model_name_or_path`` the adapter was trained on, if recorded."""
        return self.config.get("base_model_name_or_path")

    def kind(self, path: str) -> str:
        """``"feedforward"`` for input-side modules, ``"attention"`` for every output-side one."""
        return "feedforward" if self.feedforward[path] else "attention"

    def task_vectors(self) -> dict[str, Tensor]:
        """``tau = l - 1`` per module: what fusion methods other than ``linear`` combine."""
        return {p: v - 1 for p, v in self.vectors.items()}

    def peft_config(self) -> Any:
        """The config as a ``peft.IA3Config`` object."""
        from peft import IA3Config

        cfg = {k: v for k, v in self.config.items() if k != "peft_type"}
        return IA3Config(**{k: v for k, v in cfg.items() if k in IA3Config.__dataclass_fields__})

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors as PEFT saves them: ``base_model.model.<path>.ia3_l`` plus extras."""
        out = {f"{KEY_PREFIX}{p}{_SUFFIX}": v.detach().contiguous().cpu() for p, v in self.vectors.items()}
        out.update({k: v.detach().contiguous().cpu() for k, v in self.extras.items()})
        return out

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write a directory that ``PeftModel.from_pretrained`` loads, atomically.

        Writes ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md`` model
        card that records the fusion recipe.

        Args:
            path: the output directory; it must not exist unless ``overwrite``.
            overwrite: replace an existing directory (only once the new one is complete).

        Returns:
            The absolute output path.

        Raises:
            OutputPathError: the path exists, is a symlink, or its parent is missing.
        """
        out = check_output_path(Path(path), overwrite=overwrite)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            self._write_files(tmp)
        return out

    def _write_files(self, folder: Path) -> None:
        """Write the three files into an existing ``folder`` (callers own its atomicity)."""
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        _save_safetensors(self.state_dict(), folder / SAFETENSORS_NAME, metadata={"format": "pt"})
        (folder / "README.md").write_text(self._model_card())

    def _model_card(self) -> str:
        lines = [
            "---",
            "library_name: peft",
            "tags: [ia3, ia3fuse]",
        ]
        if self.base_model:
            lines.append(f"base_model: {self.base_model}")
        lines += ["---", "", f"# {self.name}", ""]
        n_ff = sum(self.feedforward.values())
        lines.append(
            f"An IA3 adapter with {count(len(self.vectors), 'module')} ({n_ff} feed-forward), written by ia3fuse."
        )
        if self.recipe is not None:
            lines += [
                "",
                "## Fusion recipe",
                "",
                "```yaml",
                yaml.safe_dump(self.recipe.plain(), sort_keys=False).rstrip(),
                "```",
            ]
        return "\n".join(lines) + "\n"


def trained_module_targets(model: Any, extras: dict[str, Tensor]) -> tuple[dict[str, tuple[Tensor, Tensor]], list[str]]:
    """Where an adapter's trained modules (``modules_to_save`` tensors, saved as
    ``base_model.model.<name>``) go in ``model``: (tensor name -> (the model's tensor, the value),
    problems). Inside a PeftModel's ModulesToSaveWrapper the target is its original module.
    Nothing is changed."""
    out, problems = {}, []
    for key, value in extras.items():
        name = key.removeprefix("base_model.model.")
        tensor = _tensor_at(model, name)
        if tensor is None:  # inside a PeftModel's ModulesToSaveWrapper: its original module
            owner, _, leaf = name.rpartition(".")
            wrapped = f"{owner}.original_module.{leaf}" if owner else ""
            if wrapped and _tensor_at(model, wrapped) is not None:
                name, tensor = wrapped, _tensor_at(model, wrapped)
        if tensor is None:
            problems.append(f"{key!r} has no tensor {name!r} in the model")
        elif tuple(tensor.shape) != tuple(value.shape):
            problems.append(f"{key!r} is {tuple(value.shape)} but the model's {name!r} is {tuple(tensor.shape)}")
        else:
            out[name] = (tensor, value)
    return out, problems


def _tensor_at(model: Any, name: str) -> Optional[Tensor]:
    """The parameter or buffer ``name`` of ``model``, found without ``state_dict()`` (which makes
    bitsandbytes undo its CPU repack as a side effect)."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    tensor = (
        getattr(module, leaf, None)
        if leaf in dict(module.named_parameters(recurse=False)) or leaf in dict(module.named_buffers(recurse=False))
        else None
    )
    return tensor if isinstance(tensor, Tensor) else None


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (e.g. a full disk) raised as OSError.

    safetensors reports them as its own SafetensorError; as an OSError they reach
    `atomic_output_dir`, which turns them into an OutputPathError naming the output.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise OSError(f"{exc}") from exc


def _check_name(name: str) -> None:
    # PEFT saves an adapter to a folder of its name (save_pretrained writes DIR/<name>), so a
    # name that climbs out of a folder is refused wherever it comes from.
    parts = re.split(r"[/\\]", name)
    if ".." in parts or name.startswith(("/", "\\")):
        plain = next((q for q in reversed(parts) if q not in ("", ".", "..")), "adapter")
        raise InvalidParameterError(
            f"adapter name {name!r} is a path that leaves its folder ('..' or a leading '/'); PEFT saves each "
            f"adapter to a folder of its name, so pass a plain name such as {plain!r}"
        )


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(
            f"{str(path)!r} has no {CONFIG_NAME}; pass a PEFT adapter directory (the folder save_pretrained wrote)"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int of >4300 digits, deep nesting
        raise AdapterFormatError(
            f"{str(cfg_path)!r} is not valid JSON ({exc}); re-save the adapter with PEFT"
        ) from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{str(cfg_path)!r} holds a {type(config).__name__}, not a JSON object")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "IA3":
        raise AdapterFormatError(
            f"{str(path)!r} is a {peft_type} adapter, not IA3 (peft_type={peft_type!r}); ia3fuse fuses IA3 adapters only"
        )
    for key in ("target_modules", "feedforward_modules"):
        value = config.get(key)
        if value is not None and not isinstance(value, (str, list)):
            raise AdapterFormatError(
                f"{str(cfg_path)!r}: {key} is {value!r} (a {type(value).__name__}); PEFT writes a list of names or a regex string"
            )
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            bad = next(v for v in value if not isinstance(v, str))
            raise AdapterFormatError(
                f"{str(cfg_path)!r}: {key} holds {bad!r} (a {type(bad).__name__}); PEFT writes a list of module names (strings)"
            )
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise AdapterFormatError(
                    f"{str(cfg_path)!r}: {key} {value!r} is not a valid regular expression ({exc}); "
                    "PEFT matches a string with re.fullmatch: fix it or write a list of module names"
                ) from None
    return config


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    st = path / SAFETENSORS_NAME
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterFormatError(f"{str(st)!r} is not a readable safetensors file ({exc})") from None
    pk = path / PICKLE_NAME
    if pk.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{str(path)!r} holds only {PICKLE_NAME}, a pickle file that can run code when loaded; "
                "pass allow_pickle=True (--allow-pickle) if you trust it (it is then read with weights_only=True)"
            )
        try:
            data = torch.load(str(pk), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapterFormatError(
                f"{str(pk)!r} could not be read with weights_only=True ({_unpickle_reason(exc)}); it is not a plain file of "
                "tensors, so it is refused: re-save the adapter as safetensors where you trust the file"
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
            raise AdapterFormatError(f"{str(pk)!r} does not hold a mapping of tensors")
        return dict(data)
    raise AdapterFormatError(
        f"{str(path)!r} has no {SAFETENSORS_NAME} (or {PICKLE_NAME}); pass a PEFT adapter directory"
    )


def _unpickle_reason(exc: Exception) -> str:
    """The one line of torch's long weights_only message that says what was refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n\n|$)", text, re.DOTALL)
    reason = found.group(1) if found else (text.strip().splitlines() or [type(exc).__name__])[0]
    return " ".join(reason.split())


def _check_vector(source: str, module: str, vec: Tensor, ff: bool) -> None:
    if vec.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):  # not fp8: torch cannot check it
        raise AdapterFormatError(
            f"{source}: the vector of {module!r} has dtype {vec.dtype}; IA3 vectors are floating point "
            "(float32, float16, bfloat16 or float64)"
        )
    shape = tuple(vec.shape)
    if vec.dim() == 2:
        ok = shape[0] == 1 if ff else shape[1] == 1
        want = "(1, in_features)" if ff else "(out_features, 1)"
    elif vec.dim() in (4, 5):
        ok = shape[0] == 1 and all(s == 1 for s in shape[2:])
        want = "(1, channels, 1, 1)"
    else:
        ok, want = False, "(out_features, 1), (1, in_features) or (1, channels, 1, 1)"
    if not ok:
        role = "feed-forward (input-side)" if ff else "output-side"
        raise AdapterFormatError(
            f"{source}: the vector of {module!r} has shape {shape}, but a {role} IA3 vector has shape {want}; "
            "check feedforward_modules in adapter_config.json"
        )
    if not torch.isfinite(vec).all():
        bad = int((~torch.isfinite(vec)).sum())
        raise AdapterFormatError(
            f"{source}: the vector of {module!r} holds {bad} NaN/Inf values; the adapter is corrupt"
        )


def adapter_from_state_dict(
    tensors: Mapping[str, Tensor], config: dict[str, Any], *, name: str, source: str
) -> IA3Adapter:
    """Split PEFT's saved tensors into IA3 vectors (by module path) and extras, and check them."""
    vectors: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(_SUFFIX):
            module = key[: -len(_SUFFIX)]
            module = module[len(KEY_PREFIX) :] if module.startswith(KEY_PREFIX) else module
            vectors[module] = value
        else:
            extras[key] = value
    if not vectors:
        raise AdapterFormatError(f"{source} holds no IA3 vectors (keys ending in '{_SUFFIX}'); is it an IA3 adapter?")
    ff_modules = config.get("feedforward_modules")
    feedforward = {m: is_feedforward_module(ff_modules, m) for m in vectors}
    for module, vec in vectors.items():
        _check_vector(source, module, vec, feedforward[module])
    return IA3Adapter(vectors=vectors, feedforward=feedforward, config=config, name=name, extras=extras)


def load_adapter(path: PathLike, *, name: Optional[str] = None, allow_pickle: bool = False) -> IA3Adapter:
    """Read a PEFT IA3 adapter directory.

    Args:
        path: the directory ``save_pretrained`` wrote (``adapter_config.json`` plus
            ``adapter_model.safetensors``).
        name: the adapter's name in weight mappings and messages (default: the folder name).
        allow_pickle: also read a legacy ``adapter_model.bin``, with ``weights_only=True``.

    Returns:
        The adapter; its tensors are fresh copies, the files are never changed.

    Raises:
        AdapterFormatError: not a directory, not IA3, unreadable tensors, bad shapes, NaN/Inf.

    Example:
        >>> adapter = ia3fuse.load_adapter("adapters/math")  # doctest: +SKIP
        >>> sorted(adapter.vectors)[:1]  # doctest: +SKIP
        ['model.layers.0.mlp.down_proj']
    """
    p = Path(path)
    if not p.is_dir():
        what = "does not exist" if not p.exists() else "is not a directory"
        raise AdapterFormatError(f"adapter path {str(path)!r} {what}; pass a PEFT adapter directory")
    config = _read_config(p)
    tensors = _read_tensors(p, allow_pickle)
    adapter = adapter_from_state_dict(tensors, config, name=name or p.resolve().name, source=repr(str(path)))
    adapter.source = str(path)
    return adapter


def as_adapters(
    adapters: Union[Sequence[Union[IA3Adapter, PathLike]], Mapping[str, Union[IA3Adapter, PathLike]]],
    *,
    allow_pickle: bool = False,
) -> list[IA3Adapter]:
    """Resolve a list (or name -> item mapping) of adapters or paths to loaded adapters with unique names."""
    items: list[tuple[Optional[str], Union[IA3Adapter, PathLike]]]
    if isinstance(adapters, Mapping):
        items = [(str(k), v) for k, v in adapters.items()]
    elif isinstance(adapters, (str, Path, IA3Adapter)):
        items = [(None, adapters)]
    else:
        items = [(None, a) for a in adapters]
    loaded = []
    for given, item in items:
        if isinstance(item, IA3Adapter):
            loaded.append(item if given is None or given == item.name else _renamed(item, given))
        elif isinstance(item, (str, Path)):
            loaded.append(load_adapter(item, name=given, allow_pickle=allow_pickle))
        else:
            raise AdapterFormatError(
                f"an adapter is a {type(item).__name__}; pass IA3Adapter objects or adapter directory paths"
            )
    seen: dict[str, int] = {}
    for i, a in enumerate(loaded):
        if a.name in seen:
            seen[a.name] += 1
            loaded[i] = _renamed(a, f"{a.name}#{seen[a.name]}")
        else:
            seen[a.name] = 0
    return loaded


def _renamed(adapter: IA3Adapter, name: str) -> IA3Adapter:
    return IA3Adapter(
        adapter.vectors, adapter.feedforward, adapter.config, name, adapter.extras, adapter.recipe, adapter.source
    )
