"""Fuzz the adapter loader (`ia3fuse.load_adapter`) and the recipe parser (`parse_recipe`, `load_recipe`).

A *crash* is any exception that is not an `ia3fuse.IA3FuseError` subclass, an input that takes
longer than ``HANG_SECONDS``, or a success whose result breaks what the function promises
(`check_adapter_result`, `check_recipe_result`). Bad input must end in an IA3FuseError.

The inputs are hypothesis strategies built from a valid PEFT IA3 adapter (a tiny llama's, made
by `random_ia3_adapter` of ``tests/factories.py``) and from the recipe's keys:

* adapter: ``adapter_model.safetensors`` mutated as raw bytes (flips, truncation, extension,
  insertion, deletion, a random header length), through its JSON header (dtype strings, shapes,
  data offsets, keys, ``__metadata__``) or as re-encoded tensors (dtypes, shapes, NaN/Inf, extra or
  renamed keys); ``adapter_config.json`` with keys removed or set to random JSON (``peft_type``,
  ``target_modules``/``feedforward_modules`` of every type, invalid regexes), raw byte edits
  (invalid JSON, invalid UTF-8, deep nesting); either file absent or a directory; a legacy
  ``adapter_model.bin`` (mutated) with and without ``allow_pickle``.
* recipe: random structures over the recipe's keys (adapters, method, weights as lists, mappings
  and schedules with regex overrides, parameters of every registered method, the enums), random
  JSON-like values, through `parse_recipe`; YAML text (dumped structures with character edits,
  token soup with anchors, aliases and tags, arbitrary text and bytes) through `load_recipe`.

The tests (``tests/test_crash_fuzz.py``) import these strategies and targets and run ~150
examples of each, derandomized. This script runs them longer, with atheris (coverage-guided
libFuzzer, driving hypothesis through ``fuzz_one_input``) when it is installed, else with
hypothesis alone, and records what it tried::

    python benchmarks/fuzz.py --seconds 180 --engine all   # per target and engine: atheris, hypothesis
    python benchmarks/fuzz.py --seconds 20 --engine hypothesis

Writes ``benchmarks/results/fuzz.{json,md}`` (``--out`` elsewhere); each crashing input is saved
under ``benchmarks/results/fuzz_crashes/``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = ("adapter", "recipe")
HANG_SECONDS = 20.0  # one input; the loader reads a file of a few kB, the parser a page of YAML

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
DIRECTORY = b"<directory>"  # a file's content in a case: create a directory of that name instead

# --- hangs ---------------------------------------------------------------------------------------


class Hang(Exception):
    """An input ran longer than HANG_SECONDS (a crash, never an expected outcome)."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float] = None) -> Iterator[None]:
    """Raise `Hang` in the main thread after ``seconds`` (default HANG_SECONDS; 0: no limit)."""
    seconds = HANG_SECONDS if seconds is None else seconds
    if seconds <= 0 or not hasattr(signal, "setitimer") or signal.getsignal(signal.SIGALRM) is None:
        yield
        return
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"one input ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- the valid adapter every adapter case starts from --------------------------------------------


@functools.lru_cache(maxsize=None)
def seed_adapter() -> tuple[tuple[str, bytes], ...]:
    """The files of a valid PEFT IA3 adapter of a tiny llama (6 modules, 2 feed-forward), as bytes."""
    # the package's demo helpers, which tests/factories.py re-exports: no sys.path change needed
    from ia3fuse._tiny_models import random_ia3_adapter, tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = random_ia3_adapter(tiny_model("llama", seed=0), Path(tmp) / "a", seed=1)
        return tuple(sorted((p.name, p.read_bytes()) for p in path.iterdir() if p.is_file()))


def _tensors(raw: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    return load(raw)


# --- shared value strategies ---------------------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_REGEXES = st.sampled_from(
    [
        "(",
        ")",
        "[",
        "*",
        "+?",
        "(?P<",
        "\\",
        "a{2,1}",
        "(?<=a+)b",
        ".*",
        "k_proj",
        r".*\.down_proj",
        "(a|b",
        "[z-a]",
        "(?i)",
        "\x00",
        "(?P<n>a)(?P=m)",
        "",
        "|",
    ]
) | st.text(alphabet="()[]{}*+?.|\\^$-,0123456789akdownpr_", max_size=12)
_MODULE_NAMES = st.sampled_from(["k_proj", "v_proj", "down_proj", "q_proj", "mlp", "", ".", "layers.0.mlp.down_proj"])


# --- adapter cases -------------------------------------------------------------------------------


