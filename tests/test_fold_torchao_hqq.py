"""The torchao and HQQ fold backends, on CPU, against the quantized model with IA3 applied by hooks.

PEFT's IA3 cannot wrap these layers, so the reference is the quantized model itself with forward
hooks: an output-side vector multiplies its layer's output, a feed-forward one its layer's input.
Exact paths must match it at the float32 floor; the lossy ones (a statistic shared by several rows)
are refused under ``exact="require"`` and requantized otherwise. Errors are relative:
``max |got - want| / max |want|``. Each library is probed (skipped when absent) where it is used.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ia3fuse
from ia3fuse.errors import FoldError
from ia3fuse.folding.base import FoldOptions, backend_for
from factories import random_ia3_adapter, tiny_model

EXACT = 1e-5  # float32 compute: a few ulps of the largest logit
TARGETS = ["k_proj", "v_proj", "down_proj"]
EXACT_PATHS = {"k_proj": "statistic", "v_proj": "statistic", "up_proj": "statistic + neighbour"}
OPTIONS = FoldOptions()
REQUANT = "can only be folded by dequantize-scale-requantize"


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def scales(n: int, seed: int = 1) -> torch.Tensor:
    """IA3-like values around 1, every fifth one negative (rows fold exactly with any sign)."""
    values = 1 + 0.4 * torch.randn(n, generator=torch.Generator().manual_seed(seed))
    values[::5] *= -1
    return values


def base_model() -> nn.Module:
    return tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_ia3_adapter(
        base_model(),
        tmp_path_factory.mktemp("ao_hqq") / "adapter",
        seed=5,
        spread=0.2,
        target_modules=TARGETS,
        feedforward_modules=["down_proj"],
    )


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def hooked_logits(model: nn.Module, adapter: Path) -> torch.Tensor:
    """The quantized model's logits with the adapter applied as PEFT's IA3 forward applies it."""
    loaded = ia3fuse.load_adapter(adapter)
    handles = []
    for path, vec in loaded.vectors.items():
        l = vec.reshape(-1).float()
        module = model.get_submodule(path)
        if loaded.feedforward[path]:
            handles.append(
                module.register_forward_pre_hook(lambda m, args, l=l: (args[0] * l.to(args[0].dtype), *args[1:]))
            )
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, l=l: out * l.to(out.dtype)))
    try:
        return logits(model)
    finally:
        for h in handles:
            h.remove()


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor a fold may touch: torchao subclasses' inner tensors, HQQ codes, meta
    and bias, and the plain parameters."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        w = module.__dict__.get("_parameters", {}).get("weight")
        if hasattr(w, "tensor_data_names"):
            for attr in [*w.tensor_data_names, *getattr(w, "optional_tensor_data_names", [])]:
                if getattr(w, attr, None) is not None:
                    out[f"{name}.weight.{attr}"] = getattr(w, attr).detach().clone()
        if isinstance(getattr(module, "meta", None), dict):
            out[f"{name}.W_q"] = module.W_q.detach().clone()
            out.update({f"{name}.meta.{k}": v.clone() for k, v in module.meta.items() if torch.is_tensor(v)})
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach().clone()
    for name, p in model.named_parameters():
        if type(p) in (torch.Tensor, nn.Parameter):
            out[name] = p.detach().clone()
    return out


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = quantized_state(model)
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not (v.dtype == after[k].dtype and torch.equal(v, after[k]))]
    assert not changed, f"not restored bit for bit: {changed[:5]}"


def paths(report: Any) -> dict[str, str]:
    return {e.module.rsplit(".", 1)[-1]: e.path for e in report.entries}


# --------------------------------------------------------------------------- torchao


def _torchao_config(name: str) -> Any:
    pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup, PerTensor

    return {
        "int8-row": lambda: Int8WeightOnlyConfig(),
        "int8-group32": lambda: Int8WeightOnlyConfig(granularity=PerGroup(32)),
        "int8-tensor": lambda: Int8WeightOnlyConfig(granularity=PerTensor()),
        "float8-row": lambda: Float8WeightOnlyConfig(),
        "intx-int4-group32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        # Int4WeightOnlyConfig has no CPU packing in torchao 0.18; this is its CPU int4 path (tinygemm)
        "int4-cpu-group32": lambda: PrototypeInt4WeightOnlyConfig(group_size=32),
    }[name]()


def torchao_model(name: str) -> nn.Module:
    from torchao.quantization import quantize_

    model = base_model()
    quantize_(model, _torchao_config(name))
    return model


TORCHAO_EXACT = ["int8-row", "int8-group32", "float8-row", "intx-int4-group32", "int4-cpu-group32"]
# one requantization of a 32x64 layer, max error relative to the largest weight (measured: int8 0.004,
# float8 0.033, int4 0.067 and 0.058)
REQUANT_ERROR = dict.fromkeys(["int8-row", "int8-group32"], 5e-3) | {"float8-row": 7e-2}
REQUANT_ERROR |= dict.fromkeys(["intx-int4-group32", "int4-cpu-group32"], 0.1)


@pytest.mark.parametrize("name", TORCHAO_EXACT)
def test_torchao_fold_is_exact_and_unfolds_bit_for_bit(adapter: Path, name: str) -> None:
    model = torchao_model(name)
    want = hooked_logits(model, adapter)
    before = quantized_state(model)
    folded = ia3fuse.fold(model, adapter, exact="require", keep_originals=True, measure_error=True)
    assert rel(logits(folded), want) < EXACT
    report = folded.ia3fuse_report
    assert report.exact and paths(report) == EXACT_PATHS
    assert report.max_error is not None and report.max_error < 1e-6
    assert {backend_for(model.get_submodule(e.module)).name for e in report.entries} == {"torchao"}
    ia3fuse.unfold(folded)
    assert_same_state(folded, before)


def test_torchao_per_tensor_scale_is_refused_under_require_and_requantized_otherwise(adapter: Path) -> None:
    model = torchao_model("int8-tensor")
    before = quantized_state(model)
    with pytest.raises(FoldError, match=rf"6 module\(s\) {REQUANT}.*keeps one scale for the whole weight"):
        ia3fuse.fold(model, adapter, exact="require")
    assert_same_state(model, before)  # refused before anything changed

    want = hooked_logits(model, adapter)
    with pytest.warns(UserWarning, match="were folded by dequantize-scale-requantize"):
        folded = ia3fuse.fold(model, adapter, keep_originals=True)
    report = folded.ia3fuse_report
    assert not report.exact
    assert paths(report) == {"k_proj": "requantize", "v_proj": "requantize", "down_proj": "requantize"}
    for e in report.entries:  # rows: the shared scale; down_proj: its columns (up_proj's rows are no way out)
        assert (
            "column scale changes values" if "down_proj" in e.module else "one scale for the whole weight"
        ) in e.reason
    assert 1e-4 < report.max_error < 2e-2  # int8 requantization error, measured and reported
    assert rel(logits(folded), want) < 5e-2
    ia3fuse.unfold(folded)
    assert_same_state(folded, before)


@pytest.mark.parametrize("name", TORCHAO_EXACT)
def test_torchao_layer_rows_with_negative_scales_and_requantize(name: str) -> None:
    from torchao.quantization import quantize_

    layer = nn.Linear(64, 32, bias=True)
    quantize_(layer, _torchao_config(name))
    backend = backend_for(layer)
    assert backend is not None and backend.name == "torchao"
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0 = layer(x)
    dense0 = backend.dequantize(layer)
    assert dense0.dtype == torch.float32 and dense0.shape == (32, 64)
    # dequantize is the weight the forward uses (the int4 one decodes tinygemm's CPU packing)
    assert rel(x @ dense0.t() + layer.bias.detach(), y0) < EXACT
    assert "a column scale changes values inside every block" in backend.exact_cols(layer)
    l = scales(32)
    snap = backend.snapshot(layer, weights=False)
    assert backend.scale_rows(layer, l, options=OPTIONS) == "statistic"
    with torch.no_grad():
        assert rel(layer(x), y0 * l) < EXACT
    backend.restore(layer, snap)
    with torch.no_grad():
        assert torch.equal(layer(x), y0)
    snap = backend.snapshot(layer, weights=True)
    assert backend.requantize(layer, l, scales(64, seed=2), options=OPTIONS) == "requantize"
    assert type(layer.weight) is type(snap["weight"])
    want = dense0 * l[:, None] * scales(64, seed=2)[None, :]
    assert rel(backend.dequantize(layer), want) < REQUANT_ERROR[name]
    backend.restore(layer, snap)
    with torch.no_grad():
        assert torch.equal(layer(x), y0)


def test_torchao_and_hqq_backends_register_without_importing_their_libraries() -> None:
    """Registering costs nothing: each library is imported only when a model holds its layers."""
    code = (
        "import json, sys\n"
        "from ia3fuse.folding.base import backends\n"
        "print(json.dumps([[b.name for b in backends()], 'torchao' in sys.modules, 'hqq' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, torchao_loaded, hqq_loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for lib in ("torchao", "hqq"):
        assert (lib in names) == (find_spec(lib) is not None)
    assert not torchao_loaded and not hqq_loaded


# --------------------------------------------------------------------------- HQQ


def _hqq() -> Any:
    return pytest.importorskip("hqq.core.quantize", reason="hqq is not installed")


def hqq_layer(linear: nn.Linear, axis: int, group: int = 16, dtype: torch.dtype = torch.float32) -> Any:
    hqq = _hqq()
    config = hqq.BaseQuantizeConfig(nbits=4, group_size=group, axis=axis)
    return hqq.HQQLinear(linear, config, compute_dtype=dtype, device="cpu")


def hqq_model(axis: int) -> nn.Module:
    model = base_model()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, hqq_layer(child, axis))
    return model


def test_hqq_axis1_fold_is_exact_and_unfolds_bit_for_bit(adapter: Path) -> None:
    model = hqq_model(axis=1)
    want = hooked_logits(model, adapter)
    before = quantized_state(model)
    folded = ia3fuse.fold(model, adapter, exact="require", keep_originals=True, measure_error=True)
    assert rel(logits(folded), want) < EXACT
    report = folded.ia3fuse_report
    assert report.exact and paths(report) == EXACT_PATHS
    assert report.max_error is not None and report.max_error < 1e-6
    ia3fuse.unfold(folded)
    assert_same_state(folded, before)


def test_hqq_axis0_rows_are_refused_under_require(adapter: Path) -> None:
    model = hqq_model(axis=0)
    before = quantized_state(model)
    with pytest.raises(FoldError, match=rf"4 module\(s\) {REQUANT}.*axis=0 groups 16 values down a column"):
        ia3fuse.fold(model, adapter, exact="require")
    assert_same_state(model, before)


def test_hqq_axis0_folds_columns_exactly_and_requantizes_rows(adapter: Path) -> None:
    model = hqq_model(axis=0)
    want = hooked_logits(model, adapter)
    before = quantized_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = ia3fuse.fold(model, adapter, keep_originals=True, measure_error=True)
    assert any("were folded by dequantize-scale-requantize" in str(w.message) for w in caught)
    report = folded.ia3fuse_report
    assert paths(report) == {"k_proj": "requantize", "v_proj": "requantize", "down_proj": "statistic"}
    assert rel(logits(folded), want) < 0.2  # two 4-bit requantizations per layer
    ia3fuse.unfold(folded)
    assert_same_state(folded, before)


@pytest.mark.parametrize("axis", [1, 0])
def test_hqq_layer_exact_side_negative_scales_snapshot_and_requantize(axis: int) -> None:
    torch.manual_seed(0)
    layer = hqq_layer(nn.Linear(64, 32, bias=True), axis)
    backend = backend_for(layer)
    assert backend is not None and backend.name == "hqq" and backend.features(layer) == (32, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0 = layer(x)
    dense0 = backend.dequantize(layer)
    assert rel(x @ dense0.t() + layer.bias.detach(), y0) < EXACT
    snap = backend.snapshot(layer, weights=False)
    if axis == 1:
        assert backend.exact_rows(layer) is None
        assert "axis=1 groups 16 consecutive inputs of a row" in backend.exact_cols(layer)
        l = scales(32)
        assert backend.scale_rows(layer, l, options=OPTIONS) == "statistic"
        with torch.no_grad():
            assert rel(layer(x), y0 * l) < EXACT
    else:
        assert backend.exact_cols(layer) is None
        assert "axis=0 groups 16 values down a column" in backend.exact_rows(layer)
        c = scales(64)
        assert backend.scale_cols(layer, c, options=OPTIONS) == "statistic"
        with torch.no_grad():
            assert rel(layer(x), layer.bias.detach() + (x * c) @ dense0.t()) < EXACT
        with pytest.raises(FoldError, match="axis=0 groups"):
            backend.scale_rows(layer, scales(32), options=OPTIONS)
    backend.restore(layer, snap)
    with torch.no_grad():
        assert torch.equal(layer(x), y0)
    snap = backend.snapshot(layer, weights=True)
    l = scales(32)
    assert backend.requantize(layer, l, None, options=OPTIONS) == "requantize"
    assert rel(backend.dequantize(layer), dense0 * l[:, None]) < 0.1  # one 4-bit requantization (measured 0.04, 0.05)
    with torch.no_grad():
        assert rel(layer.bias.detach(), snap["bias"] * l) < EXACT
    backend.restore(layer, snap)
    with torch.no_grad():
        assert torch.equal(layer(x), y0)


def test_hqq_group_straddling_rows_is_not_exact() -> None:
    layer = hqq_layer(nn.Linear(24, 32, bias=False), axis=1, group=16)  # 24 % 16: groups straddle rows
    backend = backend_for(layer)
    assert backend is not None
    assert "in_features=24 is not a multiple of the HQQ group_size 16" in backend.exact_rows(layer)
