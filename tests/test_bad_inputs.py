"""Bad-input corpus: 58 malformed inputs, each through the Python API and the ``ia3fuse`` CLI.

One table, `CASES`. Each case writes its malformed files under the test's folder (the shared
good inputs come from test_cli's ``inputs`` fixture, here ``good``), then:

- the API call raises the case's exception type, with the case's message: the exact message,
  or an exact distinctive part of it that holds the offending value;
- the CLI (``ia3fuse.cli.main`` in-process; five cases also through the real entry point in a
  subprocess) exits 2 with exactly one stderr line ``ia3fuse: error: ...`` holding that
  message, and nothing on stdout;
- after each of the two, every input is byte-identical, and neither an output nor a temporary
  sibling of it is left; where the input carries a code payload (a pickle ``__reduce__``, a YAML
  ``!!python`` tag), its marker file was never created.

A case the CLI cannot express says why in ``no_cli`` (2 cases). The tests below the table check
the count, ``--debug``, that the code payloads are live (so their refusal means something), that
``allow_pickle`` loads only with ``weights_only=True``, and that adapter names never become paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import PREFIX, Inputs, _copy_with, leftovers, run_cli, snapshot
from test_cli import inputs as _cli_inputs  # noqa: F401 (a fixture)

import ia3fuse
from ia3fuse import (
    AdapterFormatError,
    IA3FuseError,
    IncompatibleAdaptersError,
    InvalidParameterError,
    InvalidWeightsError,
    MethodInputError,
    OutputPathError,
    RecipeError,
    UnknownMethodError,
)
from ia3fuse.cli import main as cli_main
from factories import tiny_model
from ia3fuse.merging import run_recipe
from ia3fuse.recipe import load_recipe, parse_recipe

K_KEY = f"{PREFIX}model.layers.0.self_attn.k_proj.ia3_l"
DOWN_KEY = f"{PREFIX}model.layers.0.mlp.down_proj.ia3_l"
ST, CFG, BIN = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"


@pytest.fixture(scope="module")
def good(_cli_inputs: Inputs) -> Inputs:  # noqa: F811 (the fixture imported above)
    """test_cli's good inputs (adapters a, b, other_base, wide, lora, ...), built once per module."""
    return _cli_inputs


Paths = dict[str, Path]
Build = Callable[[Inputs, Path], Paths]


@dataclass(frozen=True)
class Case:
    """One malformed input.

    ``build(inputs, tmp)`` writes the case's files and returns its named paths; together with
    the shared inputs (``a``, ``b``, ``other_base``, ``wide``, ``lora``, ``k_ff``, ``nan``,
    ``nonpositive``, ``pickle_only``), ``t`` (the folder) and ``out`` (default ``t/OUT``) they
    form ``p``, which ``api``, ``cli`` and ``message`` (a format string: ``{bad!r}``) use.
    """

    id: str
    build: Build
    api: Callable[[Any], object]
    cli: Optional[Callable[[Any], list[object]]]
    error: type[IA3FuseError]
    message: str
    no_cli: str = ""


# --- builders ------------------------------------------------------------------------------------


def _none(i: Inputs, t: Path) -> Paths:
    return {}


def _adapter_dir(i: Inputs, t: Path, *, config: Optional[str] = None, st: Optional[bytes] = None) -> Paths:
    """A copy of adapter ``a`` as t/bad with its config text or safetensors bytes replaced."""
    bad = t / "bad"
    bad.mkdir()
    (bad / CFG).write_text((i.a / CFG).read_text() if config is None else config)
    (bad / ST).write_bytes((i.a / ST).read_bytes() if st is None else st)
    return {"bad": bad, "st": bad / ST, "cfg": bad / CFG}


def _st_bytes(change: Callable[[bytes], bytes]) -> Build:
    return lambda i, t: _adapter_dir(i, t, st=change((i.a / ST).read_bytes()))


def _config(text: str) -> Build:
    return lambda i, t: _adapter_dir(i, t, config=text)


def _config_edit(change: Callable[[dict], None]) -> Build:
    def build(i: Inputs, t: Path) -> Paths:
        config = json.loads((i.a / CFG).read_text())
        change(config)
        return _adapter_dir(i, t, config=json.dumps(config))

    return build


