"""Dynamic IA3 mixtures (`ia3fuse.mixture`) against PEFT, sample by sample.

Reference: for each sample ``b`` with mixture row ``w_b``, the adapters merged offline with that
row (`ia3fuse.merge`), saved, loaded by ``PeftModel.from_pretrained`` on a fresh copy of the base
and run on that sample alone (no other sample in its batch, no padding). One mixed batch must
give, for every sample, what that sample's own merged adapter gives in PEFT.

Models are tiny (built from configs, no downloads). The tiny Llama and GPT-2 use
``initializer_range=0.1`` so that their layers, and so the adapters, move the logits by much more
than the tolerances (bf16's included) and change greedy generations (at the default 0.02 the
residual stream is all embedding and the adapters change no generated token).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import Tensor

from ia3fuse import (
    IA3Adapter,
    IA3FuseError,
    IncompatibleAdaptersError,
    InvalidParameterError,
    InvalidWeightsError,
    MethodInputError,
    OutputPathError,
    load_adapter,
    merge,
)
from ia3fuse._runtime import torch_threads
from factories import random_ia3_adapter, tiny_model
from ia3fuse.mixture import Mixture, Router, train_router

ARCHS = ("llama", "gpt2", "t5", "bert")
NAMES = ("a", "b", "c")
ATTENTION = {"llama": ["k_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["k", "v"], "bert": ["key", "value"]}
# Per sample: one-hot (b only), a negative weight, a sum of 2.3, a convex mix.
ROWS = torch.tensor([[0.0, 1.0, 0.0], [0.7, -0.4, 0.5], [0.9, 0.8, 0.6], [0.2, 0.3, 0.5]])
B, T, K = 4, 6, 3
# fp32. Run alone, a sample's mixture output equals PEFT's bit for bit here; in a batch of 4 the
# base's matmuls round differently (observed up to 1.1e-6 on T5's logits of ~4).
EXACT = {"rtol": 0, "atol": 1e-5}
GEN = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
SIZES = {"llama": {"initializer_range": 0.1}, "gpt2": {"initializer_range": 0.1}}

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# ---------------------------------------------------------------- fixtures and helpers


@dataclass
class Setup:
    """A tiny base model (never wrapped or hooked: tests take copies), adapters a, b, c and a batch."""

    arch: str
    model: Any
    paths: dict[str, Path]  # a, b: PEFT's default targets; c: attention modules only
    inputs: dict[str, Tensor]  # B samples of T tokens
    root: Path
    cache: dict[Any, Any] = field(default_factory=dict)

    def fresh(self) -> Any:
        return copy.deepcopy(self.model)

    def sample(self, b: int, inputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {k: v[b : b + 1] for k, v in (inputs or self.inputs).items()}

    def mixture(self, model: Any = None, **kwargs: Any) -> Mixture:
        return Mixture(self.fresh() if model is None else model, dict(self.paths), **kwargs)

    def merged_peft(
        self,
        rows: Tensor,
        method: str = "task_arithmetic",
        dtype: torch.dtype | None = None,
        base: Callable[[], Any] | None = None,
        **params: Any,
    ) -> PeftModel:
        """One PeftModel holding, as adapters m0, m1, ..., the adapters merged with each row."""
        key = ("peft", tuple(map(tuple, rows.tolist())), method, dtype, base, tuple(sorted(params.items())))
        if key not in self.cache:
            dirs = []
            for row in rows.tolist():
                fused = merge(dict(self.paths), row, method, **params)
                dirs.append(fused.save(self.root / f"merged-{len(list(self.root.iterdir()))}"))
            model = base() if base is not None else self.fresh()
            if dtype is not None:
                model = model.to(dtype)
            peft = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="m0")
            for i, d in enumerate(dirs[1:], 1):
                peft.load_adapter(str(d), adapter_name=f"m{i}")
            self.cache[key] = peft.eval()
        return self.cache[key]

    def reference(self, rows: Tensor, inputs: dict[str, Tensor] | None = None, **kwargs: Any) -> Tensor:
        """Sample b run alone through PEFT with the adapters merged with ``rows[b]``, stacked."""
        peft = self.merged_peft(rows, **kwargs)
        outs = []
        for b in range(len(rows)):
            peft.set_adapter(f"m{b}")
            outs.append(run(peft, self.sample(b, inputs)))
        return torch.cat(outs)


def output(out: Any) -> Tensor:
    """Logits, or BERT's last hidden state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def run(model: Any, inputs: dict[str, Tensor], **kwargs: Any) -> Tensor:
    with torch.no_grad():
        return output(model(**inputs, **kwargs))


def peft_with(setup: Setup) -> PeftModel:
    """A PeftModel with a, b, c loaded by name; a is active."""
    peft = PeftModel.from_pretrained(setup.fresh(), str(setup.paths["a"]), adapter_name="a")
    for name in NAMES[1:]:
        peft.load_adapter(str(setup.paths[name]), adapter_name=name)
    return peft.eval()


