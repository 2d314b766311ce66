"""Every IA3 architecture: PEFT's model types (and a custom torch model) x merge, fold, mixtures.

One tiny model per model type (`tests/archs.py`), built once per module with two random IA3
adapters on PEFT's default target modules. Every cell compares against a reference that can fail:

* ``targets``: PEFT's default target modules all exist in the installed transformers' model.
* ``merge``: PEFT loads our fused adapter; its logits equal the base with the fused vectors
  computed by hand from the adapters' files and applied by hooks (the feed-forward side taken
  from PEFT's mapping, not from ia3fuse).
* ``fold``: ``ia3fuse.fold`` of the PEFT model; logits equal PEFT's unmerged forward.
* ``fold_int8`` / ``fold_nf4``: the same on the bitsandbytes-quantized base; each module's fold
  path must be the one the architecture allows (statistic, gated/ReLU neighbour, or requantize).
* ``checkpoint``: ``fold_checkpoint`` of the saved base equals the in-memory fold bit for bit.
* ``mixture``: per-sample `Mixture` logits equal each sample run alone through PEFT with that
  sample's row merged by ``ia3fuse.merge``.

A cell that cannot work asserts its error (type and the phrase naming the model type or the
module). With ``IA3FUSE_SUPPORT_JSON=path`` every passing cell appends one JSON line
``{model_type, feature, status, detail}``; ``benchmarks/support_table.py`` turns them into
``docs/support.md``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
import transformers as tf
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import ia3fuse
from ia3fuse import FoldError, IA3Adapter, IncompatibleAdaptersError, Mixture, merge
from ia3fuse._runtime import no_hf_progress_bars, torch_threads
from archs import ARCHITECTURES, UnsupportedModelTypeError, peft_ia3_defaults, tiny_arch_model
from factories import random_ia3_adapter
from ia3fuse.live import ia3_layers

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:  # pragma: no cover - the "quant" extra is not installed: only the bnb cells skip
    bnb = bnbF = None

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

CUSTOM = "custom"  # a user's torch model: nn.Linear, Conv1D and nn.Conv2d with their own targets
MODEL_TYPES = [*ARCHITECTURES, CUSTOM]
WEIGHTS = [0.6, 0.7]  # the merge cell's weights (task arithmetic)
ROWS = torch.tensor([[1.0, 0.0], [0.3, 0.7], [-0.4, 1.2]])  # the mixture cell's per-sample weights
B, T = 3, 6
SPREAD = 0.2  # IA3 values 1 + 0.2 N(0, 1): all > 0 for these seeds (the ReLU rewrite needs l > 0)
# Relative errors. fp32 forwards that compute the same products in another order differ by ~1e-7
# (the exact bitsandbytes paths too: int8 logits came out bit-identical, nf4 within 6e-7).
EXACT = 1e-5
# The requantize fallback re-rounds whole layers (each one is also checked against bitsandbytes'
# own quantization of diag(l) W, bit for bit): ~1% of a layer in int8, ~10% in nf4; observed in
# the logits here: up to 2e-2 (int8) and 1.2e-1 (nf4).
REQUANT = {"fold_int8": 0.05, "fold_nf4": 0.15}
QUANT = {
    "fold_int8": dict(load_in_8bit=True),
    "fold_nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}
# Architecture knowledge, not ia3fuse's: where a feed-forward vector can go on a quantized model.
# Gated MLPs down(act(gate x) * up x) move it onto up's rows; ReLU fc1 -> fc2 onto fc1's rows.
FF_NEIGHBOUR = {
    **dict.fromkeys(["llama", "llama4", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], "up_proj"),
    "opt": "fc1",
}
# PEFT's default targets that the installed transformers' model lacks, and why.
ABSENT_TARGETS = {
    "mixtral": (
        ["w2"],
        "transformers {version} stores Mixtral's experts as 3D parameters (mlp.experts.down_proj), not nn.Linear "
        "modules, so PEFT's default target 'w2' matches nothing and PEFT silently adapts only k_proj, v_proj; "
        "an adapter with expert modules (transformers 4 layout) is refused by fold, fold_checkpoint and Mixture",
    ),
}
# Model types whose layers transformers' bitsandbytes integration does not quantize.
NOT_QUANTIZED = {
    "falcon": (
        "transformers {version}'s bitsandbytes integration replaces only modules whose type is exactly nn.Linear "
        "(or Conv1D); Falcon's layers are FalconLinear, a subclass, so they stay full precision (the fold is "
        "then the dense one, exact)"
    ),
}
CUSTOM_TARGETS = ["conv_in", "conv_mid", "proj", "mix", "fc2"]
CUSTOM_FEEDFORWARD = ["conv_mid", "mix", "fc2"]


# ---------------------------------------------------------------- support-table records


def record(model_type: str, feature: str, status: str, detail: str, reason: Optional[str] = None) -> None:
    """Append one result line for docs/support.md when IA3FUSE_SUPPORT_JSON names a file.

    ``detail`` says what the cell did (fold paths, errors); ``reason`` why a cell is a fallback
    or unsupported (cells with the same reason share one note in the table).
    """
    path = os.environ.get("IA3FUSE_SUPPORT_JSON")
    if not path:
        return
    assert status in ("exact", "fallback", "unsupported"), status
    assert (reason is None) == (status == "exact"), (status, reason)
    rec = {"model_type": model_type, "feature": feature, "status": status, "detail": detail, "reason": reason}
    line = json.dumps(rec)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


# ---------------------------------------------------------------- a custom torch model


class TinyConvNet(nn.Module):
    """A user's own model: a Conv2d stem (one grouped), a GPT-2-style Conv1D, a Linear ReLU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.conv_mid = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(64, 64)
        self.mix = Conv1D(64, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, pixels: Tensor) -> Tensor:
        h = torch.relu(self.conv_mid(torch.relu(self.conv_in(pixels))))
        h = torch.tanh(self.proj(self.pool(h).flatten(1)))
        h = self.mix(h)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