def _tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Build:
    def build(i: Inputs, t: Path) -> Paths:
        bad = _copy_with(i.a, t / "bad", lambda tensors, config: change(tensors))
        return {"bad": bad}

    return build


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _header_edit(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        header, body = _header(data)
        change(header)
        return _with_header(header, body)

    return edit


def _set(key: str, value: Any) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value(tensors[key]) if callable(value) else value

    return change


def _poke(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[K_KEY][2, 0] = value

    return change


def _two_extras(i: Inputs, t: Path) -> Paths:
    """Two copies of a, each with a different non-IA3 tensor of the same key."""
    for name, value in (("bad", 0.0), ("bad2", 1.0)):
        extra = {f"{PREFIX}lm_head.weight": torch.full((2, 2), value)}
        _copy_with(i.a, t / name, lambda tensors, config, extra=extra: tensors.update(extra))
    return {"bad": t / "bad", "bad2": t / "bad2"}


def _only_unknown_keys(tensors: dict[str, torch.Tensor]) -> None:
    for key in list(tensors):
        tensors[key.replace(".ia3_l", ".ia3_vector")] = tensors.pop(key)


def _recipe(text: str) -> Build:
    """t/r.yaml from ``text`` with {a}, {b}, {marker} filled in."""

    def build(i: Inputs, t: Path) -> Paths:
        (t / "r.yaml").write_text(text.format(a=i.a, b=i.b, marker=t / "PWNED"))
        return {"r": t / "r.yaml", "marker": t / "PWNED"}

    return build


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: loading it unsafely creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _malicious_pickle(kind: str) -> Build:
    def build(i: Inputs, t: Path) -> Paths:
        bad, marker = t / "bad", t / "PWNED"
        bad.mkdir()
        shutil.copy(i.a / CFG, bad / CFG)
        tensors: dict[str, Any] = dict(load_file(str(i.a / ST)))
        tensors[K_KEY] = _Payload(marker)
        # torch.save's zip archive, or the legacy stream older torch versions wrote
        torch.save(tensors, bad / BIN, _use_new_zipfile_serialization=kind == "zip")
        return {"bad": bad, "pk": bad / BIN, "marker": marker}

    return build


def _file_not_dir(i: Inputs, t: Path) -> Paths:
    (t / "adapter.safetensors").write_bytes((i.a / ST).read_bytes())
    return {"bad": t / "adapter.safetensors"}


def _empty_dir(i: Inputs, t: Path) -> Paths:
    (t / "bad").mkdir()
    return {"bad": t / "bad"}


def _no_config(i: Inputs, t: Path) -> Paths:
    (t / "bad").mkdir()
    shutil.copy(i.a / ST, t / "bad" / ST)
    return {"bad": t / "bad"}


def _existing_output(i: Inputs, t: Path) -> Paths:
    (t / "OUT").mkdir()
    (t / "OUT" / "keep.txt").write_text("mine")
    return {}


def _symlink_output(i: Inputs, t: Path) -> Paths:
    (t / "real").mkdir()
    (t / "real" / "keep.txt").write_text("mine")
    (t / "OUT").symlink_to(t / "real", target_is_directory=True)
    return {}


def _output_holding_inputs(i: Inputs, t: Path) -> Paths:
    for src in (i.a, i.b):
        shutil.copytree(src, t / "OUT" / "adapters" / src.name)
    return {"in_a": t / "OUT" / "adapters" / "a", "in_b": t / "OUT" / "adapters" / "b"}


# --- API and CLI calls ---------------------------------------------------------------------------


def _merge(*names: str, **kwargs: Any) -> Callable[[Any], object]:
    return lambda p: ia3fuse.merge([getattr(p, n) for n in names], **kwargs)


def _cli(*names: str, flags: tuple[object, ...] = ()) -> Callable[[Any], list[object]]:
    return lambda p: ["merge", *(getattr(p, n) for n in names), *flags, "-o", p.out]


def _load(p: Any) -> object:
    return ia3fuse.load_adapter(p.bad)


def _inspect(p: Any) -> list[object]:
    return ["inspect", p.bad]


def _recipe_api(p: Any) -> object:
    return load_recipe(p.r)


def _recipe_cli(p: Any) -> list[object]:
    return ["merge", p.r]


def _run(*names: str, force: bool = False) -> Callable[[Any], object]:
    """What ``ia3fuse merge NAMES -o OUT`` calls: the output is checked against the inputs."""
    return lambda p: run_recipe(
        parse_recipe({"adapters": [str(getattr(p, n)) for n in names]}), output=p.out, overwrite=force
    )


def _save(force: bool = False) -> Callable[[Any], object]:
    return lambda p: ia3fuse.merge([p.a, p.b]).save(p.out, overwrite=force)


_RECIPE_AB = "adapters: [{a}, {b}]\noutput: OUT\n"
_PICKLE_REFUSED = "could not be read with weights_only=True (Unsupported global: GLOBAL io.open"

CASES: list[Case] = [
    # safetensors files: truncated, corrupted, empty
    Case(
        "st_truncated",
        _st_bytes(lambda d: d[: len(d) // 2]),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{st!r} is not a readable safetensors file (Error while deserializing header: incomplete metadata, file not fully covered)",
    ),
    Case(
        "st_header_length_past_end",
        _st_bytes(lambda d: struct.pack("<Q", 1_000_000) + d[8:]),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{st!r} is not a readable safetensors file (Error while deserializing header: invalid header length)",
    ),
    Case(
        "st_zero_bytes",
        _st_bytes(lambda d: b""),
        _load,
        _inspect,
        AdapterFormatError,
        "{st!r} is not a readable safetensors file (Error while deserializing header: header too small)",
    ),
    Case(
        "st_header_not_json",
        _st_bytes(lambda d: struct.pack("<Q", 16) + b"{ia3: not json!}" + d[8:]),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{st!r} is not a readable safetensors file (Error while deserializing header: invalid JSON in header",
    ),
    Case(
        "st_unknown_dtype",
        _st_bytes(_header_edit(lambda h: h[K_KEY].update(dtype="F33"))),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{st!r} is not a readable safetensors file (Error while deserializing header: invalid JSON in header: unknown variant `F33`",
    ),
    Case(
        "st_offsets_disagree_with_shape",
        _st_bytes(_header_edit(lambda h: h[K_KEY].update(data_offsets=[0, 4]))),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{st!r} is not a readable safetensors file (Error while deserializing header: invalid shape, data type, or offset for tensor)",
    ),
    # adapter_config.json
    Case(
        "config_missing",
        _no_config,
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r} has no adapter_config.json; pass a PEFT adapter directory (the folder save_pretrained wrote)",
    ),
    Case(
        "config_not_json",
        _config("{peft_type: IA3"),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{cfg!r} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
        "re-save the adapter with PEFT",
    ),
    Case(
        "config_is_a_list",
        _config('["IA3"]'),
        _load,
        _inspect,
        AdapterFormatError,
        "{cfg!r} holds a list, not a JSON object",
    ),
    Case(
        "config_peft_type_missing",
        _config_edit(lambda c: c.pop("peft_type")),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r} is a None adapter, not IA3 (peft_type=None); ia3fuse fuses IA3 adapters only",
    ),
    Case(
        "config_lora",
        _none,
        _merge("a", "lora"),
        _cli("a", "lora"),
        AdapterFormatError,
        "{lora!r} is a LORA adapter, not IA3 (peft_type='LORA'); ia3fuse fuses IA3 adapters only",
    ),
    Case(
        "config_prefix_tuning",
        _config_edit(lambda c: c.update(peft_type="PREFIX_TUNING")),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r} is a PREFIX_TUNING adapter, not IA3 (peft_type='PREFIX_TUNING')",
    ),
    Case(
        "config_target_modules_int",
        _config_edit(lambda c: c.update(target_modules=7)),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{cfg!r}: target_modules is 7 (a int); PEFT writes a list of names or a regex string",
    ),
    Case(
        "config_feedforward_modules_dict",
        _config_edit(lambda c: c.update(feedforward_modules={"down_proj": 1})),
        _load,
        _inspect,
        AdapterFormatError,
        "{cfg!r}: feedforward_modules is {{'down_proj': 1}} (a dict); PEFT writes a list of names or a regex string",
    ),
    # tensors: keys, dtypes, shapes, values
    Case(
        "tensor_keys_unknown",
        _tensors(_only_unknown_keys),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r} holds no IA3 vectors (keys ending in '.ia3_l'); is it an IA3 adapter?",
    ),
    Case(
        "tensor_key_extra_differs",
        _two_extras,
        _merge("bad", "bad2"),
        _cli("bad", "bad2"),
        IncompatibleAdaptersError,
        "adapters 'bad' and 'bad2' carry different trained modules (modules_to_save, e.g. "
        "'base_model.model.lm_head.weight': a classifier head); ia3fuse fuses IA3 vectors, so choose what the fused "
        "adapter gets: pass extras='first' (--extras first on the command line)",
    ),
    Case(
        "dtype_int",
        _tensors(_set(K_KEY, torch.ones(16, 1, dtype=torch.int32))),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r}: the vector of 'model.layers.0.self_attn.k_proj' has dtype torch.int32; IA3 vectors are floating point",
    ),
    Case(
        "shape_3d",
        _tensors(_set(K_KEY, lambda v: v.reshape(16, 1, 1))),
        _load,
        _inspect,
        AdapterFormatError,
        "{bad!r}: the vector of 'model.layers.0.self_attn.k_proj' has shape (16, 1, 1), but a output-side IA3 vector",
    ),
    Case(
        "shape_disagrees_with_kind",
        _tensors(_set(DOWN_KEY, lambda v: v.reshape(-1, 1))),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r}: the vector of 'model.layers.0.mlp.down_proj' has shape (64, 1), but a feed-forward (input-side) IA3 "
        "vector has shape (1, in_features); check feedforward_modules in adapter_config.json",
    ),
    Case(
        "vector_nan",
        _none,
        _merge("a", "nan"),
        _cli("a", "nan"),
        AdapterFormatError,
        "{nan!r}: the vector of 'model.layers.0.self_attn.k_proj' holds 1 NaN/Inf values; the adapter is corrupt",
    ),
    Case(
        "vector_inf",
        _tensors(_poke(float("inf"))),
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r}: the vector of 'model.layers.0.self_attn.k_proj' holds 1 NaN/Inf values; the adapter is corrupt",
    ),
    Case(
        "vector_nonpositive_geometric",
        _none,
        _merge("a", "nonpositive", method="geometric"),
        _cli("a", "nonpositive", flags=("--method", "geometric")),
        MethodInputError,
        "geometric: module 'model.layers.0.self_attn.k_proj', adapter 'nonpositive': ",
    ),
    # paths that are not adapter directories
    Case(
        "adapter_dir_empty",
        _empty_dir,
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "{bad!r} has no adapter_config.json; pass a PEFT adapter directory",
    ),
    Case(
        "adapter_path_is_a_file",
        _file_not_dir,
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "adapter path {bad!r} is not a directory; pass a PEFT adapter directory",
    ),
    Case(
        "adapter_path_missing",
        lambda i, t: {"bad": t / "nowhere"},
        _merge("a", "bad"),
        _cli("a", "bad"),
        AdapterFormatError,
        "adapter path {bad!r} does not exist; pass a PEFT adapter directory",
    ),
    # adapters that do not fit together
    Case(
        "bases_differ_strict",
        _none,
        _merge("a", "other_base", strict=True),
        _cli("a", "other_base", flags=("--strict",)),
        IncompatibleAdaptersError,
        "the adapters name different base models ('a': 'tiny', 'other_base': 'other-base'); fusing them is only "
        "meaningful on one base; pass strict=False (no --strict on the command line) to fuse anyway",
    ),
    Case(
        "bases_differ_shapes",
        _none,
        _merge("a", "wide"),
        _cli("a", "wide"),
        IncompatibleAdaptersError,
        "'model.layers.0.self_attn.k_proj' has different shapes ('a': (16, 1), 'wide': (24, 1))",
    ),
    Case(
        "feedforward_flags_differ",
        _none,
        _merge("a", "k_ff"),
        _cli("a", "k_ff"),
        IncompatibleAdaptersError,
        "'model.layers.0.self_attn.k_proj' is feed-forward in one adapter and not in another "
        "('a': output-side, 'k_ff': feed-forward)",
    ),
    # adapter lists
    Case(
        "adapters_empty",
        _none,
        lambda p: ia3fuse.merge([]),
        None,
        IncompatibleAdaptersError,
        "no adapters given; pass at least one adapter",
        no_cli="argparse requires an input (nargs='+'); the CLI's empty list is a recipe: recipe_adapters_empty",
    ),
    Case(
        "adapters_duplicate_with_mapping",
        _none,
        lambda p: ia3fuse.merge([p.a, p.a], {"a": 0.5}),
        None,
        InvalidWeightsError,
        "weights lacks 'a#1'; give one weight for each adapter: 'a', 'a#1'",
        no_cli="--weights takes a list; a mapping needs a recipe, which refuses repeated names: recipe_names_repeat",
    ),
    # weights
    Case(
        "weights_count",
        _none,
        _merge("a", "b", weights=[0.5]),
        _cli("a", "b", flags=("--weights", "0.5")),
        InvalidWeightsError,
        "weights has 1 value for 2 adapters; pass one weight per adapter or a mapping",
    ),
    Case(
        "weights_nan",
        _none,
        _merge("a", "b", weights=[float("nan"), 1.0]),
        _cli("a", "b", flags=("--weights", "nan", "1")),
        InvalidWeightsError,
        "weights[0] is nan; weights must be finite numbers",
    ),
    Case(
        "weights_inf",
        _none,
        _merge("a", "b", weights=[1.0, float("inf")]),
        _cli("a", "b", flags=("--weights", "1", "inf")),
        InvalidWeightsError,
        "weights[1] is inf; weights must be finite numbers",
    ),
    Case(
        "weights_negative_overflow",
        _none,
        _merge("a", "b", weights=[-1e6, 1.0], method="geometric"),
        _cli("a", "b", flags=("--weights", "-1000000", "1", "--method", "geometric")),
        MethodInputError,
        "fused to non-finite values with weights [-1000000.0, 1.0]; use smaller weights or another method",
    ),
    Case(
        "weights_string",
        _recipe("adapters: [{a}, {b}]\nweights: '0.5'\noutput: OUT\n"),
        _merge("a", "b", weights="0.5"),
        _recipe_cli,
        InvalidWeightsError,
        "weights is '0.5'; pass one weight per adapter as a list, or a mapping adapter name -> weight",
    ),
    Case(
        "weights_depth_gradient_nested",
        _recipe("adapters: [{a}, {b}]\nweights: [[0, [1]], 0.5]\noutput: OUT\n"),
        _merge("a", "b", weights=[[0, [1]], 0.5]),
        _recipe_cli,
        InvalidWeightsError,
        "weights[0] holds the list [1]; a depth gradient is a flat list of numbers",
    ),
    Case(
        "weights_mapping_unknown_name",
        _recipe("adapters: [{a}, {b}]\nweights: {{a: 1, c: 2}}\noutput: OUT\n"),
        lambda p: ia3fuse.merge([p.a, p.b], {"a": 1, "c": 2}),
        _recipe_cli,
        InvalidWeightsError,
        "weights names no adapter 'c' and lacks 'b'; give one weight for each adapter: 'a', 'b'",
    ),
    # methods and their parameters
    Case(
        "density_zero",
        _none,
        _merge("a", "b", method="ties", density=0.0),
        _cli("a", "b", flags=("--method", "ties", "--density", "0")),
        InvalidParameterError,
        "method 'ties': density=0.0 is invalid (Input should be greater than 0)",
    ),
    Case(
        "density_above_one",
        _none,
        _merge("a", "b", method="dare_ties", density=1.5),
        _cli("a", "b", flags=("--method", "dare_ties", "--density", "1.5")),
        InvalidParameterError,
        "method 'dare_ties': density=1.5 is invalid (Input should be less than or equal to 1)",
    ),
    Case(
        "svd_rank_zero",
        _none,
        _merge("a", "b", method="svd", svd_rank=0),
        _cli("a", "b", flags=("--method", "svd", "--svd-rank", "0")),
        InvalidParameterError,
        "method 'svd': svd_rank=0 is invalid (Input should be greater than or equal to 1)",
    ),
    Case(
        "method_unknown_near_miss",
        _none,
        _merge("a", "b", method="tie"),
        _cli("a", "b", flags=("--method", "tie")),
        UnknownMethodError,
        "unknown fusion method 'tie'; valid methods are: linear, task_arithmetic, geometric, ties, dare_linear, "
        "dare_ties, magnitude_prune, breadcrumbs, svd",
    ),
    Case(
        "parameter_of_another_method",
        _none,
        _merge("a", "b", method="linear", density=0.5),
        _cli("a", "b", flags=("--method", "linear", "--density", "0.5")),
        InvalidParameterError,
        "method 'linear' has no parameter 'density'; its parameters are: none",
    ),
    # YAML recipes
    Case(
        "recipe_bad_yaml",
        _recipe("adapters: [{a}, {b}\nmethod: ties\n"),
        _recipe_api,
        _recipe_cli,
        RecipeError,
        "recipe {r!r} is not valid YAML (while parsing a flow sequence); fix the syntax",
    ),
    Case(
        "recipe_is_a_list",
        _recipe("- {a}\n- {b}\n"),
        _recipe_api,
        _recipe_cli,
        RecipeError,
        "recipe {r!r} holds a list, not a mapping; see docs/recipes.md for the format",
    ),
    Case(
        "recipe_python_tag",
        _recipe('adapters: !!python/object/apply:os.system ["touch {marker}"]\noutput: OUT\n'),
        _recipe_api,
        _recipe_cli,
        RecipeError,
        "recipe {r!r} is not valid YAML (could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'); fix the syntax",
    ),
    Case(
        "recipe_adapters_empty",
        _recipe("adapters: []\noutput: OUT\n"),
        _recipe_api,
        _recipe_cli,
        RecipeError,
        "recipe {r!r} is invalid: adapters: List should have at least 1 item after validation, not 0",
    ),
    Case(
        "recipe_names_repeat",
        _recipe("adapters: [{{path: {a}, name: x}}, {{path: {b}, name: x}}]\nweights: {{x: 0.5}}\noutput: OUT\n"),
        _recipe_api,
        _recipe_cli,
        RecipeError,
        "recipe {r!r} is invalid: adapter names repeat (x, x); give each adapter a distinct name",
    ),
    Case(
        "recipe_unknown_key",
        _recipe(_RECIPE_AB + "densty: 0.5\n"),
        _recipe_api,
        _recipe_cli,
        RecipeError,
        "recipe {r!r} is invalid: densty: Extra inputs are not permitted",
    ),
    # names that are paths
    Case(
        "name_traversal_adapter",
        _recipe("adapters: [{{path: {a}, name: ../../evil}}, {b}]\noutput: OUT\n"),
        lambda p: ia3fuse.merge({"../../evil": p.a, "b": p.b}),
        _recipe_cli,
        InvalidParameterError,
        "adapter name '../../evil' is a path that leaves its folder ('..' or a leading '/'); PEFT saves each "
        "adapter to a folder of its name, so pass a plain name such as 'evil'",
    ),
    Case(
        "name_traversal_fused",
        lambda i, t: {"evil": t.parent / "evil"},
        lambda p: ia3fuse.merge([p.a, p.b], name=p.evil),
        lambda p: ["merge", p.a, p.b, "--name", p.evil, "-o", p.out],
        InvalidParameterError,
        "adapter name {evil!r} is a path that leaves its folder ('..' or a leading '/')",
    ),
    # outputs
    Case(
        "output_exists",
        _existing_output,
        _save(),
        _cli("a", "b"),
        OutputPathError,
        "output {out!r} already exists; pass another path, or overwrite=True (--force on the command line)",
    ),
    Case(
        "output_symlink",
        _symlink_output,
        _save(force=True),
        _cli("a", "b", flags=("--force",)),
        OutputPathError,
        "output {out!r} is a symbolic link; pass a real directory path",
    ),
    Case(
        "output_inside_input",
        lambda i, t: {"out": i.a / "sub"},
        _run("a", "b"),
        _cli("a", "b"),
        OutputPathError,
        "output {out!r} lies inside the input {a!r}; pass a directory outside every input",
    ),
    Case(
        "output_is_input_force",
        lambda i, t: {"out": i.b},
        _run("a", "b", force=True),
        _cli("a", "b", flags=("--force",)),
        OutputPathError,
        "output {out!r} is also an input; pass a different output directory so the input is kept",
    ),
    Case(
        "output_holds_input_force",
        _output_holding_inputs,
        _run("in_a", "in_b", force=True),
        _cli("in_a", "in_b", flags=("--force",)),
        OutputPathError,
        "output {out!r} contains the input {in_a!r}, which writing it would delete",
    ),
    # pickle
    Case(
        "pickle_only_without_opt_in",
        _none,
        _merge("a", "pickle_only"),
        _cli("a", "pickle_only"),
        AdapterFormatError,
        "{pickle_only!r} holds only adapter_model.bin, a pickle file that can run code when loaded; pass "
        "allow_pickle=True (--allow-pickle) if you trust it (it is then read with weights_only=True)",
    ),
    Case(
        "pickle_malicious_with_opt_in",
        _malicious_pickle("zip"),
        _merge("a", "bad", allow_pickle=True),
        _cli("a", "bad", flags=("--allow-pickle",)),
        AdapterFormatError,
        "{pk!r} " + _PICKLE_REFUSED,
    ),
    Case(
        "pickle_malicious_legacy_stream",
        _malicious_pickle("raw"),
        _merge("a", "bad", allow_pickle=True),
        _cli("a", "bad", flags=("--allow-pickle",)),
        AdapterFormatError,
        "{pk!r} " + _PICKLE_REFUSED,
    ),
]