@dataclass
class AdapterCase:
    """One adapter directory to load: file name -> bytes (`DIRECTORY` for a directory)."""

    files: dict[str, bytes]
    allow_pickle: bool = False
    how: list[str] = field(default_factory=list)  # the mutations applied, for reports

    def write(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            if data == DIRECTORY:
                (path / name).mkdir()
            else:
                (path / name).write_bytes(data)


def _byte_edits(draw: Callable[[Any], Any], data: bytes, how: list[str], what: str) -> bytes:
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete", "overwrite", "length"]))
        pos = draw(st.integers(0, max(len(data), 0)))
        if op == "flip" and data:
            pos = min(pos, len(data) - 1)
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
        elif op == "truncate":
            data = data[:pos]
        elif op == "extend":
            data = data + draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            data = data[:pos] + draw(st.binary(min_size=1, max_size=32)) + data[pos:]
        elif op == "delete":
            data = data[:pos] + data[pos + draw(st.integers(1, 64)) :]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data = data[:pos] + chunk + data[pos + len(chunk) :]
        elif op == "length":  # the safetensors header length, or any 8 bytes at the front
            data = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
        how.append(f"{what}: {op}@{pos}")
    return data


_ST_DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "C64",
    "E8M0",
    "f32",
    "",
    "F32 ",
]


def _split_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _header_edits(draw: Callable[[Any], Any], data: bytes, how: list[str]) -> bytes:
    header, body = _split_header(data)
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(header)
        key = draw(st.sampled_from(keys)) if keys else "x"
        entry = header.get(key)
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "delete", "add", "entry", "metadata"]))
        if op in ("dtype", "shape", "offsets") and not (isinstance(entry, dict) and key != "__metadata__"):
            op = "entry"
        if op == "dtype":
            entry["dtype"] = draw(st.sampled_from(_ST_DTYPES) | json_values)
        elif op == "shape":
            entry["shape"] = draw(
                st.lists(st.integers(-2, 80) | st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64]), max_size=5)
                | json_values
            )
        elif op == "offsets":
            old = entry.get("data_offsets")
            if not (isinstance(old, list) and len(old) == 2 and all(type(v) is int for v in old)):
                old = [0, 0]
            entry["data_offsets"] = draw(
                st.sampled_from(
                    [
                        old[::-1],
                        [old[0], old[0]],
                        [old[0] + 1, old[-1] + 1],
                        [0, len(body)],
                        [0, len(body) + 4],
                        [old[0], 2**64],
                        [-1, old[-1]],
                        old + [0],
                        old[:1],
                    ]
                )
                | st.lists(st.integers(-1, len(body) + 8), max_size=3)
                | json_values
            )
        elif op == "rename" and key in header:
            new = draw(
                st.sampled_from(
                    [
                        key.removesuffix(".ia3_l"),
                        key.removeprefix("base_model.model."),
                        "x." + key,
                        key + ".ia3_l",
                        key.replace("k_proj", "down_proj"),
                    ]
                )
                | st.text(max_size=30)
            )
            header[new] = header.pop(key)
        elif op == "delete":
            header.pop(key, None)
        elif op == "add":
            header[draw(st.text(max_size=20) | st.just(key + "2.ia3_l"))] = (
                dict(entry) if isinstance(entry, dict) else draw(json_values)
            )
        elif op == "entry":
            header[key] = draw(json_values)
        else:
            header["__metadata__"] = draw(json_values | st.dictionaries(st.text(max_size=6), st.text(max_size=6)))
        how.append(f"header: {op} {key!r}")
    raw = json.dumps(header, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))).encode()
    if draw(st.booleans()):
        raw += b" " * (-len(raw) % 8)
    length = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8]))
    return struct.pack("<Q", max(length, 0)) + raw + body


