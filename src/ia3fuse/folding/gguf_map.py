"""Which GGUF tensor takes which IA3 scale: PEFT module paths -> llama.cpp tensor names and row order.

Plumbing only (names, architectures, row permutations); the byte math is `gguf_blocks`.

* Names: the gguf package's own ``TensorNameMap`` (the table llama.cpp's converter uses), so
  ``model.layers.3.self_attn.k_proj`` is ``blk.3.attn_k.weight``; a leading prefix such as
  ``bert.`` is dropped when the longer path is unknown, and Mixtral-style expert modules
  (``...experts.5.w2``) select expert 5 of the 3-D ``ffn_*_exps`` tensor.
* Row order: llama.cpp's HF converter permutes the rows of q and k for Llama-family models
  (``LlamaModel.permute``: per head, the two rotary halves are interleaved), regroups BLOOM's and
  GPT-NeoX's fused ``query_key_value`` from per-head ``[q k v]`` to ``[q; k; v]``, and Falcon's
  from per-kv-group ``[q.. k v]`` to ``[q; k; v]``. The file does not record this, so it is decided
  by architecture; ``permute_qk`` overrides it for q/k.
* Input-side (feed-forward) scales: ``down(act(gate x) * up x)`` equals scaling ``ffn_up``'s rows
  (and bias), exactly; Phi-3 keeps ``[gate; up]`` fused in ``ffn_up`` (the up half is rows n..2n);
  T5's ungated ReLU MLP takes it on ``ffn_up``'s rows when every l > 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .._text import summarize
from ..errors import FoldError
from .misfit import refusal
from .plan import place_input, relu_blocked

__all__ = ["GGUFTensor", "Arch", "Job", "plan_gguf", "PERMUTED_QK", "UNPERMUTED_QK"]

# general.architecture values whose HF converter applies LlamaModel.permute to q/k (convert_hf_to_gguf)
PERMUTED_QK = frozenset(
    {
        "llama",
        "arcee",
        "smollm3",
        "nanbeige",
        "granite",
        "deci",
        "deepseek",
        "internlm2",
        "minicpm",
        "olmo",
        "arctic",
        "chameleon",
        "llada",
        "bailingmoe",
        "cogvlm",
        "afmoe",
    }
)
# ... and those whose converter keeps HF's q/k row order (NeoX-style rotary, or no rotary at all)
UNPERMUTED_QK = frozenset(
    {
        "llama4",
        "apertus",
        "qwen2",
        "qwen2moe",
        "qwen3",
        "qwen3moe",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3n",
        "phi2",
        "phi3",
        "gptj",
        "gptneox",
        "falcon",
        "stablelm",
        "starcoder",
        "starcoder2",
        "bert",
        "nomic-bert",
        "t5",
        "t5encoder",
        "gpt2",
        "bloom",
        "mpt",
        "olmo2",
        "exaone",
    }
)
_QKV_HEADS = frozenset({"bloom", "gptneox"})  # per head [q k v] -> [q; k; v]
_QKV_KEPT = frozenset({"gpt2", "starcoder", "phi3", "mpt", "qwen", "jais", "codeshell", "refact", "phi2"})
_FUSED_GATE_UP = frozenset({"phi3"})  # ffn_up holds [gate; up]
# an ungated MLP that llama.cpp runs with ReLU: T5 v1.0 (its gated variants have ffn_gate)
_RELU_MLP = frozenset({"t5", "t5encoder"})
_QK_PERMUTED = "rows (q/k permuted as llama.cpp's converter does)"


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the input file, as its header describes it."""

    name: str
    qtype: int
    ne: tuple[int, ...]  # ggml order: ne[0] = row length (input features)
    offset: int  # absolute byte offset of its data
    nbytes: int

    @property
    def rows(self) -> int:
        n = 1
        for d in self.ne[1:]:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.qtype).name


@dataclass(frozen=True)
class Arch:
    """What the file's metadata says about the architecture."""

    name: str
    blocks: int
    heads: Optional[Any]  # int, or one per layer
    kv_heads: Optional[Any]

    def per_layer(self, value: Any, layer: int) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return int(value[layer]) if layer < len(value) else None
        return int(value)