# These also go through the real ``ia3fuse`` entry point (a subprocess each, ~2-3 s).
SUBPROCESS = ["st_truncated", "recipe_python_tag", "pickle_malicious_with_opt_in", "output_symlink", "weights_string"]


def _declared_count() -> int:
    return int(re.search(r"corpus: (\d+) malformed", __doc__ or "").group(1))  # type: ignore[union-attr]


def test_the_corpus_is_large_distinct_and_counted() -> None:
    assert len(CASES) >= 30
    assert len(CASES) == _declared_count()
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.cli is None for c in CASES) == 2 and all(c.no_cli for c in CASES if c.cli is None)
    assert set(SUBPROCESS) <= {c.id for c in CASES if c.cli is not None}


# --- the checks ----------------------------------------------------------------------------------


def _paths(case: Case, i: Inputs, t: Path) -> SimpleNamespace:
    named: Paths = {
        "a": i.a,
        "b": i.b,
        "other_base": i.other_base,
        "wide": i.wide,
        "lora": i.lora,
        "k_ff": i.k_ff,
        "nan": i.nan,
        "nonpositive": i.nonpositive,
        "pickle_only": i.pickle_only,
        "t": t,
        "out": t / "OUT",
    }
    named.update(case.build(i, t))
    return SimpleNamespace(**{k: str(v) for k, v in named.items()})