def tiny_custom_model(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    model = TinyConvNet()
    with torch.no_grad():  # Conv1D starts at std 0.02 and zero bias: too quiet to test anything
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.5))
    return model.eval()


def quantize_linears(model: nn.Module, feature: str) -> nn.Module:
    """``model`` with every nn.Linear replaced by a bitsandbytes layer (as transformers builds them;
    4-bit with bitsandbytes' default double quantization); Conv1D and Conv2d stay dense
    (bitsandbytes has no such layers)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if feature == "fold_int8":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, has_fp16_weights=False, threshold=0.0)
            layer.load_state_dict(module.state_dict())
        else:
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, compute_dtype=torch.float32, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.data.clone(), requires_grad=False, quant_type="nf4", module=layer
            )
            layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.to("cpu"))
    # PEFT wraps bitsandbytes layers with its quantized IA3 layers only when the model says so
    flag = "is_loaded_in_8bit" if feature == "fold_int8" else "is_loaded_in_4bit"
    object.__setattr__(model, flag, True)
    return model


# ---------------------------------------------------------------- per-model-type setup


@dataclass
class Setup:
    """One model type: a tiny base (never wrapped or changed: tests take copies) and adapters a, b."""

    model_type: str
    model: nn.Module
    base_dir: Path
    adapters: dict[str, Path]
    targets: list[str]  # PEFT's defaults (custom: the user's)
    feedforward: list[str]
    inputs: dict[str, Any]
    root: Path
    cls: Optional[type]  # transformers class for from_pretrained (None: custom)
    explicit: bool  # targets passed to PEFT explicitly (custom; a model type other than PEFT's key)
    note: str = ""

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def sample(self, b: int) -> dict[str, Any]:
        return {k: v[b : b + 1] if isinstance(v, Tensor) else v for k, v in self.inputs.items()}

    def logits(self, model: Any, inputs: Optional[dict[str, Any]] = None) -> Tensor:
        with torch.no_grad():
            out = model(**(self.inputs if inputs is None else inputs))
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state

    def from_pretrained(self, **kwargs: Any) -> nn.Module:
        assert self.cls is not None
        return self.cls.from_pretrained(str(self.base_dir), dtype=torch.float32, **kwargs).eval()


def with_random_biases(model: nn.Module) -> nn.Module:
    """Transformers initialises biases to 0, which would hide a bias left unscaled."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _build(model_type: str, root: Path) -> Setup:
    gen = torch.Generator().manual_seed(1)
    if model_type == CUSTOM:
        model = tiny_custom_model()
        targets, feedforward = CUSTOM_TARGETS, CUSTOM_FEEDFORWARD
        (root / "base").mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "base" / "model.safetensors"))
        inputs: dict[str, Any] = {"pixels": torch.randn(B, 3, 8, 8, generator=gen)}
        cls, explicit, note = None, True, ""
    else:
        recipe = ARCHITECTURES[model_type]
        model = with_random_biases(tiny_arch_model(model_type, seed=0))
        targets, feedforward = peft_ia3_defaults(model_type)
        model.save_pretrained(str(root / "base"))
        inputs = {"input_ids": torch.randint(3, 128, (B, T), generator=gen)}
        if recipe.kind == "seq2seq":
            inputs["decoder_input_ids"] = torch.randint(3, 128, (B, 4), generator=gen)
        cls, explicit, note = type(model), model.config.model_type != model_type, recipe.note
    kw = dict(target_modules=targets, feedforward_modules=feedforward) if explicit else {}
    adapters = {
        name: random_ia3_adapter(model, root / name, seed=seed, spread=SPREAD, **kw)
        for name, seed in (("a", 11), ("b", 12))
    }
    return Setup(model_type, model, root / "base", adapters, targets, feedforward, inputs, root, cls, explicit, note)