def raises_exactly(exc: type[BaseException], message: str) -> Any:
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def _build(arch: str, root: Path, seed: int = 0, spread: float = 0.2, **sizes: Any) -> Setup:
    model = tiny_model(arch, seed=seed, **{**SIZES.get(arch, {}), **sizes})
    paths = {
        "a": random_ia3_adapter(model, root / "a", seed=1, spread=spread),
        "b": random_ia3_adapter(model, root / "b", seed=2, spread=spread),
        "c": random_ia3_adapter(
            model, root / "c", seed=3, spread=spread, target_modules=ATTENTION[arch], feedforward_modules=[]
        ),
    }
    gen = torch.Generator().manual_seed(7)
    inputs = {"input_ids": torch.randint(3, 128, (B, T), generator=gen)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 128, (B, T), generator=gen)
    (root / "work").mkdir()
    return Setup(arch, model, paths, inputs, root / "work")


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Setup]:
    built: dict[str, Setup] = {}

    def get(arch: str) -> Setup:
        if arch not in built:
            built[arch] = _build(arch, tmp_path_factory.mktemp(f"mixture-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="module")
def llama(build: Callable[[str], Setup]) -> Setup:
    return build("llama")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # tiny models gain nothing from torch's thread pool and lose 10x when another process holds a core
    with torch_threads(1):
        yield


def assert_rows_matter(setup: Setup, want: Tensor, inputs: dict[str, Tensor] | None = None) -> None:
    """Sanity: every sample's reference is far from the base output (so a wrong row would fail)."""
    base = run(setup.model, inputs or setup.inputs)
    assert ((want - base).flatten(1).abs().amax(1) > 1e-3).all()


# ---------------------------------------------------------------- 1-3: per sample, one-hot, per batch


@pytest.mark.parametrize("arch", ARCHS)
def test_per_sample_rows_equal_each_sample_merged_and_run_alone_in_peft(build, arch):
    setup = build(arch)
    partial, full = load_adapter(setup.paths["c"]), load_adapter(setup.paths["a"])
    assert set(partial.vectors) < set(full.vectors)  # c lacks the feed-forward modules: identity fill
    mix = setup.mixture()

    got = run(mix, setup.inputs, mixture_weights=ROWS)

    want = setup.reference(ROWS)
    torch.testing.assert_close(got, want, **EXACT)
    assert_rows_matter(setup, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_hot_rows_equal_that_single_adapter_in_peft(build, arch):
    setup = build(arch)
    picks = [2, 0, 1, 2]  # sample 0 -> c, 1 -> a, 2 -> b, 3 -> c
    rows = torch.eye(K)[picks]
    mix = setup.mixture()

    got = run(mix, setup.inputs, mixture_weights=rows)

    peft = peft_with(setup)
    for b, k in enumerate(picks):
        peft.set_adapter(NAMES[k])
        want = run(peft, setup.sample(b))
        torch.testing.assert_close(got[b : b + 1], want, **EXACT)
        assert_rows_matter(setup, want, setup.sample(b))


@pytest.mark.parametrize("arch", ARCHS)
def test_per_batch_weights_equal_repeated_rows_and_mapping_equals_list(build, arch):
    setup = build(arch)
    row = [0.6, -0.3, 0.9]
    mix = setup.mixture()

    per_batch = run(mix, setup.inputs, mixture_weights=row)
    per_sample = run(mix, setup.inputs, mixture_weights=torch.tensor(row).repeat(B, 1))

    # (K,) @ (K, N) and (B, K) @ (K, N) may round an IA3 value differently by an ulp
    torch.testing.assert_close(
        mix.scales(row).expand(B, -1), mix.scales(torch.tensor(row).repeat(B, 1)), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(per_batch, per_sample, **EXACT)
    torch.testing.assert_close(per_batch, setup.reference(torch.tensor(row).repeat(B, 1)), **EXACT)
    # a mapping is the list in the mixture's order; a missing name weighs 0
    mapped = run(mix, setup.inputs, mixture_weights={"c": 0.9, "a": 0.6})
    listed = run(mix, setup.inputs, mixture_weights=[0.6, 0.0, 0.9])
    assert torch.equal(mapped, listed)
    assert not torch.allclose(mapped, per_batch, rtol=0, atol=1e-3)  # b's -0.3 really counted above


# ---------------------------------------------------------------- 4: per token


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_token_weights(build, arch):
    setup = build(arch)
    mix = setup.mixture()
    per_sample = run(mix, setup.inputs, mixture_weights=ROWS)

    same_row = ROWS[:, None, :].expand(B, T, K).contiguous()
    assert torch.equal(run(mix, setup.inputs, mixture_weights=same_row), per_sample)

    # From token s on each sample switches to another row. A causal model's outputs before s
    # saw only the first row; from s on they differ.
    s = 3
    switched = same_row.clone()
    switched[:, s:] = ROWS.roll(1, 0)[:, None, :]
    got = run(mix, setup.inputs, mixture_weights=switched)
    torch.testing.assert_close(got[:, :s], per_sample[:, :s], rtol=0, atol=1e-6)
    assert ((got[:, s:] - per_sample[:, s:]).flatten(1).abs().amax(1) > 1e-3).all()


def test_per_token_weights_refuse_generate(llama):
    mix = llama.mixture()
    ids = llama.inputs["input_ids"]
    tokens = ROWS[:, None, :].expand(B, T, K)
    with raises_exactly(
        InvalidWeightsError,
        "per-token weights (B, T, K) cannot drive generate(): each step sees one new token; pass (K,) or (B, K)",
    ):
        mix.generate(input_ids=ids, mixture_weights=tokens, **GEN)
    # set by `using`, the hooks refuse the first one-token step
    with (
        mix.using(tokens),
        raises_exactly(
            IA3FuseError,
            "per-token weights cover 6 tokens but module 'model.layers.0.self_attn.k_proj' ran on an activation of "
            "shape (4, 1, 16); pass per-token weights only to a forward over exactly those tokens (not to generate(), "
            "whose steps see one token; use per-sample weights there)",
        ),
    ):
        mix.model.generate(input_ids=ids, **GEN)


# ---------------------------------------------------------------- 5: generate


def _left_padded(ids: Tensor, lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    padded, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        padded[b, ids.shape[1] - n :] = ids[b, :n]
        mask[b, ids.shape[1] - n :] = 1
    return padded, mask


def _strip_right_pad(seq: Tensor) -> Tensor:
    """A sequence returned alone among ``num_return_sequences`` is right-padded with 0 to the longest."""
    n = seq.numel()
    while n and seq[n - 1] == 0:
        n -= 1
    return seq[:n]


def _assert_same_continuation(got: Tensor, want: Tensor, skip: int) -> None:
    """``got`` (a batch row, ``skip`` left pads) continues like ``want`` (run alone); a sample
    that stopped early alone is padded with 0 in the batch."""
    got = got[skip:]
    n = want.numel()
    assert torch.equal(got[:n], want), (got.tolist(), want.tolist())
    assert (got[n:] == 0).all()


@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "left-padded"])
@pytest.mark.parametrize(
    "options",
    [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}],
    ids=["greedy", "beams3", "beams2-return2"],
)
def test_generate_per_sample_equals_peft_generate_alone(llama, options, padded):
    ids = llama.inputs["input_ids"]
    lengths = [6, 3, 5, 2] if padded else [T] * B
    batch_ids, mask = _left_padded(ids, lengths)
    mix = llama.mixture()
    kwargs = {**GEN, **options}

    got = mix.generate(input_ids=batch_ids, attention_mask=mask, mixture_weights=ROWS, **kwargs)
    with torch.no_grad(), mix.using(ROWS):
        via_using = mix.model.generate(input_ids=batch_ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, via_using)

    r = options.get("num_return_sequences", 1)
    assert got.shape[0] == B * r
    peft = llama.merged_peft(ROWS)
    for b, n in enumerate(lengths):
        peft.set_adapter(f"m{b}")
        alone = ids[b : b + 1, :n]
        with torch.no_grad():
            want = peft.generate(input_ids=alone, attention_mask=torch.ones_like(alone), **kwargs)
        for j in range(r):
            _assert_same_continuation(got[b * r + j], _strip_right_pad(want[j]), T - n)
    # sanity: the base model continues differently, so a mixture that did nothing would fail
    base = llama.model.generate(input_ids=batch_ids, attention_mask=mask, **kwargs)
    assert (base[:, T:] != got[:, T:]).any(1).sum() >= B * r // 2


# ---------------------------------------------------------------- 6-7: dtypes and quantized bases


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_half_precision_bases_match_peft_per_sample(build, arch, dtype):
    setup = build(arch)
    mix = setup.mixture(setup.fresh().to(dtype))

    got = run(mix, setup.inputs, mixture_weights=ROWS)

    want = setup.reference(ROWS, dtype=dtype)
    assert got.dtype == want.dtype == dtype
    peft = setup.merged_peft(ROWS, dtype=dtype)
    vectors = [p for n, p in peft.named_parameters() if "ia3_l" in n]
    assert vectors and all(p.dtype == torch.float32 for p in vectors)  # PEFT keeps the vectors in fp32
    # Both compute (activation * fp32 vector) in fp32 and cast back, from vectors equal up to an
    # fp32 ulp, which the cast to fp16/bf16 almost always rounds away (observed: bit-identical).
    # Allow one unit in the last place of the largest output.
    scale = want.float().abs().max().item()
    tol = torch.finfo(dtype).eps * scale
    err = (got.float() - want.float()).abs().max().item()
    print(f"{arch} {dtype}: max |mixture - PEFT| = {err:.3g}, tolerance {tol:.3g}")
    assert err <= tol
    base = run(setup.fresh().to(dtype), setup.inputs).float()
    print("  rows move the output by", (want.float() - base).flatten(1).abs().amax(1).tolist())
    assert ((want.float() - base).flatten(1).abs().amax(1) > 4 * tol).all()


@pytest.fixture(scope="module")
def bnb_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Setup, Path]:
    """A tiny Llama whose shapes bitsandbytes' CPU kernels take (as in test_fold_bnb.py), saved."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("mixture-bnb")
    setup = _build("llama", root, hidden_size=64, intermediate_size=128, head_dim=16)
    setup.model.save_pretrained(str(root / "base"))
    return setup, root / "base"


def _load_quantized(path: Path, bits: int) -> Any:
    import transformers as tf

    if bits == 4:
        cfg = tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        cfg = tf.BitsAndBytesConfig(load_in_8bit=True)
    return tf.LlamaForCausalLM.from_pretrained(str(path), quantization_config=cfg, device_map="cpu").eval()


@pytest.mark.parametrize("bits", [4, 8], ids=["nf4", "int8"])
def test_quantized_bases_match_peft_per_sample(bnb_llama, bits):
    import bitsandbytes as bnb

    setup, base_dir = bnb_llama
    model = _load_quantized(base_dir, bits)
    layer = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].self_attn.k_proj, layer)
    mix = setup.mixture(model)

    got = run(mix, setup.inputs, mixture_weights=ROWS)

    want = setup.reference(ROWS, base=lambda: _load_quantized(base_dir, bits))
    # The same bnb kernels on the same quantized weights, fp32 compute, the same vectors up to an
    # fp32 ulp: observed bit-identical; allow fp32 rounding (1e-6 of the largest logit).
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{bits}-bit: max |mixture - PEFT| = {err:.3g} (max |logit| {scale:.3g})")
    assert err <= 1e-6 * scale
    base = run(_load_quantized(base_dir, bits), setup.inputs)
    assert ((want - base).flatten(1).abs().amax(1) > 1e-2).all()  # the rows matter on this base


# ---------------------------------------------------------------- 8-9: geometric form, export


@pytest.mark.parametrize("arch", ARCHS)
def test_geometric_form_equals_geometric_merge_per_sample(build, arch):
    setup = build(arch)
    mix = setup.mixture(form="geometric")

    got = run(mix, setup.inputs, mixture_weights=ROWS)

    want = setup.reference(ROWS, method="geometric")
    torch.testing.assert_close(got, want, **EXACT)
    assert not torch.allclose(want, setup.reference(ROWS), rtol=0, atol=1e-3)  # not the delta form


@pytest.mark.parametrize("value, shown", [(-0.5, "-0.5"), (0.0, "0")])
def test_geometric_form_refuses_non_positive_vectors(llama, value, shown):
    a = load_adapter(llama.paths["a"], name="a")
    vectors = {k: v.clone() for k, v in a.vectors.items()}
    first = next(iter(vectors))
    vectors[first].view(-1)[3] = value
    bad = IA3Adapter(vectors, dict(a.feedforward), dict(a.config), name="bad")
    with raises_exactly(
        MethodInputError,
        f"the geometric form takes log(l), so every IA3 value must be > 0, but the adapters hold {shown}; use form='delta'",
    ):
        Mixture(llama.fresh(), [bad, llama.paths["b"]], form="geometric")
    Mixture(llama.fresh(), [bad, llama.paths["b"]], form="delta").close()  # the delta form takes them


def test_lam_scales_the_delta_form(llama):
    mix = llama.mixture(lam=0.7)
    got = run(mix, llama.inputs, mixture_weights=ROWS)
    torch.testing.assert_close(got, llama.reference(ROWS, lam=0.7), **EXACT)
    assert not torch.allclose(got, llama.reference(ROWS), rtol=0, atol=1e-3)


def _assert_same_adapter(got: IA3Adapter, want: IA3Adapter) -> None:
    assert list(got.vectors) == list(want.vectors)
    assert got.feedforward == want.feedforward
    for path, vec in want.vectors.items():
        assert got.vectors[path].dtype == vec.dtype and got.vectors[path].shape == vec.shape, path
        assert torch.equal(got.vectors[path], vec), path


DELTA = ("delta", "task_arithmetic", {"lam": 0.7})
GEOMETRIC = ("geometric", "geometric", {})


@pytest.mark.parametrize(
    "form, method, params, weights",
    [
        (*DELTA, [0.5, -0.25, 0.75]),
        (*GEOMETRIC, [0.5, -0.25, 0.75]),  # exact in float32
        (*DELTA, [0.7, -0.4, 0.5]),
        pytest.param(*GEOMETRIC, [0.7, -0.4, 0.5]),
    ],
    ids=["delta", "geometric", "delta-inexact", "geometric-inexact"],
)
def test_export_equals_merge_bit_for_bit(llama, form, method, params, weights):
    mix = llama.mixture(form=form, **params)

    exported = mix.export(weights, name="fixed")

    assert exported.name == "fixed"
    _assert_same_adapter(exported, merge(dict(llama.paths), weights, method, **params))
    _assert_same_adapter(mix.export(dict(zip(NAMES, weights))), exported)
    with raises_exactly(
        InvalidWeightsError,
        "export takes one mixture (K,), not weights of shape (4, 3); export each sample's row separately",
    ):
        mix.export(ROWS)


def test_export_records_the_weights_given(llama):
    assert llama.mixture().export([0.7, -0.4, 0.5]).recipe.weights == [0.7, -0.4, 0.5]


# ---------------------------------------------------------------- 10-11: from_peft, close


@pytest.mark.parametrize("arch", ARCHS)
def test_from_peft_mixes_the_loaded_adapters_and_close_restores_peft(build, arch):
    setup = build(arch)
    peft = peft_with(setup)
    before = run(peft, setup.inputs)  # adapter a active
    base = run(setup.model, setup.inputs)
    assert not torch.allclose(before, base, rtol=0, atol=1e-3)

    mix = Mixture.from_peft(peft)

    assert mix.names == list(NAMES)
    assert torch.equal(run(peft, setup.inputs), base)  # PEFT's layers are off, no weights set
    got = run(mix, setup.inputs, mixture_weights=ROWS)
    torch.testing.assert_close(got, setup.reference(ROWS), **EXACT)
    assert torch.equal(got, run(setup.mixture(), setup.inputs, mixture_weights=ROWS))
    with mix.using(torch.eye(K)[[0, 0, 0, 0]]):  # all a: as PEFT with a alone, not a applied twice
        torch.testing.assert_close(run(peft, setup.inputs), before, **EXACT)

    mix.close()

    assert peft.active_adapters == ["a"]
    assert torch.equal(run(peft, setup.inputs), before)


def test_from_peft_takes_a_subset_by_name(llama):
    peft = peft_with(llama)
    mix = Mixture.from_peft(peft, ["c", "a"])
    assert mix.names == ["c", "a"]
    got = run(mix, llama.inputs, mixture_weights=[[0.0, 1.0]] * B)
    mix.close()
    torch.testing.assert_close(got, run(peft, llama.inputs), **EXACT)  # a is active again


def _hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_close_removes_every_hook(build, arch):
    setup = build(arch)
    model = setup.fresh()
    before = run(model, setup.inputs)
    hooks_before = _hook_count(model)

    with Mixture(model, dict(setup.paths)) as mix:
        assert _hook_count(model) == hooks_before + len(mix.segments)
        assert not torch.equal(run(mix, setup.inputs, mixture_weights=ROWS), before)

    assert _hook_count(model) == hooks_before
    assert torch.equal(run(model, setup.inputs), before)
    with mix.using(ROWS):  # no hook is left to apply them
        assert torch.equal(run(model, setup.inputs), before)


# ---------------------------------------------------------------- 12: router


TASKS = {"A": (3, 40), "B": (60, 100)}


@pytest.fixture(scope="module")
def router_task(tmp_path_factory):
    """Task A's sequences use tokens [3, 40), task B's [60, 100); labels: the greedy next token of
    base + a (task A) or base + b (task B), shifted for the causal LM loss.

    The Llama uses initializer_range=0.3: its logits spread enough that adapter a's labels cost
    clearly less under a than under b (1.8 vs 2.8 nats), so the router gets a clear signal.
    """
    setup = _build("llama", tmp_path_factory.mktemp("mixture-router"), initializer_range=0.3)
    teacher = peft_with(setup)
    gen = torch.Generator().manual_seed(11)

    def batch(tasks: str, t: int = 16) -> dict[str, Tensor]:
        ids, labels = [], []
        for task in tasks:
            lo, hi = TASKS[task]
            x = torch.randint(lo, hi, (1, t), generator=gen)
            teacher.set_adapter("a" if task == "A" else "b")
            with torch.no_grad():
                pred = teacher(input_ids=x).logits.argmax(-1)
            y = torch.full_like(x, -100)
            y[:, 1:] = pred[:, :-1]
            ids.append(x)
            labels.append(y)
        ids_t = torch.cat(ids)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": torch.cat(labels)}

    train = [batch("ABBABAAB") for _ in range(16)]  # both tasks in every batch: routing is per sample
    held = {task: batch(task * 8) for task in TASKS}
    return {"setup": setup, "train": train, "held": held, "paths": {"a": setup.paths["a"], "b": setup.paths["b"]}}


def test_router_learns_which_adapter_each_task_needs(router_task):
    setup = router_task["setup"]
    mix = Mixture(setup.fresh(), router_task["paths"])
    # layer 0 (the embeddings): a linear gate on them tells the tasks apart on 99.8% of held-out
    # sequences; the last layer's states mix in context and separate 93%
    router = mix.add_router(layer=0)
    assert [n for n, _ in mix.named_parameters()] == [f"router.{n}" for n, _ in router.named_parameters()]

    losses = train_router(mix, router_task["train"], epochs=6, lr=0.2)

    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(p.requires_grad for p in mix.model.parameters())  # the base's flags are restored
    assert not mix.router.training
    for task, right in (("A", 0), ("B", 1)):
        batch = router_task["held"][task]
        with torch.no_grad():
            routed = mix(**batch).loss.item()
            uniform = mix(**batch, mixture_weights=[0.5, 0.5]).loss.item()
            weights = mix.route(batch["input_ids"], batch["attention_mask"])[:, right]
        print(f"task {task}: routed loss {routed:.4f}, uniform {uniform:.4f}, weights {weights.tolist()}")
        assert routed < uniform - 0.1
        assert weights.mean() > 0.8 and (weights > 0.5).all(), weights


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batches: Sequence[dict[str, Tensor]]):
        self.items = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.items[i]


def _train_with_trainer(task: dict[str, Any], out: Path, **extra: Any) -> tuple[Mixture, Any, dict]:
    from transformers import Trainer, TrainingArguments

    mix = Mixture(task["setup"].fresh(), task["paths"])
    mix.add_router()
    start = {k: v.clone() for k, v in mix.router.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        **extra,
    )
    trainer = Trainer(model=mix, args=args, train_dataset=_Rows(task["train"]))
    trainer.train()
    return mix, trainer, start


def test_router_trains_with_transformers_trainer(router_task, tmp_path):
    base_state = {k: v.clone() for k, v in router_task["setup"].model.state_dict().items()}
    mix, trainer, start = _train_with_trainer(router_task, tmp_path / "out", remove_unused_columns=False)

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in mix.router.parameters()}  # only the router is trained
    assert {n for n, p in mix.named_parameters() if p.requires_grad} == {
        f"router.{n}" for n, _ in mix.router.named_parameters()
    }
    end = mix.router.state_dict()
    assert all(not torch.equal(end[k], start[k]) for k in start)
    frozen = mix.model.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in base_state.items())


def test_router_trains_with_trainer_default_arguments(router_task, tmp_path):
    mix, _, start = _train_with_trainer(router_task, tmp_path / "out")
    assert all(not torch.equal(mix.router.state_dict()[k], start[k]) for k in start)


def _randomize(router: Router, seed: int = 0) -> Router:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return router


def test_router_drives_forward_cached_steps_and_generate(llama):
    ids, mask = llama.inputs["input_ids"], torch.ones_like(llama.inputs["input_ids"])
    mix = llama.mixture()
    _randomize(mix.add_router())
    weights = mix.route(ids, mask)
    assert weights.shape == (B, K) and (weights.max(-1).values > 0.5).all()

    assert torch.equal(
        run(mix, {"input_ids": ids, "attention_mask": mask}),
        run(mix, {"input_ids": ids, "attention_mask": mask}, mixture_weights=weights),
    )
    # a cached decoding step reuses the prompt's weights (routing the one new token would differ)
    with torch.no_grad():
        first = mix(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = mix(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=first.past_key_values).logits
    prompt_weights = mix.route(ids[:, :-1], mask[:, :-1])
    want = run(mix, {"input_ids": ids, "attention_mask": mask}, mixture_weights=prompt_weights)[:, -1:]
    torch.testing.assert_close(step, want, **EXACT)
    assert not torch.allclose(mix.route(ids[:, -1:], mask[:, -1:]), prompt_weights, atol=1e-3)

    routed = mix.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(routed, mix.generate(input_ids=ids, attention_mask=mask, mixture_weights=weights, **GEN))
    assert mix.hooks.scales is None


def test_token_level_router(llama):
    ids, mask = llama.inputs["input_ids"], torch.ones_like(llama.inputs["input_ids"])
    mix = llama.mixture()
    _randomize(mix.add_router(level="token"))
    weights = mix.route(ids, mask)
    assert weights.shape == (B, T, K)
    assert torch.equal(
        run(mix, {"input_ids": ids, "attention_mask": mask}),
        run(mix, {"input_ids": ids, "attention_mask": mask}, mixture_weights=weights),
    )
    with raises_exactly(
        IA3FuseError,
        "a token-level router cannot drive generate(): each step sees one new token; use a sequence-level router "
        "(Router(level='sequence')) for generation",
    ):
        mix.generate(input_ids=ids, attention_mask=mask, **GEN)


def test_router_on_a_seq2seq_model(build):
    setup = build("t5")
    mix = setup.mixture()
    router = _randomize(mix.add_router())
    with torch.no_grad():
        encoded = setup.model.get_encoder()(input_ids=setup.inputs["input_ids"], output_hidden_states=True)
        weights = router(encoded.hidden_states[-1])
    torch.testing.assert_close(run(mix, setup.inputs), run(mix, setup.inputs, mixture_weights=weights), **EXACT)


# ---------------------------------------------------------------- 13: save / load


def test_save_and_load_give_identical_outputs(llama, tmp_path):
    ids, mask = llama.inputs["input_ids"], torch.ones_like(llama.inputs["input_ids"])
    mix = llama.mixture(lam=0.8)
    router = _randomize(mix.add_router(hidden=8, temperature=0.5))
    routed = mix.route(ids, mask)
    assert (routed.max(-1).values - routed.min(-1).values > 0.1).all()  # not uniform

    out = mix.save(tmp_path / "mix")

    assert out == (tmp_path / "mix").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "mixture.json", "router.safetensors"]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["0", "1", "2"]
    loaded = Mixture.load(out, llama.fresh())
    assert loaded.names == list(NAMES) and loaded.form == "delta" and loaded.lam == 0.8
    assert loaded.router is not None and loaded.router.config == router.config
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids, attention_mask=mask).logits, mix(input_ids=ids, attention_mask=mask).logits
        )
        assert torch.equal(loaded.route(ids, mask), routed)
    assert torch.equal(run(loaded, llama.inputs, mixture_weights=ROWS), run(mix, llama.inputs, mixture_weights=ROWS))

    geometric = llama.mixture(form="geometric")
    loaded_geometric = Mixture.load(geometric.save(tmp_path / "geo"), llama.fresh())
    assert not (tmp_path / "geo" / "router.safetensors").exists() and loaded_geometric.router is None
    assert torch.equal(
        run(loaded_geometric, llama.inputs, mixture_weights=ROWS), run(geometric, llama.inputs, mixture_weights=ROWS)
    )


def test_save_and_load_refuse_bad_paths(llama, tmp_path):
    mix = llama.mixture()
    path = tmp_path / "mix"
    mix.save(path)
    with raises_exactly(
        OutputPathError,
        f"output {str(path)!r} already exists; pass another path, or overwrite=True (--force on the command line)",
    ):
        mix.save(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with raises_exactly(
        IA3FuseError,
        f"{str(empty)!r} is not a saved mixture (mixture.json: [Errno 2] No such file or directory: "
        f"{str(empty / 'mixture.json')!r}); pass a folder written by Mixture.save",
    ):
        Mixture.load(empty, llama.fresh())


# ---------------------------------------------------------------- 14: bad input


SHAPE_FIX = "for 3 adapters (a, b, c); pass shape (3,) for the batch, (B, 3) per sample or (B, T, 3) per token"


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5, 0.5], f"mixture weights have shape (2,) {SHAPE_FIX}"),
        (torch.ones(4, 2), f"mixture weights have shape (4, 2) {SHAPE_FIX}"),
        (torch.ones(1, 1, 1, 3), f"mixture weights have shape (1, 1, 1, 3) {SHAPE_FIX}"),
        (torch.tensor(0.5), f"mixture weights have shape () {SHAPE_FIX}"),
        ([0.5, float("nan"), 0.5], "mixture weights hold NaN or Inf; pass finite numbers"),
        ([[0.5, 0.1, float("inf")]] * 4, "mixture weights hold NaN or Inf; pass finite numbers"),
        ({"a": 1.0, "z": 0.5, "y": 0.1}, "mixture weights name no adapter 'z', 'y'; the adapters are 'a', 'b', 'c'"),
    ],
    ids=["wrong-K", "wrong-K-per-sample", "rank-4", "scalar", "nan", "inf", "unknown-name"],
)
def test_bad_weights_are_refused(llama, weights, message):
    mix = llama.mixture()
    with raises_exactly(InvalidWeightsError, message):
        mix(**llama.inputs, mixture_weights=weights)
    with raises_exactly(InvalidWeightsError, message):
        mix.generate(input_ids=llama.inputs["input_ids"], mixture_weights=weights, **GEN)
    with raises_exactly(InvalidWeightsError, message), mix.using(weights):
        pass
    assert mix.hooks.scales is None  # nothing was left set


@pytest.mark.parametrize("weights", [torch.ones(2), torch.tensor([0.5, float("nan"), 0.5])], ids=["wrong-K", "nan"])
def test_bad_weights_with_grad_are_refused(llama, weights):
    mix = llama.mixture()
    with pytest.raises(InvalidWeightsError):
        mix(**llama.inputs, mixture_weights=weights.clone().requires_grad_(True))


def test_bad_construction_and_calls_are_refused(llama, tmp_path):
    with raises_exactly(InvalidParameterError, "form='x' is not a mixture form; pass one of delta, geometric"):
        llama.mixture(form="x")
    with raises_exactly(InvalidParameterError, "lam=nan; pass a finite number"):
        llama.mixture(lam=float("nan"))
    peft = peft_with(llama)
    with raises_exactly(
        IA3FuseError,
        "the model is a PeftModel; build the mixture with Mixture.from_peft(peft_model) or pass the base model",
    ):
        Mixture(peft, dict(llama.paths))

    mix = llama.mixture()
    with raises_exactly(
        IA3FuseError,
        "the mixture weights hold 3 rows but the model ran a batch of 4; pass one row of weights per sample",
    ):
        mix(**llama.inputs, mixture_weights=ROWS[:3])
    with raises_exactly(
        IA3FuseError,
        "no mixture weights: pass mixture_weights=..., use `with mixture.using(...)`, or add a router",
    ):
        mix(**llama.inputs)
    with raises_exactly(
        IA3FuseError, "the mixture has no router; pass mixture_weights=..., or set mixture.router = Router(...)"
    ):
        mix.generate(input_ids=llama.inputs["input_ids"], **GEN)
    with raises_exactly(
        InvalidParameterError,
        "the router maps to 2 adapters but the mixture has 3; build Router(hidden_size, num_adapters=len(mixture.adapters))",
    ):
        Mixture(llama.fresh(), dict(llama.paths), router=Router(32, 2))
    with raises_exactly(IA3FuseError, "the mixture has no router; call mixture.add_router() first"):
        train_router(mix, [dict(llama.inputs)])


def test_adapters_of_another_base_are_refused(llama):
    other = tiny_model("llama", seed=0, hidden_size=48, head_dim=12)
    problems = "; ".join(
        f"module 'model.layers.{i}.self_attn.{m}' has 24 output features but the adapters' vectors have 16"
        for i in range(2)
        for m in ("k_proj", "v_proj")
    )
    with raises_exactly(
        IncompatibleAdaptersError,
        f"the adapters do not fit the model (LlamaForCausalLM, model type 'llama'): {problems}; pass the base model the adapters were trained on",
    ):
        Mixture(other, dict(llama.paths))
    assert _hook_count(other) == 0  # nothing was hooked


# ---------------------------------------------------------------- 15: gradients


def test_mixture_is_differentiable_in_its_weights(llama):
    mix = llama.mixture()
    ids = llama.inputs["input_ids"]
    labels = ids.roll(-1, 1)

    def loss(w: Tensor) -> Tensor:
        return mix(input_ids=ids, labels=labels, mixture_weights=w).loss

    w = ROWS.clone().requires_grad_(True)
    loss(w).backward()

    assert w.grad is not None and w.grad.shape == ROWS.shape and torch.isfinite(w.grad).all()
    assert (w.grad.abs() > 1e-6).all()
    # central differences agree with the gradient
    eps = 1e-2
    for b, k in [(0, 0), (1, 1), (3, 2)]:
        step = torch.zeros_like(ROWS)
        step[b, k] = eps
        with torch.no_grad():
            numeric = (loss(ROWS + step) - loss(ROWS - step)).item() / (2 * eps)
        assert math.isclose(w.grad[b, k].item(), numeric, rel_tol=2e-2, abs_tol=1e-5), (b, k, numeric)


# ---------------------------------------------------------------- method forms (ia3fuse.forms)

FORMED = [
    ("linear", {}),
    ("task_arithmetic", {"lam": 0.8}),
    ("geometric", {}),
    ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.7, "seed": 1}),
    ("magnitude_prune", {"density": 0.4}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.1}),
    ("svd", {"svd_rank": 2}),
]


@pytest.mark.parametrize("method, params", FORMED, ids=[m for m, _ in FORMED])
def test_every_method_with_a_form_mixes_as_merge_fuses(llama, method, params):
    """Mixtures take their math from the registry's forms: per sample, the scales equal the merged
    vectors of that sample's weights (sign-elected methods: at uniform weights, where the mixture
    fixes its election)."""
    mix = llama.mixture(method=method, params=params)
    rows = (
        torch.tensor([[1 / 3] * 3] * 2) if method.endswith("ties") else torch.tensor([[0.5, -0.25, 0.75], [1.0, 0, 0]])
    )
    flat = mix.scales(rows)
    for b, row in enumerate(rows.tolist()):
        fused = merge(dict(llama.paths), row, method, **params)
        want = torch.cat([fused.vectors[s.path].reshape(-1).float() for s in mix.segments])
        torch.testing.assert_close(flat[b], want, rtol=2e-6, atol=2e-6)
    if not method.endswith("ties"):  # export is merge with the mixture's method
        _assert_same_adapter(mix.export(rows[0].tolist()), merge(dict(llama.paths), rows[0].tolist(), method, **params))
    mix.close()


def test_method_and_form_options_are_checked(llama):
    with raises_exactly(
        InvalidParameterError,
        "method='ties' takes its parameters (lam included) in params=...; pass "
        "either method (and params) or form and lam",
    ):
        llama.mixture(method="ties", lam=0.5)
    with raises_exactly(InvalidParameterError, "params apply to a method; pass method=... with them"):
        llama.mixture(params={"density": 0.5})


def test_a_registered_method_with_a_form_is_mixable_saved_and_searchable(llama, tmp_path):
    from ia3fuse.fusion.registry import _REGISTRY, register

    @register("half_tau", summary="task arithmetic at half strength (a test method)", paper="-", form="delta")
    def half_tau(vectors: Tensor, weights: Tensor) -> Tensor:
        taus = vectors.reshape(vectors.shape[0], -1) - 1
        return (1 + 0.5 * (taus * weights.to(taus.dtype).unsqueeze(1)).sum(0)).reshape(vectors.shape[1:])

    try:
        mix = llama.mixture(method="half_tau")
        want = merge(dict(llama.paths), [0.2, 0.3, 0.5], "half_tau")
        flat = mix.scales(torch.tensor([0.2, 0.3, 0.5]))
        torch.testing.assert_close(flat, torch.cat([want.vectors[s.path].reshape(-1).float() for s in mix.segments]))
        back = Mixture.load(mix.save(tmp_path / "saved"), llama.fresh())
        assert back.method == "half_tau" and torch.equal(back.scales(torch.tensor([0.2, 0.3, 0.5])), flat)
        mix.close()
        back.close()
        # the same form drives the weight search (a few Adam steps on the mixture's own batch)
        from ia3fuse import search_weights

        batch = {**llama.inputs, "labels": llama.inputs["input_ids"]} if "labels" not in llama.inputs else llama.inputs
        result = search_weights(llama.fresh(), dict(llama.paths), [batch], method="half_tau", budget=3)
        assert result.method == "half_tau" and result.forwards == 3
    finally:
        _REGISTRY.pop("half_tau", None)