def _tensor_edits(draw: Callable[[Any], Any], data: bytes, how: list[str]) -> bytes:
    import torch
    from safetensors.torch import save

    tensors = _tensors(data)
    dtypes = [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ]
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(tensors)
        key = draw(st.sampled_from(keys)) if keys else "base_model.model.x.ia3_l"
        op = draw(st.sampled_from(["values", "dtype", "shape", "extra", "delete", "rename"]))
        t = tensors.get(key, torch.ones(4, 1))
        if op == "values":
            flat = t.to(torch.float32).reshape(-1).clone()
            if flat.numel():
                idx = draw(st.integers(0, flat.numel() - 1))
                flat[idx] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e38, 1e-45]))
            tensors[key] = flat.reshape(t.shape).to(t.dtype if t.is_floating_point() else torch.float32)
        elif op == "dtype":
            dtype = draw(st.sampled_from(dtypes))
            tensors[key] = t.to(torch.float32).to(dtype) if dtype is not torch.complex64 else t.to(torch.complex64)
        elif op == "shape":
            n = t.numel()
            shapes = [
                (n,),
                (1, n),
                (n, 1),
                (1, n, 1, 1),
                (1, n, 1, 1, 1),
                (1, 1, n),
                (n, 1, 1, 1),
                (0, 1),
                (1, 0),
                (),
                (2, max(n // 2, 1)),
            ]
            shape = draw(st.sampled_from(shapes))
            size = math.prod(shape)
            tensors[key] = t.reshape(-1)[:size].reshape(shape) if size <= n else torch.ones(shape)
        elif op == "extra":
            tensors[
                draw(
                    st.sampled_from(["base_model.model.lm_head.modules_to_save.default.weight", "x", ""])
                    | st.text(min_size=1, max_size=20)
                )
            ] = torch.ones(draw(st.integers(0, 3)), 2)
        elif op == "delete":
            tensors.pop(key, None)
        else:
            tensors[draw(st.text(min_size=1, max_size=20) | st.just(key.replace(".ia3_l", ".ia3_x")))] = tensors.pop(
                key, t
            )
        how.append(f"tensors: {op} {key!r}")
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    return save(tensors, metadata=draw(st.none() | st.just({"format": "pt"})))


def _config_value(draw: Callable[[Any], Any], key: str) -> Any:
    if key == "peft_type":
        return draw(
            st.sampled_from(["IA3", "ia3", "Ia3", "LORA", "", None, 3, ["IA3"], {"IA3": 1}]) | st.text(max_size=6)
        )
    if key in ("target_modules", "feedforward_modules"):
        return draw(_REGEXES | st.lists(_MODULE_NAMES, max_size=4) | st.lists(json_values, max_size=3) | json_values)
    return draw(json_values)


def _config_edits(draw: Callable[[Any], Any], data: bytes, how: list[str]) -> bytes:
    op = draw(st.sampled_from(["keys", "keys", "keys", "replace", "bytes", "nested"]))
    how.append(f"config: {op}")
    if op == "bytes":
        return _byte_edits(draw, data, how, "config")
    if op == "replace":
        return json.dumps(draw(json_values)).encode()
    if op == "nested":  # json.loads recurses once per level
        depth = draw(st.sampled_from([10, 1000, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    config = json.loads(data)
    known = [
        "peft_type",
        "target_modules",
        "feedforward_modules",
        "base_model_name_or_path",
        "task_type",
        "fan_in_fan_out",
        "init_ia3_weights",
        "modules_to_save",
        "inference_mode",
        "exclude_modules",
    ]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(known) | st.text(max_size=8))
        if draw(st.integers(0, 3)) == 0:
            config.pop(key, None)
            how.append(f"config: del {key!r}")
        else:
            config[key] = _config_value(draw, key)
            how.append(f"config: {key!r}={config[key]!r:.60}")
    return json.dumps(config).encode()


@st.composite
def adapter_cases(draw: Callable[[Any], Any], seed: Optional[tuple[tuple[str, bytes], ...]] = None) -> AdapterCase:
    """An adapter directory made from a valid one (`seed_adapter` by default) by random edits."""
    files = dict(seed if seed is not None else seed_adapter())
    how: list[str] = []
    weights = draw(
        st.sampled_from(["valid", "bytes", "header", "header", "tensors", "tensors", "pickle", "absent", "directory"])
    )
    if weights == "bytes":
        files[SAFETENSORS] = _byte_edits(draw, files[SAFETENSORS], how, "safetensors")
    elif weights == "header":
        files[SAFETENSORS] = _header_edits(draw, files[SAFETENSORS], how)
    elif weights == "tensors":
        files[SAFETENSORS] = _tensor_edits(draw, files[SAFETENSORS], how)
    elif weights == "pickle":  # the legacy file alone, read only with allow_pickle (weights_only=True)
        import torch

        buf = io.BytesIO()
        torch.save(_tensors(files.pop(SAFETENSORS)), buf)
        data = buf.getvalue()
        files[PICKLE] = _byte_edits(draw, data, how, "pickle") if draw(st.booleans()) else data
    elif weights == "absent":
        del files[SAFETENSORS]
    elif weights == "directory":
        files[SAFETENSORS] = DIRECTORY
    how.insert(0, f"weights: {weights}")
    config = draw(st.sampled_from(["valid", "valid", "edit", "edit", "edit", "absent", "directory"]))
    if config == "edit":
        files[CONFIG] = _config_edits(draw, files[CONFIG], how)
    elif config == "absent":
        del files[CONFIG]
    elif config == "directory":
        files[CONFIG] = DIRECTORY
    how.insert(1, f"config: {config}")
    return AdapterCase(files, allow_pickle=draw(st.booleans()), how=how)


def check_adapter_result(adapter: Any) -> None:
    """What `load_adapter` promises of a loaded adapter; AssertionError otherwise."""
    import torch

    from ia3fuse import IA3Adapter
    from ia3fuse.adapter import is_feedforward_module

    assert isinstance(adapter, IA3Adapter), type(adapter)
    assert isinstance(adapter.config, dict) and str(adapter.config.get("peft_type")).upper() == "IA3", adapter.config
    assert adapter.vectors, "an adapter without vectors loaded"
    assert set(adapter.feedforward) == set(adapter.vectors)
    for path, vec in adapter.vectors.items():
        assert isinstance(path, str)
        assert isinstance(vec, torch.Tensor) and vec.is_floating_point(), (path, getattr(vec, "dtype", type(vec)))
        assert bool(torch.isfinite(vec.to(torch.float32)).all()), path
        ff = adapter.feedforward[path]
        assert ff == is_feedforward_module(adapter.config.get("feedforward_modules"), path)
        shape = tuple(vec.shape)
        if vec.dim() == 2:
            assert (shape[0] == 1) if ff else (shape[1] == 1), (path, shape, ff)
        else:
            assert vec.dim() in (4, 5) and shape[0] == 1 and all(s == 1 for s in shape[2:]), (path, shape)
    for key, value in adapter.extras.items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor), key
    assert isinstance(adapter.name, str)


def run_adapter_case(case: AdapterCase, workdir: Path) -> str:
    """Write ``case`` under ``workdir`` and load it: ``"ok"`` or the IA3FuseError's type name.

    Any other exception propagates (a crash), as does AssertionError from `check_adapter_result`
    or from the input files having changed.
    """
    from ia3fuse import IA3FuseError, load_adapter

    path = Path(tempfile.mkdtemp(prefix="adapter-", dir=workdir))
    try:
        case.write(path / "a")
        try:
            with time_limit():
                adapter = load_adapter(path / "a", allow_pickle=case.allow_pickle)
        except IA3FuseError as exc:
            return type(exc).__name__
        check_adapter_result(adapter)
        for name, data in case.files.items():  # the loader never changes its input
            if data != DIRECTORY:
                assert (path / "a" / name).read_bytes() == data, f"load_adapter changed {name}"
        return "ok"
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- recipe cases --------------------------------------------------------------------------------


@dataclass
class RecipeCase:
    """Recipe data for `parse_recipe` (``text is None``), or YAML text/bytes for `load_recipe`."""

    data: Any = None
    text: Optional[Union[str, bytes]] = None
    how: str = ""


@functools.lru_cache(maxsize=None)
def _methods() -> dict[str, tuple[str, ...]]:
    """Registered method name -> its parameter names."""
    from ia3fuse.fusion import methods

    return {m.name: tuple(p.name for p in m.params) for m in methods()}


_ADAPTER_NAMES = st.sampled_from(["a", "b", "math", "code", "default", "kinds", "overrides", ""]) | st.text(max_size=6)
_NUMBERS = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([0, 1, 0.5, -1.0, 1e308, "0.5", "nan", True, None])
)
_WEIGHT_VALUES = _NUMBERS | st.lists(_NUMBERS, max_size=4) | st.lists(st.lists(_NUMBERS, max_size=2), max_size=2)
_GOOD_WEIGHTS = st.floats(-2, 2) | st.lists(st.floats(-2, 2), min_size=1, max_size=3)
_GOOD_PARAMS = {  # values each parameter accepts (the wild branch tries everything else)
    "density": st.sampled_from([0.1, 0.5, 1.0]),
    "lam": st.sampled_from([1.0, 0.5, -1.0]),
    "majority_sign_method": st.sampled_from(["total", "frequency"]),
    "rescale": st.booleans(),
    "seed": st.integers(0, 5),
    "gamma": st.sampled_from([0.0, 0.1]),
    "svd_rank": st.sampled_from([1, None]),
}


def _per_adapter(draw: Callable[[Any], Any], names: Optional[list[str]] = None) -> Any:
    if names is not None:  # one valid value per adapter, as a list or by name
        values = [draw(_GOOD_WEIGHTS) for _ in names]
        return dict(zip(names, values)) if draw(st.booleans()) and len(set(names)) == len(names) else values
    return draw(
        st.lists(_WEIGHT_VALUES, max_size=4) | st.dictionaries(_ADAPTER_NAMES, _WEIGHT_VALUES, max_size=4) | json_values
    )


@st.composite
def recipe_data(draw: Callable[[Any], Any]) -> Any:
    """A random recipe-like structure over the recipe's keys (sometimes anything at all).

    Each field is drawn valid (3 times in 4, so the cross-field checks run) or wild (any type, any value).
    """
    methods = _methods()
    params = sorted({p for ps in methods.values() for p in ps})
    # The simplest draws (all zeros, where libFuzzer starts) give a valid recipe.
    if draw(st.integers(0, 9)) == 9:
        return draw(json_values)

    def good() -> bool:  # one biased coin per field
        return draw(st.integers(0, 3)) < 3

    data: dict[Any, Any] = {}
    names: Optional[list[str]] = None
    if good():
        refs = draw(
            st.lists(
                st.sampled_from(["adapters/a", "adapters/b", "c", "/abs/d"])
                | st.fixed_dictionaries({"path": st.sampled_from(["x/a", "y"])}, optional={"name": _ADAPTER_NAMES}),
                min_size=1,
                max_size=3,
            )
        )
        data["adapters"] = refs
        names = [(r.get("name") or Path(r["path"]).name) if isinstance(r, dict) else Path(r).name for r in refs]
    elif draw(st.integers(0, 9)):
        data["adapters"] = draw(
            st.lists(
                st.sampled_from(["adapters/a", "b", "/abs/c", "", ".", "a/b/../c"])
                | st.fixed_dictionaries(
                    {"path": st.text(max_size=8) | json_values},
                    optional={"name": _ADAPTER_NAMES | json_values, "extra": json_values},
                )
                | json_values,
                max_size=4,
            )
            | json_values
        )
    method = draw(st.sampled_from(sorted(methods)))
    if good():
        data["method"] = method
    elif draw(st.booleans()):
        data["method"] = draw(st.text(max_size=10) | json_values)
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["per_adapter", "schedule", "any"]))
        ok = names if good() else None
        if kind == "per_adapter":
            data["weights"] = _per_adapter(draw, ok)
        elif kind == "schedule":
            schedule: dict[str, Any] = {}
            if draw(st.booleans()):
                schedule["default"] = _per_adapter(draw, ok)
            if draw(st.booleans()):
                schedule["kinds"] = (
                    draw(
                        st.dictionaries(
                            st.sampled_from(["attention", "feedforward", "ffn"]) | st.text(max_size=5),
                            st.none() | st.lists(_WEIGHT_VALUES, max_size=3),
                            max_size=3,
                        )
                        | json_values
                    )
                    if ok is None
                    else {draw(st.sampled_from(["attention", "feedforward"])): _per_adapter(draw, ok)}
                )
            if draw(st.booleans()):
                schedule["overrides"] = (
                    draw(
                        st.lists(
                            st.fixed_dictionaries(
                                {
                                    "filter": _REGEXES | json_values,
                                    "weights": st.lists(_WEIGHT_VALUES, max_size=3) | json_values,
                                }
                            )
                            | st.tuples(_REGEXES, st.lists(_WEIGHT_VALUES, max_size=3))
                            | json_values,
                            max_size=3,
                        )
                        | json_values
                    )
                    if ok is None
                    else [
                        {
                            "filter": draw(st.sampled_from([r"layers\.0\.", "k_proj", ".*"]) | _REGEXES),
                            "weights": _per_adapter(draw, ok),
                        }
                    ]
                )
            if draw(st.integers(0, 3)) == 0:
                schedule[draw(st.text(max_size=6))] = draw(json_values)
            data["weights"] = schedule
        else:
            data["weights"] = draw(json_values)
    if good():
        chosen = draw(st.lists(st.sampled_from(methods[method] or ("lam",)), unique=True, max_size=3))
        data["parameters"] = {name: draw(_GOOD_PARAMS.get(name, st.none())) for name in chosen}
    elif draw(st.booleans()):
        data["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(params) | st.text(max_size=6),
                _NUMBERS | st.sampled_from(["total", "frequency", "x"]) | json_values,
                max_size=4,
            )
            | json_values
        )
    for key, choices in (
        ("missing", ["identity", "zero"]),
        ("extras", ["error", "first", "drop"]),
        ("strict", [True, False, "yes", 1]),
        ("name", ["fused", ""]),
        ("output", ["out", "/abs/out", ""]),
    ):
        if draw(st.integers(0, 3)) == 0:
            data[key] = draw(st.sampled_from(choices) | (json_values if not good() else st.nothing()))
    if draw(st.integers(0, 5)) == 5:
        data[draw(st.text(max_size=8) | st.integers() | st.none())] = draw(json_values)
    return data


