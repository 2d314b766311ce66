"""Test support: GGUF files from tiny transformers models, converted the way llama.cpp's
convert_hf_to_gguf.py does (tensor names from the gguf package's TensorNameMap, q/k rows permuted
for Llama, fused qkv regrouped for BLOOM/GPT-NeoX/Falcon, GPT-2's Conv1D transposed), and files of
random quant blocks for the layout tests of types the gguf package cannot quantize."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

gguf = __import__("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from ia3fuse.folding import gguf_blocks  # noqa: E402

GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    "bloom": "bloom",
    "gpt_neox": "gptneox",
    "falcon": "falcon",
    "gemma": "gemma",
    "qwen3": "qwen3",
    "t5": "t5",
}


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute (n_head already the kv count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qkv_heads(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _qkv_falcon(w: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    g = w.reshape(n_kv, n_head // n_kv + 2, -1, *w.shape[1:])
    return torch.cat(
        [g[:, :-2].reshape(-1, *w.shape[1:]), g[:, -2].reshape(-1, *w.shape[1:]), g[:, -1].reshape(-1, *w.shape[1:])]
    ).reshape(w.shape)


def _hparams(config: Any) -> dict[str, Any]:
    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            v = getattr(config, n, None)
            if v is not None:
                return v
        return default

    heads = get("num_attention_heads", "n_head", "num_heads")
    if config.model_type == "falcon":  # convert_hf_to_gguf's FalconModel: the config's kv count, else 1
        kv = get("num_kv_heads", "n_head_kv", default=1)
    else:
        kv = get("num_key_value_heads", default=heads)
    return {
        "hidden": get("hidden_size", "n_embd", "d_model"),
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "heads": heads,
        "kv": kv,
        "ffn": get("intermediate_size", "ffn_hidden_size", "n_inner", default=0) or 0,
        "ctx": get("max_position_embeddings", "n_positions", default=64),
        "eps": get("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5),
        "head_dim": get("head_dim", default=None),
    }


def convert(
    model: Any,
    path: Path,
    *,
    model_type: str,
    qtype: int = Q.F32,
    permute: Optional[bool] = None,
    vocab: bool = False,
    choose: Optional[Callable[[str, tuple[int, ...]], int]] = None,
) -> Path:
    """Write ``model`` (a tiny HF causal LM) as a GGUF file, 2-D weights in ``qtype`` where their rows fit.

    Args:
        permute: override the q/k permutation (None: as llama.cpp's converter, yes for Llama).
        vocab: add a minimal SentencePiece vocabulary, so llama.cpp can load the file.
        choose: per-tensor type override ``(gguf name, numpy shape) -> type``.
    """
    arch = GGUF_ARCH[model_type]
    hp = _hparams(model.config)
    permute = (arch == "llama") if permute is None else permute
    tmap = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], hp["layers"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hp["layers"])
    w.add_context_length(hp["ctx"])
    w.add_embedding_length(hp["hidden"])
    w.add_feed_forward_length(hp["ffn"] or 4 * hp["hidden"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv"])
    if arch in ("llama", "qwen2", "qwen3", "gemma"):
        w.add_layer_norm_rms_eps(float(hp["eps"]))
        w.add_rope_dimension_count(hp["head_dim"] or hp["hidden"] // hp["heads"])
        rope = getattr(model.config, "rope_theta", None) or (getattr(model.config, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0
        )
        w.add_rope_freq_base(float(rope))
    else:
        w.add_layer_norm_eps(float(hp["eps"]))
    w.add_string("ia3fuse.test.note", "metadata that must survive a fold")
    if vocab:
        n = model.config.vocab_size
        toks = ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(3, n)]
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores([0.0] * n)
        w.add_token_types([2, 3, 3] + [1] * (n - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        found = tmap.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            continue
        kind, new = found
        data = tensor.detach().float()
        T = gguf.MODEL_TENSOR
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T.contiguous()
        if permute and kind == T.ATTN_Q:
            data = llama_permute(data, hp["heads"])
        if permute and kind == T.ATTN_K:
            data = llama_permute(data, hp["kv"])
        if kind == T.ATTN_QKV and arch in ("bloom", "gptneox"):
            data = _qkv_heads(data, hp["heads"])
        if kind == T.ATTN_QKV and arch == "falcon":
            data = _qkv_falcon(data, hp["heads"], hp["kv"])
        arr = data.numpy().astype(np.float32)
        t = qtype if arr.ndim == 2 else Q.F32
        if choose is not None:
            t = choose(new, arr.shape)
        if t != Q.F32 and arr.shape[-1] % GGML_QUANT_SIZES[t][0]:
            t = Q.F32
        if t == Q.F32:
            w.add_tensor(new, arr)
        else:
            w.add_tensor(new, gguf.quants.quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def random_blocks(
    qtype: int, rows: int, ne0: int, rng: np.random.Generator, *, scale: tuple[float, float] = (1e-3, 1e-2)
) -> np.ndarray:
    """Random quant blocks of ``qtype`` with finite fp16 scales in ``scale`` (a random-weight tensor).

    Returns:
        uint8 bytes ``(rows, ne0 / block * type size)``; float types give their raw bytes too.
    """
    if qtype == Q.F32:
        return rng.standard_normal((rows, ne0)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, ne0)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return gguf_blocks._to_bf16(rng.standard_normal((rows, ne0)).astype(np.float32)).view(np.uint8)
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = ne0 // bs
    raw = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    d = rng.uniform(*scale, size=(rows, nb)).astype(np.float16)
    if qtype == Q.IQ1_M:
        bits = d.view(np.uint16)
        sc = raw[:, :, 48:56].copy().view(np.uint16)
        for i in range(4):
            sc[..., i] = (sc[..., i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        raw[:, :, 48:56] = sc.view(np.uint8).reshape(rows, nb, 8)
    elif qtype in gguf_blocks._fields():
        for off in gguf_blocks._fields()[qtype]:
            raw[:, :, off : off + 2] = d.reshape(rows, nb, 1).view(np.uint8)
    elif qtype == Q.MXFP4:
        raw[:, :, 0] = rng.integers(118, 124, size=(rows, nb))  # E8M0 exponents near 2^-6
    elif qtype == Q.NVFP4:
        raw[:, :, 0:4] = rng.integers(0x20, 0x38, size=(rows, nb, 4))
    return raw.reshape(rows, nb * ts)


def write_raw(
    path: Path,
    arch: str,
    tensors: dict[str, tuple[int, np.ndarray, tuple[int, ...]]],
    *,
    heads: int = 4,
    kv: int = 2,
    blocks: int = 1,
) -> Path:
    """A GGUF file of raw tensors: name -> (type, bytes, numpy shape of the float tensor)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(blocks)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_string("ia3fuse.test.note", "metadata that must survive a fold")
    for name, (qtype, raw, shape) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, raw.view(np.float32).reshape(shape))
        elif qtype == Q.F16:
            w.add_tensor(name, raw.view(np.float16).reshape(shape))
        else:
            byte_shape = (*shape[:-1], raw.size // int(np.prod(shape[:-1])))
            w.add_tensor(name, raw.reshape(byte_shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def read(path: Path) -> dict[str, tuple[int, np.ndarray, tuple[int, ...]]]:
    """name -> (type, raw bytes as (rows, bytes per row), ne)."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        ne = tuple(int(x) for x in t.shape)
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        out[t.name] = (
            int(t.tensor_type),
            np.array(r.data[t.data_offset : t.data_offset + t.n_bytes]).reshape(rows, -1),
            ne,
        )
    return out


def dequant(entry: tuple[int, np.ndarray, tuple[int, ...]]) -> np.ndarray:
    return gguf_blocks.dequantize(entry[1], entry[0])
