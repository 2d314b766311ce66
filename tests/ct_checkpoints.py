"""Tiny compressed-tensors checkpoints (the llm-compressor / vLLM native format), built on CPU.

Each checkpoint is a randomly initialised tiny causal LM (hidden 64, intermediate 128, 2 layers,
vocab 128) whose ``Linear`` layers are quantized and compressed with the real ``compressed_tensors``
library: ``QuantizationScheme``/``QuantizationArgs`` -> ``apply_quantization_config`` -> min-max
(round-to-nearest) calibration through the library's ``calculate_qparams`` -> ``ModelCompressor``
compress, ``save_pretrained`` and ``update_config``. ``lm_head`` and the embeddings stay dense.
compressed_tensors has no observers of its own (those live in llm-compressor), so the min/max
reduction per strategy is done here and everything after it (scales, zero points, rounding,
packing, serialisation) is the library's.

Schemes (``SCHEMES``):

- ``w4a16_group``: INT4 symmetric, group 32 -> ``pack-quantized`` (``weight_packed`` int32).
- ``w4a16_asym``: INT4 asymmetric, group 32 -> ``pack-quantized`` with a packed ``weight_zero_point``.
- ``w8a16_channel``: INT8 symmetric, per output channel, weight only -> ``pack-quantized`` (4 per int32).
- ``w8a8_int_dynamic``: INT8 channel weights, dynamic per-token INT8 inputs -> ``int-quantized``.
- ``w8a8_int_static``: INT8 channel weights, static per-tensor INT8 inputs (``input_scale``) -> ``int-quantized``.
- ``fp8_channel``: FP8 E4M3 channel weights, dynamic per-token FP8 inputs -> ``float-quantized``
  (llm-compressor's ``FP8_DYNAMIC``).
- ``fp8_tensor``: FP8 per-tensor weights, static per-tensor FP8 inputs (``input_scale``) -> ``float-quantized``
  (llm-compressor's ``FP8``).
- ``fp8_block``: FP8 weights in 32x32 blocks, dynamic FP8 input groups of 32 -> ``float-quantized``
  (``FP8_BLOCK`` with the block shrunk from 128x128 to fit the tiny widths).

Example:
    >>> from ct_checkpoints import build_ct_checkpoint, dequantized_weights, load_ct  # doctest: +SKIP
    >>> path = build_ct_checkpoint(tmp_path / "w4", "w4a16_group", arch="llama")  # doctest: +SKIP
    >>> model = load_ct(path)  # dense float32 weights  # doctest: +SKIP
    >>> dequantized_weights(path)["model.layers.0.mlp.down_proj"].shape  # doctest: +SKIP
    torch.Size([64, 128])
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

__all__ = [
    "ARCHS",
    "SCHEMES",
    "STATIC_INPUT_SCHEMES",
    "GROUP_SIZE",
    "BLOCK",
    "build_ct_checkpoint",
    "load_ct",
    "dequantized_weights",
    "quantization_scheme",
    "tiny_ct_config",
]

SCHEMES = (
    "w4a16_group",
    "w4a16_asym",
    "w8a16_channel",
    "w8a8_int_dynamic",
    "w8a8_int_static",
    "fp8_channel",
    "fp8_tensor",
    "fp8_block",
)
# the schemes whose input activations are static: their checkpoints hold a calibrated ``input_scale``
STATIC_INPUT_SCHEMES = ("w8a8_int_static", "fp8_tensor")
ARCHS = ("llama", "qwen2", "opt")
GROUP_SIZE = 32
BLOCK = (32, 32)

_SIZES = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 64}


def tiny_ct_config(arch: str) -> Any:
    """The tiny transformers config of ``arch`` (``"llama"``, ``"qwen2"`` or ``"opt"``)."""
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(
            **_SIZES, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            **_SIZES, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
        )
    if arch == "opt":
        # ReLU MLP fc1 (64 -> 128) / fc2 (128 -> 64); lm_head is tied to the embeddings
        return transformers.OPTConfig(
            **_SIZES,
            ffn_dim=128,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            activation_function="relu",
            dropout=0.0,
            attention_dropout=0.0,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def quantization_scheme(scheme: str, group_size: int = GROUP_SIZE) -> Any:
    """The ``compressed_tensors`` ``QuantizationScheme`` (targets ``Linear``) of one of `SCHEMES`."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def args(**kw: Any) -> QuantizationArgs:
        return QuantizationArgs(**kw)

    int4_group = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group_size, "dynamic": False}
    int8_channel = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False}
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    table = {
        "w4a16_group": (args(**int4_group, symmetric=True), None),
        "w4a16_asym": (args(**int4_group, symmetric=False), None),
        "w8a16_channel": (args(**int8_channel), None),
        "w8a8_int_dynamic": (
            args(**int8_channel),
            args(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True),
        ),
        "w8a8_int_static": (
            args(**int8_channel),
            args(num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False),
        ),
        "fp8_channel": (args(**fp8, strategy="channel", dynamic=False), args(**fp8, strategy="token", dynamic=True)),
        "fp8_tensor": (args(**fp8, strategy="tensor", dynamic=False), args(**fp8, strategy="tensor", dynamic=False)),
        "fp8_block": (
            args(**fp8, strategy="block", block_structure=list(BLOCK), dynamic=False),
            args(**fp8, strategy="group", group_size=BLOCK[1], dynamic=True),
        ),
    }
    if scheme not in table:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    weights, inputs = table[scheme]
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)