_YAML_TOKENS = st.sampled_from(
    [
        "adapters:",
        "method:",
        "weights:",
        "parameters:",
        "output:",
        "name:",
        "default:",
        "overrides:",
        "filter:",
        "- ",
        ": ",
        "\n",
        "  ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "&a ",
        "*a",
        "*b",
        "<<: *a",
        "!!float ",
        "!!binary ",
        "!!python/object:os.system ",
        "!!set ",
        "? ",
        "|\n",
        ">-\n",
        "'",
        '"',
        "#",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "~",
        "null",
        ".nan",
        ".inf",
        "0x1F",
        "1e400",
        "2001-12-14",
        "yes",
        "ties",
        "density: 0.5",
        "\t",
        "\ufeff",
        "\x00",
        "a/b",
        "!",
        "&",
        "*",
    ]
)


@st.composite
def recipe_cases(draw: Callable[[Any], Any]) -> RecipeCase:
    """Recipe data for `parse_recipe`, or YAML text for `load_recipe`."""
    import yaml

    kind = draw(st.sampled_from(["data", "data", "yaml", "edited_yaml", "tokens", "text", "bytes"]))
    if kind == "data":
        return RecipeCase(data=draw(recipe_data()), how=kind)
    if kind == "text":
        return RecipeCase(text=draw(st.text(max_size=200)), how=kind)
    if kind == "bytes":
        return RecipeCase(text=draw(st.binary(max_size=200)), how=kind)
    if kind == "tokens":
        return RecipeCase(text="".join(draw(st.lists(_YAML_TOKENS | st.text(max_size=4), max_size=40))), how=kind)
    data = draw(recipe_data())
    try:
        text = yaml.safe_dump(data, default_flow_style=draw(st.sampled_from([None, True, False])), allow_unicode=True)
    except yaml.YAMLError:  # data the dumper refuses (e.g. lone surrogates)
        text = repr(data)
    if kind == "edited_yaml":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(text)))
            op = draw(st.sampled_from(["delete", "insert", "replace"]))
            piece = draw(_YAML_TOKENS | st.text(max_size=3))
            if op == "delete":
                text = text[:pos] + text[pos + draw(st.integers(1, 8)) :]
            elif op == "insert":
                text = text[:pos] + piece + text[pos:]
            else:
                text = text[:pos] + piece + text[pos + len(piece) :]
    return RecipeCase(text=text, how=kind)