@dataclass
class Job:
    """Everything that happens to one tensor."""

    tensor: GGUFTensor
    rows: Optional[np.ndarray] = None
    cols: Optional[np.ndarray] = None
    sources: list[str] = field(default_factory=list)
    how: list[str] = field(default_factory=list)
    lossy: Optional[str] = None

    def add_rows(self, scale: np.ndarray, source: str, how: str) -> None:
        self.rows = scale if self.rows is None else self.rows * scale
        self.sources.append(source)
        self.how.append(how)

    def add_cols(self, scale: np.ndarray, source: str, how: str) -> None:
        self.cols = scale if self.cols is None else self.cols * scale
        self.sources.append(source)
        self.how.append(how)

    def describe(self) -> str:
        return ", ".join(f"{h} for {s}" for s, h in zip(self.sources, self.how))


# --- pure row permutations (the converter's, applied to a vector of per-row scales) -------------


def llama_permute(l: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` on a per-row vector: per head, interleave the two rotary halves."""
    return l.reshape(n_head, 2, -1).swapaxes(1, 2).reshape(-1)


def qkv_by_heads(l: np.ndarray, n_head: int) -> np.ndarray:
    """BLOOM / GPT-NeoX: rows ``(head, [q k v], dim)`` -> ``([q k v], head, dim)``."""
    return l.reshape(n_head, 3, -1).swapaxes(0, 1).reshape(-1)


def qkv_falcon(l: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """Falcon: rows ``(kv group, [q.. k v], dim)`` -> all q, then all k, then all v."""
    g = l.reshape(n_kv, n_head // n_kv + 2, -1)
    return np.concatenate([g[:, :-2].reshape(-1), g[:, -2].reshape(-1), g[:, -1].reshape(-1)])


# --- names --------------------------------------------------------------------------------------


def _name_map(arch: Arch) -> Any:
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch.name not in by_name:
        raise FoldError(
            f"the GGUF file's architecture {arch.name!r} is unknown to the installed gguf package "
            f"({getattr(gguf, '__version__', '?')}); upgrade it (pip install -U gguf)"
        )
    return gguf.get_tensor_name_map(by_name[arch.name], arch.blocks)


def _gguf_name(path: str, tmap: Any) -> Optional[tuple[str, Any, Optional[int]]]:
    """(tensor name without suffix, MODEL_TENSOR kind, expert index) of a PEFT module path."""
    expert = None
    m = re.fullmatch(r"(.*\.experts)\.(\d+)\.([A-Za-z_0-9]+)", path)
    if m:
        path, expert = f"{m[1]}.{m[3]}", int(m[2])
    parts = path.split(".")
    for i in range(len(parts)):
        found = tmap.get_type_and_name(".".join(parts[i:]) + ".weight", try_suffixes=(".weight",))
        if found is not None:
            kind, name = found
            return name[: -len(".weight")], kind, expert
    return None


def _layer(name: str) -> Optional[int]:
    m = re.search(r"blk\.(\d+)\.", name)
    return int(m[1]) if m else None


# --- plan ---------------------------------------------------------------------------------------


def plan_gguf(
    vectors: dict[str, np.ndarray],
    feedforward: dict[str, bool],
    tensors: dict[str, GGUFTensor],
    arch: Arch,
    *,
    permute_qk: Optional[bool],
    exact_types: frozenset[int],
    float_types: frozenset[int],
    requantizable: Any,
    trained_on: Optional[str] = None,
) -> tuple[list[Job], bool]:
    """GGUF tensor -> its scales, for every IA3 vector; every problem reported at once.

    Args:
        trained_on: the adapter's ``base_model_name_or_path``, named when its modules do not fit.

    Returns:
        The jobs (weights and their biases) and whether q/k rows were permuted.

    Raises:
        FoldError: a module without a tensor in the file, a length mismatch, a fused layout or
            permutation that is unknown for this architecture.
    """
    tmap = _name_map(arch)
    jobs: dict[str, Job] = {}
    problems: list[str] = []
    misfits: list[str] = []  # modules that do not fit the file: an adapter of another base
    permuted = False

    def job(name: str) -> Job:
        if name not in jobs:
            jobs[name] = Job(tensors[name])
        return jobs[name]

    def qk_permuted() -> Optional[bool]:
        if permute_qk is not None:
            return permute_qk
        if arch.name in PERMUTED_QK:
            return True
        if arch.name in UNPERMUTED_QK:
            return False
        return None

    for path, vec in vectors.items():
        l = np.asarray(vec, dtype=np.float32).reshape(-1)
        found = _gguf_name(path, tmap)
        if found is None or f"{found[0]}.weight" not in tensors:
            why = (
                "no llama.cpp tensor name"
                if found is None
                else f"maps to {found[0] + '.weight'!r}, which the file lacks"
            )
            misfits.append(f"{path!r} ({why})")
            continue
        base, kind, expert = found
        t = tensors[f"{base}.weight"]
        n_exp = t.ne[2] if len(t.ne) > 2 else None
        if (expert is None) != (n_exp is None) or (expert is not None and n_exp is not None and expert >= n_exp):
            misfits.append(
                f"{path!r} (maps to {t.name!r} of shape {list(t.ne)}, which "
                f"{'holds no experts' if n_exp is None else f'has {n_exp} experts'})"
            )
            continue
        layer = _layer(base)
        if not feedforward[path]:
            out_rows = t.ne[1] if len(t.ne) > 1 else 1
            if l.size != out_rows:
                misfits.append(f"{path!r} ({t.name!r} has {out_rows} output rows, the adapter's vector {l.size})")
                continue
            try:
                l, how = _row_order(l, kind, t, arch, layer or 0, qk_permuted(), path)
            except FoldError as exc:
                problems.append(str(exc))
                continue
            permuted = permuted or how == _QK_PERMUTED
            scale = np.ones(t.rows, dtype=np.float32)
            if expert is None:
                scale[:] = l
            else:
                assert n_exp is not None  # an expert's tensor holds experts (refused above otherwise)
                scale.reshape(n_exp, -1)[expert] = l
                how += f" of expert {expert}"
            job(t.name).add_rows(scale, path, how)
            if f"{base}.bias" in tensors:
                job(f"{base}.bias").add_rows(scale.reshape(-1), path, "bias")
            continue
        # input side
        if l.size != t.ne[0]:
            misfits.append(f"{path!r} ({t.name!r} has {t.ne[0]} input features, the adapter's vector {l.size})")
            continue
        cols_reason = None if t.qtype in float_types and expert is None else f"{t.type_name} blocks span input columns"
        up, why = (None, "") if cols_reason is None else _neighbour(base, kind, tensors, arch, l)
        if up is None:
            nbr_reason: Optional[str] = why
        elif up[0].qtype in exact_types or up[0].qtype in float_types:
            nbr_reason = None
        else:
            nbr_reason = f"the neighbour {up[0].name!r} is {up[0].type_name}"
        place, lossy = place_input(cols_reason, nbr_reason)
        if place == "neighbour":
            assert up is not None  # place_input chose the neighbour found
            ut, sl = up
            scale = np.ones(ut.rows, dtype=np.float32)
            per = scale.reshape(ut.ne[2], -1) if expert is not None else scale.reshape(1, -1)
            per[expert or 0, sl] = l
            job(ut.name).add_rows(
                scale, path, f"neighbour ({why})" + (f" of expert {expert}" if expert is not None else "")
            )
            bias = ut.name[: -len(".weight")] + ".bias"
            if bias in tensors:
                job(bias).add_rows(scale, path, f"bias of the neighbour ({why})")
            continue
        if lossy is not None and expert is not None:
            problems.append(f"{path!r}: the input-side scale of one expert has no exact path in {t.name!r} ({why})")
            continue
        j = job(t.name)
        j.add_cols(l, path, "cols")
        j.lossy = lossy
    message = refusal(
        "this GGUF file",
        misfits=misfits,
        problems=problems,
        modules=len(vectors),
        where=f"the file (GGUF architecture {arch.name!r})",
        trained_on=trained_on,
    )
    if message:
        raise FoldError(message)
    for j in jobs.values():
        if j.lossy is None and j.rows is not None and j.tensor.qtype not in exact_types | float_types:
            j.lossy = f"{j.tensor.type_name} has no exact row scale (its block scales are not fp16)"
        if j.lossy is not None and not requantizable(j.tensor.qtype):
            problems.append(
                f"{j.tensor.name!r} ({j.tensor.type_name}) cannot be folded exactly ({j.lossy}), and the gguf package "
                f"cannot quantize {j.tensor.type_name} again"
            )
    if problems:
        raise FoldError(
            f"cannot fold the adapter into this GGUF file: {summarize(problems)}; fold the Hugging Face checkpoint "
            "instead (ia3fuse fold --base) and convert that, or keep the adapter unmerged"
        )
    return list(jobs.values()), permuted


def _row_order(
    l: np.ndarray, kind: Any, t: GGUFTensor, arch: Arch, layer: int, permute: Optional[bool], path: str
) -> tuple[np.ndarray, str]:
    """``l`` in the file's row order (the converter's permutation or regrouping), and how."""
    import gguf

    T = gguf.MODEL_TENSOR
    if kind in (T.ATTN_Q, T.ATTN_K):
        if permute is None:
            raise FoldError(
                f"llama.cpp's converter may or may not permute q/k rows for architecture {arch.name!r} "
                f"({path!r} -> {t.name!r}); pass permute_qk=True or False (--permute-qk yes/no)"
            )
        if not permute:
            return l, "rows"
        heads = arch.per_layer(arch.heads if kind == T.ATTN_Q else (arch.kv_heads or arch.heads), layer)
        if not heads or l.size % (2 * heads):
            raise FoldError(
                f"cannot permute {t.name!r} like llama.cpp's converter: head count {heads!r} does not "
                f"divide its {l.size} rows in pairs; the file's metadata does not match the tensor"
            )
        return llama_permute(l, heads), _QK_PERMUTED
    if kind != T.ATTN_QKV or arch.name in _QKV_KEPT:
        return l, "rows"
    heads = arch.per_layer(arch.heads, layer)
    kv = arch.per_layer(arch.kv_heads, layer) or 1
    if arch.name not in _QKV_HEADS and arch.name != "falcon":
        raise FoldError(
            f"the row order of the fused {t.name!r} in architecture {arch.name!r} is unknown to ia3fuse ({path!r}); "
            "fold the Hugging Face checkpoint instead (ia3fuse fold --base) and convert it"
        )
    try:
        if heads is None:  # no head count in the metadata: refused as a count that does not fit
            raise ValueError(heads)
        regrouped = qkv_by_heads(l, heads) if arch.name in _QKV_HEADS else qkv_falcon(l, heads, kv)
    except (TypeError, ValueError, ZeroDivisionError):
        raise FoldError(
            f"cannot regroup the fused {t.name!r} like llama.cpp's converter: head counts {heads!r}/{kv!r} do not "
            f"fit its {l.size} rows; the file's metadata does not match the tensor"
        ) from None
    return regrouped, "rows (fused qkv regrouped as llama.cpp's converter does)"


def _neighbour(
    base: str, kind: Any, tensors: dict[str, GGUFTensor], arch: Arch, l: np.ndarray
) -> tuple[Optional[tuple[GGUFTensor, slice]], str]:
    """The ``ffn_up`` tensor whose rows feed ``base`` (a down projection), with the row slice."""
    n = l.size
    import gguf

    T = gguf.MODEL_TENSOR
    downs = {T.FFN_DOWN, T.FFN_DOWN_EXP, T.ENC_FFN_DOWN, T.DEC_FFN_DOWN}
    if kind not in downs or "ffn_down" not in base:
        return None, "no exact rewrite for this tensor's input (it is not a feed-forward down projection)"
    up = tensors.get(base.replace("ffn_down", "ffn_up") + ".weight")
    gate = tensors.get(base.replace("ffn_down", "ffn_gate") + ".weight")
    if up is not None and gate is not None:
        return (up, slice(0, n)), "gated MLP: ffn_up rows"
    if up is not None and arch.name in _FUSED_GATE_UP and up.ne[1] == 2 * n:
        return (up, slice(n, 2 * n)), "gated MLP: up half of the fused ffn_up rows"
    if up is not None and arch.name in _RELU_MLP:
        blocked = relu_blocked(l)
        if blocked is not None:
            return None, blocked
        return (up, slice(0, n)), "ReLU MLP: ffn_up rows"
    return None, "no exact rewrite for this input (the MLP has no gate and is not ReLU)"