@pytest.fixture(autouse=True)
def _quiet_one_thread() -> Iterator[None]:
    with torch_threads(1), no_hf_progress_bars(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Setup]:
    """Builds each model type's setup on first use (the module's tests then share it)."""
    cache: dict[str, Setup] = {}

    def get(model_type: str) -> Setup:
        if model_type not in cache:
            with torch_threads(1), no_hf_progress_bars(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[model_type] = _build(model_type, tmp_path_factory.mktemp(model_type))
        return cache[model_type]

    return get


def setup_or_unsupported(setups: Callable[[str], Setup], model_type: str, feature: str) -> Optional[Setup]:
    """The setup, or None after asserting (and recording) why the model type cannot be built."""
    recipe = ARCHITECTURES.get(model_type)
    if recipe is None or recipe.unsupported is None:
        return setups(model_type)
    with pytest.raises(UnsupportedModelTypeError, match=re.escape(f"model type {model_type!r}")) as info:
        tiny_arch_model(model_type)
    record(model_type, feature, "unsupported", str(info.value), str(info.value))
    return None


# ---------------------------------------------------------------- helpers


def rel(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def short(path: str) -> str:
    """``model.layers.0.mlp.down_proj`` -> ``mlp.down_proj`` (what follows the last layer index)."""
    parts = path.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1 :]) if idx else path


def names(paths: Any) -> str:
    return ", ".join(sorted({short(p) for p in paths}))


def is_ff(feedforward: list[str], path: str) -> bool:
    return any(path.endswith(n) for n in feedforward)


def vectors_of(adapter_dir: Path) -> dict[str, Tensor]:
    """The adapter file's IA3 vectors by module path, read with safetensors (not ia3fuse)."""
    raw = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").removesuffix(".ia3_l"): v for k, v in raw.items()}