def check_recipe_result(recipe: Any) -> None:
    """What `parse_recipe`/`load_recipe` promise of a valid recipe; AssertionError otherwise."""
    from ia3fuse.fusion import get_method
    from ia3fuse.recipe import Recipe
    from ia3fuse.weights import plan_weights

    assert isinstance(recipe, Recipe), type(recipe)
    assert recipe.refs and all(isinstance(r.path, str) for r in recipe.refs)
    get_method(recipe.method).validate(dict(recipe.parameters))
    names = recipe.adapter_names()
    assert len(names) == len(recipe.refs)
    if len(set(names)) == len(names) or not isinstance(recipe.weights, dict):
        plan_weights(recipe.weights_arg(), names)
    assert recipe.missing in ("identity", "zero") and recipe.extras in ("error", "first", "drop")


def run_recipe_case(case: RecipeCase, workdir: Path) -> str:
    """Parse ``case``: ``"ok"`` or the IA3FuseError's type name; any other exception propagates."""
    from ia3fuse import IA3FuseError
    from ia3fuse.recipe import load_recipe, parse_recipe

    try:
        with time_limit():
            if case.text is None:
                recipe = parse_recipe(case.data)
            else:
                path = Path(tempfile.mkdtemp(prefix="recipe-", dir=workdir))
                try:
                    file = path / "recipe.yaml"
                    (file.write_bytes if isinstance(case.text, bytes) else file.write_text)(case.text)  # type: ignore[operator]
                    recipe = load_recipe(file)
                finally:
                    shutil.rmtree(path, ignore_errors=True)
    except IA3FuseError as exc:
        return type(exc).__name__
    check_recipe_result(recipe)
    return "ok"