def _flat(text: str) -> str:
    return " ".join(text.split())


class _Unchanged:
    """The state before a call: the inputs, the test folder and the output; `check` compares."""

    def __init__(self, i: Inputs, t: Path, p: SimpleNamespace) -> None:
        self.i, self.t, self.p = i, t, p
        self.out = Path(p.out)
        self.out_was = os.path.lexists(self.out)
        self.inputs, self.here = snapshot(i.root), snapshot(t)

    def check(self, who: str) -> None:
        assert snapshot(self.i.root) == self.inputs, f"{who} changed an input"
        assert snapshot(self.t) == self.here, f"{who} left or changed files in the test folder"
        assert os.path.lexists(self.out) == self.out_was, f"{who} left an output"
        assert leftovers(self.out.parent, self.out.name) == [], f"{who} left a temporary directory"
        assert not (self.t.parent / "evil").exists(), f"{who} wrote outside the test folder"
        marker = getattr(self.p, "marker", None)
        assert marker is None or not os.path.lexists(marker), f"{who} ran code from the input"


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[[list[object]], tuple[int, str, str]]:
    """``ia3fuse.cli.main`` in-process: (status, stdout, stderr)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main replaces it; restore after

    def run(argv: list[object]) -> tuple[int, str, str]:
        capsys.readouterr()
        status = cli_main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def _check_cli(status: int, stdout: str, stderr: str, message: str) -> None:
    assert status == 2, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ia3fuse: error: "), stderr
    assert message in lines[0], (message, lines[0])
    assert stdout == ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api_and_cli_refuse_with_the_message_and_change_nothing(
    case: Case, good: Inputs, tmp_path: Path, cli: Callable[[list[object]], tuple[int, str, str]]
) -> None:
    p = _paths(case, good, tmp_path)
    message = _flat(case.message.format(**vars(p)))
    state = _Unchanged(good, tmp_path, p)

    with pytest.raises(case.error) as caught:
        case.api(p)
    assert type(caught.value) is case.error
    assert message in _flat(str(caught.value))
    state.check("the API")

    if case.cli is None:
        assert case.no_cli
        return
    _check_cli(*cli(case.cli(p)), message)
    state.check("the CLI")


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_the_real_entry_point_agrees(case_id: str, good: Inputs, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    p = _paths(case, good, tmp_path)
    state = _Unchanged(good, tmp_path, p)
    res = run_cli(*case.cli(p), cwd=tmp_path)  # type: ignore[misc]
    _check_cli(res.returncode, res.stdout, res.stderr, _flat(case.message.format(**vars(p))))
    state.check("the ia3fuse command")


def test_debug_shows_the_traceback(good: Inputs, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "st_header_length_past_end")
    p = _paths(case, good, tmp_path)
    state = _Unchanged(good, tmp_path, p)
    res = run_cli("--debug", *case.cli(p), cwd=tmp_path)  # type: ignore[misc]
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.startswith("Traceback (most recent call last):")
    assert "ia3fuse.errors.AdapterFormatError: " in res.stderr and "invalid header length" in res.stderr
    assert "ia3fuse: error:" not in res.stderr
    state.check("ia3fuse --debug")


# --- no code runs from files ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_the_pickle_payloads_are_live(kind: str, good: Inputs, tmp_path: Path) -> None:
    """The refused pickles really run code when loaded unsafely (so refusing them is the point)."""
    p = _malicious_pickle(kind)(good, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(p["pk"], weights_only=False)
    assert p["marker"].exists()


def test_the_yaml_payload_is_live(good: Inputs, tmp_path: Path) -> None:
    p = _recipe('adapters: !!python/object/apply:os.system ["touch {marker}"]\n')(good, tmp_path)
    yaml.unsafe_load(p["r"].read_text())
    assert p["marker"].exists()


def test_allow_pickle_reads_with_weights_only(good: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    adapter = ia3fuse.load_adapter(good.pickle_only, allow_pickle=True)
    assert [c.get("weights_only") for c in calls] == [True]
    want = ia3fuse.load_adapter(good.a).vectors
    assert list(adapter.vectors) == list(want)
    assert all(torch.equal(adapter.vectors[k], want[k]) for k in want)


# --- adapter names never become paths ------------------------------------------------------------


def test_names_with_slashes_stay_labels(good: Inputs, tmp_path: Path) -> None:
    """A name may hold '/' (e.g. a hub id); it labels the adapter and never picks where files go."""
    work = tmp_path / "work"
    work.mkdir()
    fused = ia3fuse.merge({"org/math": good.a, "org/code": good.b}, name="org/fused")
    out = fused.save(work / "OUT")
    assert sorted(os.listdir(work)) == ["OUT"]
    assert sorted(os.listdir(out)) == ["README.md", CFG, ST]
    assert "# org/fused" in (out / "README.md").read_text()

    mix = ia3fuse.Mixture(tiny_model("llama", seed=0), {"org/math": good.a, "org/code": good.b})
    try:
        saved = mix.save(work / "MIX")
    finally:
        mix.close()
    assert sorted(os.listdir(work)) == ["MIX", "OUT"]
    files = sorted(str(Path(d, f).relative_to(saved)) for d, _, fs in os.walk(saved) for f in fs)
    assert files == sorted(["mixture.json"] + [f"adapters/{n}/{f}" for n in "01" for f in ("README.md", CFG, ST)])
    assert json.loads((saved / "mixture.json").read_text())["names"] == ["org/math", "org/code"]


def test_a_mixture_refuses_a_name_that_leaves_its_folder(good: Inputs, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match=re.escape("adapter name '../../evil' is a path that leaves")):
        ia3fuse.Mixture(tiny_model("llama", seed=0), {"../../evil": good.a, "b": good.b})
    assert not (tmp_path.parent / "evil").exists()