def _minmax(value: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a weight (out, in) over each quantization unit of ``args``' strategy.

    Shapes match what ``initialize_qparams`` registered: tensor (1,), channel (out, 1),
    group (out, in / group), block (ceil(out / bh), ceil(in / bw)) (zero padding, as the library pads).
    """
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    strategy = args.strategy
    if strategy == "tensor":
        return value.amin().reshape(1), value.amax().reshape(1)
    if strategy == "channel":
        return value.amin(dim=-1, keepdim=True), value.amax(dim=-1, keepdim=True)
    if strategy == "group":
        grouped = value.unflatten(-1, (value.shape[-1] // args.group_size, args.group_size))
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    if strategy == "block":
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(value, (bh, bw))
        blocks = padded.unflatten(0, (padded.shape[0] // bh, bh)).unflatten(-1, (padded.shape[-1] // bw, bw))
        return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    raise ValueError(f"no min-max calibration for strategy {strategy!r}")


def _set_qparams(module: torch.nn.Module, base: str, min_val: torch.Tensor, max_val: torch.Tensor, args: Any) -> None:
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(min_val, max_val, args)
    getattr(module, f"{base}_scale").data.copy_(scale.reshape(getattr(module, f"{base}_scale").shape))
    zp_param = getattr(module, f"{base}_zero_point", None)
    if zp_param is not None:
        zp_param.data.copy_(zero_point.reshape(zp_param.shape).to(zp_param.dtype))


def _quantized_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from compressed_tensors.quantization.utils import is_module_quantized

    for name, module in model.named_modules():
        if is_module_quantized(module):
            yield name, module


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the library's progress bars (tqdm writes to stderr) and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def build_ct_checkpoint(
    out_dir: Path, scheme: str, arch: str = "llama", seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> Path:
    """Build and save a tiny compressed-tensors checkpoint; returns ``out_dir``.

    Args:
        out_dir: the folder to write (config.json with ``quantization_config``, model.safetensors).
        scheme: one of `SCHEMES`.
        arch: ``"llama"``, ``"qwen2"`` or ``"opt"``.
        seed: the torch seed of the random initialisation and of the calibration batches.
        dtype: the dtype of the dense model, hence of every scale (llm-compressor's real checkpoints
            are bfloat16).
    """
    import transformers

    config = tiny_ct_config(arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return quantize_ct(model, scheme, out_dir, seed=seed)


def quantize_ct(model: Any, scheme: str, out_dir: Path, *, seed: int = 0, group_size: int = GROUP_SIZE) -> Path:
    """Quantize ``model`` (changed in place) with one of `SCHEMES` and save it compressed to ``out_dir``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    config = model.config
    qscheme = quantization_scheme(scheme, group_size)
    qconfig = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"])
    with _quiet():
        apply_quantization_config(model, qconfig)
    modules = list(_quantized_modules(model))

    # weights: round-to-nearest with min-max scales (llm-compressor's default "minmax" observer)
    for _, module in modules:
        args = module.quantization_scheme.weights
        _set_qparams(module, "weight", *_minmax(module.weight.data.float(), args), args)

    # static input activations: min-max over a few random batches, with quantization off meanwhile
    static_inputs = [(n, m) for n, m in modules if m.quantization_scheme.input_activations is not None]
    static_inputs = [(n, m) for n, m in static_inputs if not m.quantization_scheme.input_activations.dynamic]
    if static_inputs:
        seen: dict[str, list[torch.Tensor]] = {}

        def observe(name: str) -> Any:
            def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].detach().float()
                lo, hi = seen.setdefault(name, [x.amin(), x.amax()])
                seen[name] = [torch.minimum(lo, x.amin()), torch.maximum(hi, x.amax())]

            return hook

        handles = [m.register_forward_pre_hook(observe(n)) for n, m in static_inputs]
        for _, module in modules:
            module.quantization_enabled = False
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=torch.randint(0, config.vocab_size, (2, 16), generator=generator))
        for handle in handles:
            handle.remove()
        for name, module in static_inputs:
            lo, hi = seen[name]
            _set_qparams(module, "input", lo.reshape(1), hi.reshape(1), module.quantization_scheme.input_activations)
        for _, module in modules:
            module.quantization_enabled = True

    for _, module in modules:
        module.quantization_status = QuantizationStatus.FROZEN

    out_dir = Path(out_dir)
    with _quiet():
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
        model.save_pretrained(out_dir)
        compressor.update_config(str(out_dir))
    return out_dir