# --- the long run --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one target's run tried and saw."""

    target: str
    engine: str
    inputs: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "ok" or an IA3FuseError subclass name -> count
    crashes: list[dict[str, Any]] = field(default_factory=list)  # at most 20 kept, all counted
    crash_types: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine,
            "inputs": self.inputs,
            "seconds": round(self.seconds, 1),
            "inputs_per_second": round(self.inputs / self.seconds, 1) if self.seconds else None,
            "crashes": sum(self.crash_types.values()),
            "crash_types": dict(self.crash_types),
            "outcomes": dict(self.outcomes.most_common()),
            "crash_examples": self.crashes,
            "note": self.note,
        }


CRASHES = [RESULTS / "fuzz_crashes"]  # where crashing inputs are saved (main sets it from --out)


def _save_crash(target: str, case: Any, exc: BaseException) -> str:
    digest = hashlib.sha256(repr(case).encode(errors="replace")).hexdigest()[:12]
    folder = CRASHES[0] / f"{target}-{type(exc).__name__}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(case, AdapterCase):
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        case.write(folder / "adapter")
        (folder / "case.txt").write_text(f"allow_pickle={case.allow_pickle}\n" + "\n".join(case.how) + "\n")
    elif case.text is not None:
        (folder / "recipe.yaml").write_bytes(
            case.text if isinstance(case.text, bytes) else case.text.encode("utf-8", "surrogatepass")
        )
    else:
        (folder / "data.txt").write_text(repr(case.data))
    (folder / "traceback.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return os.path.relpath(folder, HERE.parent)


def _record(tally: Tally, case: Any, run: Callable[[Any, Path], str], workdir: Path) -> None:
    tally.inputs += 1
    try:
        tally.outcomes[run(case, workdir)] += 1
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - every other exception is a finding
        name = type(exc).__name__
        tally.crash_types[name] += 1
        tally.outcomes["CRASH " + name] += 1
        if len(tally.crashes) < 20:
            tally.crashes.append(
                {"type": name, "message": str(exc)[:300], "saved": _save_crash(tally.target, case, exc)}
            )


def _target(name: str) -> tuple[st.SearchStrategy[Any], Callable[[Any, Path], str]]:
    if name == "adapter":
        return adapter_cases(seed_adapter()), run_adapter_case
    return recipe_cases(), run_recipe_case


def _fuzz_hypothesis(name: str, seconds: float, seed: int, workdir: Path) -> Tally:
    from hypothesis import seed as hyp_seed

    strategy, run = _target(name)
    tally = Tally(name, f"hypothesis {__import__('hypothesis').__version__}")
    deadline = time.monotonic() + seconds

    class Done(Exception):
        pass

    round_ = 0
    start = time.monotonic()
    while time.monotonic() < deadline:

        @hyp_seed(seed * 100_003 + round_)
        @settings(
            max_examples=2000,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
            phases=["generate"],
        )
        @given(case=strategy)
        def one(case: Any) -> None:
            if time.monotonic() >= deadline:
                raise Done
            _record(tally, case, run, workdir)

        try:
            one()
        except Done:
            break
        except Exception as exc:  # noqa: BLE001 - hypothesis gave up on a round (e.g. flaky): note it, go on
            tally.note += f"round {round_}: {type(exc).__name__}: {str(exc)[:200]}; "
        round_ += 1
    tally.seconds = time.monotonic() - start
    return tally


def _atheris_worker(name: str, seconds: float, seed: int, stats: Path) -> None:
    """Runs in its own process: libFuzzer mutates the bytes hypothesis draws its choices from."""
    import atheris

    global HANG_SECONDS
    HANG_SECONDS = 0  # libFuzzer's -timeout owns SIGALRM here; it reports a hang and stops

    with atheris.instrument_imports(include=["ia3fuse", "json", "yaml"]):
        import ia3fuse.adapter
        import ia3fuse.recipe  # noqa: F401 - imported here to be instrumented
    strategy, run = _target(name)
    from importlib import metadata

    tally = Tally(name, f"atheris {metadata.version('atheris')} (libFuzzer) + hypothesis fuzz_one_input")
    workdir = Path(tempfile.mkdtemp(prefix=f"ia3fuse-fuzz-{name}-"))
    start = time.monotonic()
    last = [start]

    def dump() -> None:
        tally.seconds = time.monotonic() - start
        stats.write_text(json.dumps(tally.to_dict()))

    @settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case: Any) -> None:
        _record(tally, case, run, workdir)

    def one_input(data: bytes) -> None:
        one.hypothesis.fuzz_one_input(data)
        now = time.monotonic()
        if now - last[0] > 2:
            last[0] = now
            dump()
        if now - start >= seconds:
            dump()
            shutil.rmtree(workdir, ignore_errors=True)
            os._exit(0)

    atheris.Setup(
        [
            sys.argv[0],
            f"-seed={seed + 1}",
            f"-max_total_time={int(seconds) + 120}",
            "-rss_limit_mb=6144",
            f"-timeout={int(HANG_SECONDS * 3)}",
            "-max_len=8192",
            "-print_final_stats=0",
        ],
        one_input,
    )
    atheris.Fuzz()