@contextlib.contextmanager
def hooked(model: nn.Module, vectors: dict[str, Tensor], feedforward: list[str]) -> Iterator[nn.Module]:
    """``model`` with IA3 applied by hand: output-side ``f(x) * l``, feed-forward ``f(x * l)``."""
    handles = []
    for path, vec in vectors.items():
        module = model.get_submodule(path)
        scale = vec.detach().float().reshape(-1)
        if isinstance(module, nn.Conv2d):
            scale = scale.view(-1, 1, 1)
        if is_ff(feedforward, path):
            handles.append(module.register_forward_pre_hook(lambda m, args, s=scale: (args[0] * s, *args[1:])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, s=scale: out * s))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def no_repack(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes 4-bit layers in the canonical fp32 layout: on an AVX512-BF16 CPU bnb 0.50
    repacks them on the first eval forward and computes in bf16 (1e-2 noise would hide a wrong fold)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def tensors_of(folder: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_targets(setups, model_type):
    s = setup_or_unsupported(setups, model_type, "targets")
    if s is None:
        return
    kw = dict(target_modules=s.targets, feedforward_modules=s.feedforward) if s.explicit else {}
    peft = get_peft_model(s.fresh(), IA3Config(init_ia3_weights=False, **kw))  # PEFT's own random vectors
    layers = ia3_layers(peft)
    assert layers
    for path, layer in layers.items():  # the feed-forward side is PEFT's rule: a suffix of the path
        assert bool(layer.is_feedforward) == is_ff(s.feedforward, path), path
    matched = {t: sorted({short(p) for p in layers if p == t or p.endswith("." + t)}) for t in s.targets}
    absent = [t for t, hits in matched.items() if not hits]
    kinds = sorted({type(layer.get_base_layer()).__name__ for layer in layers.values()})
    ff = [t for t in s.targets if t in s.feedforward]
    # what each default target matches (PEFT's suffix rule: BERT's 'output.dense' also takes
    # attention.output.dense, the attention's output projection)
    detail = (
        f"{len(layers)} {'/'.join(kinds)} modules; "
        + "; ".join(f"{t} -> {', '.join(h) or 'nothing'}" for t, h in matched.items())
        + (f"; feed-forward: {', '.join(ff)}" if ff else "")
        + (f"; {s.note}" if s.note else "")
    )
    if model_type not in ABSENT_TARGETS:
        assert absent == []
        record(model_type, "targets", "exact", detail)
        return
    want, why = ABSENT_TARGETS[model_type]
    assert absent == want
    if model_type == "mixtral":
        assert s.model.get_submodule("model.layers.0.mlp.experts").down_proj.dim() == 3
        _assert_expert_adapter_refused(s)
    record(model_type, "targets", "unsupported", detail, f"{', '.join(absent)}: " + why.format(version=tf.__version__))


def _assert_expert_adapter_refused(s: Setup) -> None:
    """A Mixtral adapter with per-expert w2 modules (transformers 4 layout): a clear error everywhere."""
    expert = "model.layers.0.block_sparse_moe.experts.0.w2"
    k = "model.layers.0.self_attn.k_proj"
    adapter = IA3Adapter(
        vectors={k: torch.full((32, 1), 1.1), expert: torch.full((1, 128), 0.9)},
        feedforward={k: False, expert: True},
        config={"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "w2"], "feedforward_modules": ["w2"]},
        name="experts",
    )
    with pytest.raises(
        FoldError,
        match=re.escape(
            f"1 of the adapter's 2 modules does not fit the model (model type 'mixtral'): {expert!r} (absent)"
        ),
    ):
        ia3fuse.fold(s.fresh(), adapter)
    with pytest.raises(
        FoldError,
        match=re.escape("1 of the adapter's 2 modules does not fit the model built from config.json (")
        + r"\w+"
        + re.escape(f", model type 'mixtral'): {expert!r} (absent); the adapter was trained on another base model"),
    ):
        ia3fuse.fold_checkpoint(s.base_dir, adapter, s.root / "refused", progress=False)
    assert not (s.root / "refused").exists()
    # the model's class names its type here
    with pytest.raises(
        IncompatibleAdaptersError,
        match=re.escape(f"(MixtralForCausalLM, model type 'mixtral'): it has no module {expert!r}"),
    ):
        Mixture(s.fresh(), [adapter])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merge(setups, model_type):
    s = setup_or_unsupported(setups, model_type, "merge")
    if s is None:
        return
    va, vb = vectors_of(s.adapters["a"]), vectors_of(s.adapters["b"])
    assert set(va) == set(vb)
    want = {p: (1 + WEIGHTS[0] * (va[p].double() - 1) + WEIGHTS[1] * (vb[p].double() - 1)).float() for p in va}
    fused = merge(dict(s.adapters), WEIGHTS, "task_arithmetic")
    assert set(fused.vectors) == set(want)
    for p, vec in want.items():
        torch.testing.assert_close(fused.vectors[p], vec, rtol=0, atol=1e-6)

    peft = PeftModel.from_pretrained(s.fresh(), str(fused.save(s.root / "merged"))).eval()
    layers = ia3_layers(peft)
    assert set(layers) == set(want)  # the fused config maps back onto exactly these modules
    assert {p: bool(layer.is_feedforward) for p, layer in layers.items()} == {p: is_ff(s.feedforward, p) for p in want}
    got = s.logits(peft)
    with hooked(s.fresh(), want, s.feedforward) as by_hand:
        ref = s.logits(by_hand)
    err = rel(got, ref)
    assert err < EXACT
    assert rel(ref, s.logits(s.model)) > 100 * EXACT  # the adapters really move the output
    n_ff = sum(is_ff(s.feedforward, p) for p in want)
    record(
        model_type, "merge", "exact", f"{len(want)} modules ({n_ff} feed-forward); PEFT loads it (rel. err. {err:.0e})"
    )


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fold(setups, model_type):
    s = setup_or_unsupported(setups, model_type, "fold")
    if s is None:
        return
    peft = PeftModel.from_pretrained(s.fresh(), str(s.adapters["a"])).eval()
    ref = s.logits(peft)
    folded = ia3fuse.fold(peft, exact="require", measure_error=True)
    report = folded.ia3fuse_report
    assert report.model_type == getattr(getattr(s.model, "config", None), "model_type", "TinyConvNet")
    assert report.exact and {e.path for e in report.entries} == {"dense"}
    assert {e.module for e in report.entries} == set(vectors_of(s.adapters["a"]))  # each into its own weight
    assert report.max_error < 1e-6
    err = rel(s.logits(folded), ref)
    assert err < EXACT
    layers = sorted({e.layer.split(" ")[0] for e in report.entries})
    record(model_type, "fold", "exact", f"dense: {len(report.entries)} {'/'.join(layers)} layers (rel. err. {err:.0e})")


def _expected_paths(s: Setup, peft: Any) -> dict[str, str]:
    """Each folded module's path, from the architecture and which layers bitsandbytes quantized."""
    want: dict[str, str] = {}
    for path, layer in ia3_layers(peft).items():
        quantized = isinstance(layer.get_base_layer(), (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
        if not quantized:
            want[path] = "dense"
        elif not layer.is_feedforward:
            want[path] = "statistic"
        elif s.model_type in FF_NEIGHBOUR:
            want[f"{path.rpartition('.')[0]}.{FF_NEIGHBOUR[s.model_type]}"] = "statistic + neighbour"
        else:
            want[path] = "requantize"
    return want


@pytest.mark.parametrize("feature", ["fold_int8", "fold_nf4"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fold_bnb(setups, model_type, feature):
    if bnb is None:
        pytest.skip("bitsandbytes is not installed")
    s = setup_or_unsupported(setups, model_type, feature)
    if s is None:
        return
    if model_type == CUSTOM:
        base = no_repack(quantize_linears(s.model, feature))
    else:
        from transformers import BitsAndBytesConfig

        base = no_repack(s.from_pretrained(quantization_config=BitsAndBytesConfig(**QUANT[feature])))
    peft = PeftModel.from_pretrained(base, str(s.adapters["a"])).eval()
    ref = s.logits(peft)
    want = _expected_paths(s, peft)
    layers = ia3_layers(peft)
    lossy = {
        p: (bnb_weight(layers[p].get_base_layer()), layers[p].ia3_l["default"].detach().float().reshape(-1))
        for p, path in want.items()
        if path == "requantize"
    }
    folded = ia3fuse.fold(peft, exact="allow_requant")
    report = folded.ia3fuse_report
    assert {e.module: e.path for e in report.entries} == want
    err = rel(s.logits(folded), ref)
    if model_type in NOT_QUANTIZED:
        assert set(want.values()) == {"dense"} and report.exact and err < EXACT
        record(
            model_type,
            feature,
            "unsupported",
            f"dense: {names(want)} (rel. err. {err:.0e})",
            NOT_QUANTIZED[model_type].format(version=tf.__version__),
        )
        return
    assert "statistic" in want.values()  # some target really is quantized
    by_path: dict[str, list[str]] = {}
    for e in report.entries:
        by_path.setdefault(e.path, []).append(e.module)
    summary = "; ".join(f"{p}: {names(m)}" for p, m in sorted(by_path.items()))
    if report.exact:
        assert err < EXACT
        record(model_type, feature, "exact", f"{summary} (rel. err. {err:.0e})")
        return
    entries = {e.module: e for e in report.entries}
    for p, (before, l) in lossy.items():  # each requantized layer is bnb's own quantization of W diag(l)
        layer = folded.get_submodule(p)
        after, scaled = bnb_weight(layer), before * l[None, :]
        assert torch.equal(after, requantized(layer, scaled)), p
        assert entries[p].reason and entries[p].rel_error == pytest.approx(rel(after, scaled), rel=1e-3)
    assert err < REQUANT[feature]
    reasons = sorted({e.reason.strip("; ") for e in report.entries if not e.exact})
    record(model_type, feature, "fallback", f"{summary} (rel. err. {err:.0e})", " / ".join(reasons))


def bnb_weight(layer: nn.Module) -> Tensor:
    """A bitsandbytes layer's effective float32 weight, decoded with bitsandbytes' own functions."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        cb = layer.state.CB if layer.state.CB is not None else layer.weight.CB
        scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        return bnbF.int8_vectorwise_dequant(cb, scb).float()
    state = copy.copy(layer.weight.quant_state)
    state.dtype = torch.float32
    return bnbF.dequantize_4bit(layer.weight.data, state).float()


def requantized(layer: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` quantized by bitsandbytes in ``layer``'s format, then decoded."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        cb, scb, _ = bnbF.int8_vectorwise_quant(weight.half())
        return bnbF.int8_vectorwise_dequant(cb, scb).float()
    qs = layer.weight.quant_state
    data, state = bnbF.quantize_4bit(
        weight,
        blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        compress_statistics=bool(layer.weight.compress_statistics),
    )
    return bnbF.dequantize_4bit(data, state).float()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_checkpoint(setups, model_type):
    s = setup_or_unsupported(setups, model_type, "checkpoint")
    if s is None:
        return
    out = s.root / "folded-ckpt"
    if model_type == CUSTOM:
        with pytest.raises(FoldError, match="has no config.json"):
            ia3fuse.fold_checkpoint(s.base_dir, s.adapters["a"], out, progress=False)
        assert not out.exists()
        record(
            model_type,
            "checkpoint",
            "unsupported",
            "FoldError: '... has no config.json'",
            "the streaming fold builds the module skeleton from a transformers config.json, which a custom "
            "torch model lacks; load the model and use ia3fuse.fold",
        )
        return
    report = ia3fuse.fold_checkpoint(s.base_dir, s.adapters["a"], out, progress=False)
    got, base = tensors_of(out), tensors_of(s.base_dir)
    assert sorted(got) == sorted(base)
    changed = {n for n in got if not torch.equal(got[n], base[n])}
    assert changed == {e.tensor for e in report.entries}  # biases are random: one left unscaled would show
    assert report.modules == len(vectors_of(s.adapters["a"]))
    # transformers may rename tensors on load (e.g. fused experts), so compare the loaded models
    in_memory = ia3fuse.fold(s.from_pretrained(), s.adapters["a"], exact="require").state_dict()
    loaded = s.cls.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert sorted(loaded) == sorted(in_memory)
    for name, tensor in in_memory.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    record(
        model_type,
        "checkpoint",
        "exact",
        f"{len(changed)} of {len(got)} tensors changed; the loaded result equals the in-memory fold bit for bit",
    )


def assert_mixture_matches_peft(s: Setup, adapters: dict[str, Path]) -> float:
    """Per-sample mixture logits vs each sample alone in PEFT with its row merged; the worst error."""
    mix = Mixture(s.fresh(), dict(adapters))
    with mix.using(ROWS):
        got = s.logits(mix.model)
    mix.close()
    worst = 0.0
    for b, row in enumerate(ROWS.tolist()):
        fused = merge(dict(adapters), row, "task_arithmetic").save(s.root / f"mix-{'-'.join(adapters)}-{b}")
        peft = PeftModel.from_pretrained(s.fresh(), str(fused)).eval()
        err = rel(got[b : b + 1], s.logits(peft, s.sample(b)))
        assert err < EXACT, b
        worst = max(worst, err)
    assert rel(got, s.logits(s.model)) > 100 * EXACT  # the adapters really move the output
    return worst


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mixture(setups, model_type):
    s = setup_or_unsupported(setups, model_type, "mixture")
    if s is None:
        return
    worst = assert_mixture_matches_peft(s, s.adapters)
    record(model_type, "mixture", "exact", f"{len(ROWS)} samples x {ROWS.shape[1]} adapters (rel. err. {worst:.0e})")


# ---------------------------------------------------------------- tied weights

TIED = "gpt2, lm_head tied to wte"  # the table's row for this trap


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-side", "feed-forward"])
def test_fold_refuses_a_tied_weight(setups, feedforward):
    """GPT-2's lm_head shares its weight with the token embedding: folding into it would scale the
    embeddings too (a silently wrong model), so fold and fold_checkpoint refuse, naming both."""
    s = setups("gpt2")
    assert s.model.lm_head.weight is s.model.transformer.wte.weight
    ff = ["lm_head"] if feedforward else []
    peft = get_peft_model(
        s.fresh(), IA3Config(target_modules=["c_attn", "lm_head"], feedforward_modules=ff, init_ia3_weights=False)
    )
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    tied = "'lm_head' (model type 'gpt2') has its weight tied to 'transformer.wte.weight'"
    with pytest.raises(FoldError, match=re.escape(tied)):
        ia3fuse.fold(peft)
    after = peft.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    side = "feed-forward" if feedforward else "output-side"
    if not feedforward:  # one record for both sides
        record(
            TIED,
            "fold",
            "unsupported",
            f"FoldError: {tied} (output-side and feed-forward alike); the model is left unchanged",
            "folding into a weight tied to another module would change that module too (here the token embeddings)",
        )

    adapter = random_ia3_adapter(
        s.model,
        s.root / f"tied-{side}",
        seed=21,
        spread=SPREAD,
        target_modules=["c_attn", "lm_head"],
        feedforward_modules=ff,
    )
    with pytest.raises(FoldError, match=re.escape(tied)):  # a plain model and the adapter's directory
        ia3fuse.fold(s.fresh(), adapter)
    with pytest.raises(FoldError, match=re.escape(tied)):  # the same planner, the same words
        ia3fuse.fold_checkpoint(s.base_dir, adapter, s.root / "tied-out", progress=False)
    assert not (s.root / "tied-out").exists()
    if not feedforward:
        record(
            TIED,
            "checkpoint",
            "unsupported",
            f"FoldError: {tied}",
            "folding into a weight tied to another module would change that module too (here the token embeddings)",
        )


def test_tied_weight_adapters_merge_and_mix_exactly(setups):
    """What cannot be folded still runs exactly unmerged: merge (PEFT loads it) and mixtures."""
    s = setups("gpt2")
    kw = dict(target_modules=["c_attn", "lm_head"], feedforward_modules=[], spread=SPREAD)
    adapters = {
        n: random_ia3_adapter(s.model, s.root / f"tied-{n}", seed=seed, **kw) for n, seed in (("t", 31), ("u", 32))
    }
    fused = merge(dict(adapters), WEIGHTS, "task_arithmetic")
    peft = PeftModel.from_pretrained(s.fresh(), str(fused.save(s.root / "tied-merged"))).eval()
    with hooked(s.fresh(), {p: v for p, v in fused.vectors.items()}, []) as by_hand:
        err = rel(s.logits(peft), s.logits(by_hand))
    assert err < EXACT
    record(TIED, "merge", "exact", f"PEFT loads the fused adapter (rel. err. {err:.0e})")
    worst = assert_mixture_matches_peft(s, adapters)
    record(TIED, "mixture", "exact", f"{len(ROWS)} samples x 2 adapters (rel. err. {worst:.0e})")


# ---------------------------------------------------------------- beyond the matrix


def test_every_peft_model_type_has_a_recipe():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    assert sorted(ARCHITECTURES) == sorted(TARGETS)


def test_unknown_model_type_names_the_choices():
    with pytest.raises(UnsupportedModelTypeError, match=r"no tiny recipe for model type 'mamba'; choose one of t5, "):
        tiny_arch_model("mamba")
    with pytest.raises(
        UnsupportedModelTypeError, match=r"PEFT has no default IA3 target modules for model type 'mamba'"
    ):
        peft_ia3_defaults("mamba")