def load_ct(path: Path) -> torch.nn.Module:
    """Load a compressed-tensors checkpoint with transformers on CPU, dequantized to dense float32 weights.

    transformers 5.x spells this ``CompressedTensorsConfig(dequantize=True)`` (``run_compressed=False``
    is its deprecated alias): the library's compressor decompresses every weight while it loads, and
    the model's ``Linear`` layers are plain ``torch.nn.Linear`` (no quantization hooks, no qparams).
    """
    import transformers

    with _quiet():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path),
            quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
            dtype=torch.float32,
            device_map="cpu",
        )
    return model.eval()


def dequantized_weights(path: Path) -> dict[str, torch.Tensor]:
    """Module name -> dense float32 weight (out, in) of every quantized module of the checkpoint.

    Decompressed by the library itself, model-free, from model.safetensors and config.json
    (``compressed_tensors``' ``CompressedTensorsDequantizer``, its checkpoint-conversion entry point).
    """
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / "model.safetensors"))
    quantized = sorted({name.rpartition(".")[0] for name in tensors if name.endswith(".weight_scale")})
    # only the quantized modules' tensors: model-free, the dequantizer cannot tell a Linear from an
    # Embedding, and for the unpacked formats (whose root tensor is ``weight``) it would take
    # ``embed_tokens.weight`` for a quantized weight and fail on its missing ``weight_scale``
    ours = {name: t for name, t in tensors.items() if name.rpartition(".")[0] in quantized}
    with _quiet():
        dense = CompressedTensorsDequantizer(str(path), dtype=torch.float32).process(ours)
    return {name: dense[f"{name}.weight"] for name in quantized}