def _fuzz_atheris(name: str, seconds: float, seed: int) -> Tally:
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_worker",
            name,
            "--seconds",
            str(seconds),
            "--seed",
            str(seed),
            "--_stats",
            str(stats),
            "--out",
            str(CRASHES[0].parent),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600, check=False)
        if not stats.is_file():
            raise RuntimeError(
                f"the atheris worker for {name} wrote no stats (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        d = json.loads(stats.read_text())
    tally = Tally(
        name,
        d["engine"],
        d["inputs"],
        Counter(d["outcomes"]),
        d["crash_examples"],
        Counter(d["crash_types"]),
        d["seconds"],
        d["note"],
    )
    if proc.returncode != 0:  # libFuzzer stopped it: a hang, out of memory, or a crash inside C code
        tally.crash_types[f"libFuzzer exit {proc.returncode}"] += 1
        tally.note += (
            "libFuzzer: " + " | ".join(l for l in proc.stderr.splitlines() if "ERROR" in l or "SUMMARY" in l)[:500]
        )
    return tally


def _markdown(tallies: list[Tally], meta: dict[str, Any]) -> str:
    lines = [
        "# Fuzzing the adapter loader and the recipe parser",
        "",
        (
            f"`python benchmarks/fuzz.py --seconds {meta['seconds_per_target']:g} --seed {meta['seed']} "
            f"--engine {meta['engine_flag']}` ({meta['engine']}; {meta['machine']}; python {meta['python']}, "
            f"torch {meta['torch']}, safetensors {meta['safetensors']}, pydantic {meta['pydantic']}, "
            f"PyYAML {meta['pyyaml']}, hypothesis {meta['hypothesis']}, atheris {meta['atheris']})."
        ),
        "A crash is any exception other than an `IA3FuseError` subclass, a hang, or a result that breaks",
        "what the function promises. See the docstring of `benchmarks/fuzz.py` for the inputs.",
        "",
        "| target | engine | inputs tried | seconds | inputs/s | crashes | crash types |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        d = t.to_dict()
        types = ", ".join(f"{k} ({v})" for k, v in t.crash_types.items()) or "none"
        lines.append(
            f"| {t.target} | {t.engine} | {t.inputs:,} | {d['seconds']:g} | {d['inputs_per_second']} | "
            f"{d['crashes']} | {types} |"
        )
    for t in tallies:
        lines += [
            "",
            f"Outcomes, {t.target} ({t.engine.split()[0]}): "
            + ", ".join(f"`{k}` {v:,}" for k, v in t.outcomes.most_common())
            + ".",
        ]
        for c in t.crashes:
            lines.append(f"- crash `{c['type']}`: {c['message'][:150]} (input saved in `{c['saved']}`)")
        if t.note:
            lines.append(f"- note: {t.note}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="time per target (default 180)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generators (default 0)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument(
        "--engine",
        choices=["auto", "atheris", "hypothesis", "all"],
        default="auto",
        help="auto: atheris when it imports, else hypothesis; all: each that imports, in turn",
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for fuzz.json and fuzz.md")
    parser.add_argument("--_worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--_stats", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    CRASHES[0] = Path(args.out) / "fuzz_crashes"
    if args._worker:
        _atheris_worker(args._worker, args.seconds, args.seed, Path(args._stats))
        return 0

    try:
        import atheris  # noqa: F401

        have_atheris = True
    except ImportError:
        have_atheris = False
    engines = {
        "auto": ["atheris" if have_atheris else "hypothesis"],
        "all": ["atheris", "hypothesis"] if have_atheris else ["hypothesis"],
    }.get(args.engine, [args.engine])
    tallies = []
    for engine in engines:
        for name in args.targets:
            print(f"fuzzing {name} for {args.seconds:g} s with {engine} ...", flush=True)
            if engine == "atheris":
                tally = _fuzz_atheris(name, args.seconds, args.seed)
            else:
                with tempfile.TemporaryDirectory(prefix=f"ia3fuse-fuzz-{name}-") as tmp:
                    tally = _fuzz_hypothesis(name, args.seconds, args.seed, Path(tmp))
            print(
                f"  {tally.inputs:,} inputs, {sum(tally.crash_types.values())} crashes {dict(tally.crash_types)}",
                flush=True,
            )
            tallies.append(tally)
    engine = " and ".join(engines)

    from importlib import metadata

    import torch

    meta = {
        "seconds_per_target": args.seconds,
        "seed": args.seed,
        "engine": engine,
        "engine_flag": args.engine,
        "machine": f"{os.cpu_count()}-CPU {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{
            k: metadata.version(d)
            for k, d in [
                ("safetensors", "safetensors"),
                ("pydantic", "pydantic"),
                ("pyyaml", "PyYAML"),
                ("hypothesis", "hypothesis"),
            ]
        },
        "atheris": metadata.version("atheris") if have_atheris else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(
        json.dumps({"meta": meta, "targets": [t.to_dict() for t in tallies]}, indent=2) + "\n"
    )
    (out / "fuzz.md").write_text(_markdown(tallies, meta))
    print(_markdown(tallies, meta))
    print(f"wrote {out / 'fuzz.json'} and {out / 'fuzz.md'}")
    return 1 if any(t.crash_types for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
