"""Streaming fold of an IA3 adapter into an on-disk safetensors checkpoint.

References: PEFT's unmerged forward (logits within float32 noise) and the in-memory
``ia3fuse.fold`` (state dicts bit for bit). Every run must leave the inputs byte-identical, and
every failure must leave neither an output nor a temporary sibling.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from cli_runner import run_cli
import ia3fuse
from ia3fuse import FoldError, IA3Adapter, OutputPathError, fold_checkpoint
from factories import random_ia3_adapter, tiny_config, tiny_model
from ia3fuse.folding import math as fold_math
from ia3fuse.folding import safetensors_io as ckio

K_PROJ0 = "model.layers.0.self_attn.k_proj"


# --- helpers --------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` by hash, every directory by name (links not followed)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path, name: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith((f".{name}.tmp-", f".{name}.old-"))]


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (maybe sharded) checkpoint directory."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def dtypes_of(folder: Path) -> dict[str, str]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def with_random_biases(model: Any) -> Any:
    """Transformers initialises biases to 0, which would hide a bias left unscaled."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


@dataclass(frozen=True)
class Inputs:
    root: Path  # every input below; no test writes here
    llama: Any  # LlamaForCausalLM loaded from llama_dir
    llama_dir: Path
    adapter: Path  # IA3 on llama, PEFT's default targets (k/v rows, down_proj columns)
    wide: Path  # IA3 on a llama with hidden size 48: another base
    llama_sharded: Path  # the same llama saved in 20 KB shards
    headless: Path  # llama.model (a LlamaModel): names without the "model." prefix
    bert: Any  # BertModel with random (nonzero) biases
    bert_dir: Path
    bert_adapter: Path
    bert_head: Path  # BertForSequenceClassification around the same encoder: names gain "bert."
    gpt2: Any  # GPT2LMHeadModel with random biases; lm_head tied to the token embeddings
    gpt2_dir: Path
    gpt2_adapter: Path
    t5_dir: Path
    t5_adapter: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("ckpt-inputs")
    tiny_model("llama", seed=0).save_pretrained(str(root / "llama"))
    llama = tf.LlamaForCausalLM.from_pretrained(str(root / "llama")).eval()
    adapter = random_ia3_adapter(llama, root / "adapter", seed=1, spread=0.2)
    wide = random_ia3_adapter(tiny_model("llama", seed=0, hidden_size=48, head_dim=12), root / "wide", seed=2)
    llama.save_pretrained(str(root / "llama_sharded"), max_shard_size="20KB")
    llama.model.save_pretrained(str(root / "headless"))

    bert = with_random_biases(tiny_model("bert", seed=0))
    bert.save_pretrained(str(root / "bert"))
    bert_adapter = random_ia3_adapter(bert, root / "bert_adapter", seed=3, spread=0.2)
    head = tf.BertForSequenceClassification(tiny_config("bert", num_labels=3)).eval()
    head.bert.load_state_dict(bert.state_dict())
    head.save_pretrained(str(root / "bert_head"))

    gpt2 = with_random_biases(tiny_model("gpt2", seed=0))
    gpt2.save_pretrained(str(root / "gpt2"))
    gpt2_adapter = random_ia3_adapter(gpt2, root / "gpt2_adapter", seed=5, spread=0.2)
    t5 = tiny_model("t5", seed=0)
    t5.save_pretrained(str(root / "t5"))
    t5_adapter = random_ia3_adapter(t5, root / "t5_adapter", seed=4, spread=0.2)
    return Inputs(
        root,
        llama,
        root / "llama",
        adapter,
        wide,
        root / "llama_sharded",
        root / "headless",
        bert,
        root / "bert",
        bert_adapter,
        root / "bert_head",
        gpt2,
        root / "gpt2",
        gpt2_adapter,
        root / "t5",
        t5_adapter,
    )


@pytest.fixture(autouse=True)
def inputs_unchanged(inputs: Inputs) -> Iterator[None]:
    """Whatever a test does, the module's inputs stay byte-identical."""
    before = snapshot(inputs.root)
    yield
    assert snapshot(inputs.root) == before


# --- every architecture against PEFT and the in-memory fold ---------------------------------------


def test_streamed_fold_equals_peft_and_the_in_memory_fold(tiny: Any, tmp_path: Path) -> None:
    adapter = tiny.adapters[0]
    before = snapshot(tiny.base_dir, adapter)
    out = tmp_path / "folded"
    report = fold_checkpoint(tiny.base_dir, adapter, out, progress=False)
    # Checked before loading: without config.json, from_pretrained would build a 7B default Llama.
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny.base_dir) + ["README.md"])  # the card: see below

    cls = type(tiny.model)
    folded = cls.from_pretrained(str(out)).eval()
    want = tiny.run(PeftModel.from_pretrained(tiny.fresh_base(), str(adapter)).eval())
    torch.testing.assert_close(tiny.run(folded), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiny.run(tiny.model), want, atol=1e-3)  # the adapter does change the output

    in_memory = ia3fuse.fold(tiny.fresh_base(), adapter).state_dict()
    assert_same_tensors(folded.state_dict(), in_memory)
    # The file itself: the base's tensor names (tied weights as stored), the in-memory values.
    written, base = tensors_of(out), tensors_of(tiny.base_dir)
    assert sorted(written) == sorted(base)
    assert_same_tensors(written, {k: in_memory[k] for k in base})

    # The report lists the tensors the fold scaled: each module's weight, and its bias where an
    # output-side vector scales it (a zero bias, as GPT-2's, scales to the same bytes).
    vectors = ia3fuse.load_adapter(adapter)
    expect = set()
    for path in vectors.vectors:
        expect.add(f"{path}.weight")
        if not vectors.feedforward[path] and f"{path}.bias" in base:
            expect.add(f"{path}.bias")
    assert {e.tensor for e in report.entries} == expect
    changed = {k for k in base if not torch.equal(written[k], base[k])}
    assert {k for k in expect if k.endswith(".weight")} <= changed <= expect
    for e in report.entries:
        assert e.modules == (e.tensor.rsplit(".", 1)[0],)
        assert e.scaled == ("cols" if vectors.feedforward[e.modules[0]] else "rows")
    assert report.changed == len(expect) and report.tensors == len(base) and report.shards == 1
    assert report.modules == len(vectors.vectors)
    # the one report type: a FileFoldReport whose entries are FoldEntry records like fold()'s
    assert isinstance(report, ia3fuse.FileFoldReport) and isinstance(report, ia3fuse.FoldReport)
    assert all(isinstance(e, ia3fuse.FoldEntry) and e.module == e.tensor for e in report.entries)
    assert report.exact and report.max_error is None and {e.path for e in report.entries} == {"dense"}
    assert report.to_dict()["exact"] is True and report.to_dict()["modules"] == len(vectors.vectors)
    for name in os.listdir(tiny.base_dir):  # config, generation config: copied as they are
        if name.endswith(".json"):
            assert (out / name).read_bytes() == (tiny.base_dir / name).read_bytes()
    assert snapshot(tiny.base_dir, adapter) == before


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d groups=2", "conv3d"])
def test_scale_weight_equals_the_in_memory_dense_fold(kind: str) -> None:
    """The pure math, on layouts no tiny transformers model has (grouped convolutions)."""
    from transformers.pytorch_utils import Conv1D

    from ia3fuse.folding.base import FoldOptions
    from ia3fuse.folding.dense import DenseBackend

    torch.manual_seed(0)
    module = {
        "linear": lambda: torch.nn.Linear(6, 4),
        "conv1d": lambda: Conv1D(4, 6),  # (nf=out, nx=in): weight stored (6, 4)
        "conv2d groups=2": lambda: torch.nn.Conv2d(6, 4, 3, groups=2),
        "conv3d": lambda: torch.nn.Conv3d(6, 4, 2),
    }[kind]().to(torch.bfloat16)
    with torch.no_grad():
        module.bias.normal_()
    rows, cols = 1 + 0.3 * torch.randn(4), 1 + 0.3 * torch.randn(6)
    weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
    DenseBackend().requantize(module, rows, cols, options=FoldOptions())  # rows and cols, one rounding
    got = fold_math.scale_weight(weight, rows, cols, transposed=kind == "conv1d", groups=getattr(module, "groups", 1))
    assert got.dtype == torch.float32 and not torch.equal(got.bfloat16(), weight)
    assert torch.equal(got.to(torch.bfloat16), module.weight)
    assert torch.equal(fold_math.scale_bias(bias, rows).to(torch.bfloat16), module.bias)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_biases_scale_with_the_rows(inputs: Inputs, arch: str, tmp_path: Path) -> None:
    model, base, adapter = (
        (inputs.gpt2, inputs.gpt2_dir, inputs.gpt2_adapter)
        if arch == "gpt2"
        else (inputs.bert, inputs.bert_dir, inputs.bert_adapter)
    )
    report = fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    biases = [e.tensor for e in report.entries if e.tensor.endswith(".bias")]
    assert biases and all(e.scaled == "rows" for e in report.entries if e.tensor in biases)
    written, before = tensors_of(tmp_path / "out"), tensors_of(base)
    assert all(not torch.equal(written[k], before[k]) for k in biases)
    want = ia3fuse.fold(copy.deepcopy(model), adapter).state_dict()
    assert_same_tensors(written, {k: want[k] for k in before})
    ids = {"input_ids": torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))}
    folded = type(model).from_pretrained(str(tmp_path / "out")).eval()
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    with torch.no_grad():
        got, ref = folded(**ids)[0], peft(**ids)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["adds prefix", "drops prefix"])
def test_module_paths_match_a_checkpoint_of_another_head_class(inputs: Inputs, layout: str, tmp_path: Path) -> None:
    out = tmp_path / "folded"
    if layout == "adds prefix":  # adapter on BertModel, checkpoint of BertForSequenceClassification
        report = fold_checkpoint(inputs.bert_head, inputs.bert_adapter, out, progress=False)
        got = tf.BertForSequenceClassification.from_pretrained(str(out))
        want = ia3fuse.fold(copy.deepcopy(inputs.bert), inputs.bert_adapter).state_dict()
        assert_same_tensors(got.bert.state_dict(), want)
        base = tensors_of(inputs.bert_head)
        written = tensors_of(out)
        assert all(torch.equal(written[k], base[k]) for k in base if k.startswith("classifier."))
        assert all(e.tensor == f"bert.{e.modules[0]}.{e.tensor.rsplit('.', 1)[1]}" for e in report.entries)
    else:  # adapter on LlamaForCausalLM, checkpoint of the bare LlamaModel
        report = fold_checkpoint(inputs.headless, inputs.adapter, out, progress=False)
        got = tf.LlamaModel.from_pretrained(str(out))
        want = ia3fuse.fold(copy.deepcopy(inputs.llama), inputs.adapter).model.state_dict()
        assert_same_tensors(got.state_dict(), want)
        assert all(e.modules[0] == f"model.{e.tensor.rsplit('.', 1)[0]}" for e in report.entries)
    assert report.changed > 0


# --- shards and dtypes ----------------------------------------------------------------------------


def test_small_shards_and_a_sharded_input_give_the_same_model(
    inputs: Inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = tmp_path / "whole"
    fold_checkpoint(inputs.llama_dir, inputs.adapter, whole, progress=False)
    reference = tensors_of(whole)
    assert os.listdir(whole).count("model.safetensors") == 1 and not (whole / "model.safetensors.index.json").exists()
    capsys.readouterr()

    sharded = tmp_path / "sharded"
    report = fold_checkpoint(inputs.llama_dir, inputs.adapter, sharded, max_shard_size="20KB", progress=True)
    assert f"{len(reference)}/{len(reference)}" in capsys.readouterr().err  # the progress bar ran to the end
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) == report.shards > 2 and not (sharded / "model.safetensors").exists()
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    owner = {k: s.name for s in shards for k in load_file(str(s))}
    assert index["weight_map"] == owner
    sizes = {s.name: sum(t.numel() * t.element_size() for t in load_file(str(s)).values()) for s in shards}
    assert index["metadata"]["total_size"] == sum(sizes.values()) == report.total_size
    for s in shards:  # a shard exceeds the limit only when it holds a single larger tensor
        assert sizes[s.name] <= 20_000 or len(load_file(str(s))) == 1
    assert_same_tensors(tensors_of(sharded), reference)
    loaded = tf.LlamaForCausalLM.from_pretrained(str(sharded))
    assert_same_tensors(loaded.state_dict(), tf.LlamaForCausalLM.from_pretrained(str(whole)).state_dict())

    from_shards = tmp_path / "from_shards"  # a sharded input, folded into one file
    fold_checkpoint(inputs.llama_sharded, inputs.adapter, from_shards, progress=False)
    assert sorted(p.name for p in from_shards.glob("*.safetensors")) == ["model.safetensors"]
    assert_same_tensors(tensors_of(from_shards), reference)


def test_bfloat16_output_rounds_the_float32_fold_once(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    report = fold_checkpoint(inputs.llama_dir, inputs.adapter, out, dtype="bfloat16", progress=False)
    assert set(dtypes_of(out).values()) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.dtype == "bfloat16" and {e.dtype for e in report.entries} == {"bfloat16"}
    want = ia3fuse.fold(copy.deepcopy(inputs.llama), inputs.adapter).state_dict()
    assert_same_tensors(tensors_of(out), {k: v.to(torch.bfloat16) for k, v in want.items()})
    model = tf.LlamaForCausalLM.from_pretrained(str(out), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_float16_keeps_the_modules_transformers_keeps_in_float32(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    fold_checkpoint(inputs.t5_dir, inputs.t5_adapter, out, dtype="float16", progress=False)
    dtypes = dtypes_of(out)
    kept = {k for k, d in dtypes.items() if d == "F32"}
    assert kept and all(".wo." in k for k in kept)  # T5's _keep_in_fp32_modules = ["wo"]
    assert {d for k, d in dtypes.items() if k not in kept} == {"F16"}
    want = ia3fuse.fold(
        tf.T5ForConditionalGeneration.from_pretrained(str(inputs.t5_dir)), inputs.t5_adapter
    ).state_dict()
    got = tensors_of(out)
    for k in got:
        assert torch.equal(got[k], want[k] if k in kept else want[k].half()), k


# --- bounded memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_holds_one_tensor_at_a_time(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    # Every tensor decoded from the input or encoded to the output is tracked until freed; when
    # the next input tensor is read, none of them may still be alive.
    alive: set[int] = set()
    alive_at_read, peak, reads = [], [0], []
    read, write = ckio._read_tensor, ckio._write_bytes

    def track(tensor: torch.Tensor) -> None:
        alive.add(id(tensor))
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(tensor, alive.discard, id(tensor))

    def counting_read(handle: Any, name: str) -> torch.Tensor:
        alive_at_read.append(len(alive))
        tensor = read(handle, name)
        reads.append(name)
        track(tensor)
        return tensor

    def counting_write(out: Any, tensor: torch.Tensor) -> None:
        track(tensor)
        write(out, tensor)

    monkeypatch.setattr(ckio, "_read_tensor", counting_read)
    monkeypatch.setattr(ckio, "_write_bytes", counting_write)
    report = fold_checkpoint(inputs.llama_dir, inputs.adapter, tmp_path / "out", dtype=dtype, progress=False)
    if dtype is None:  # tensors that keep their bytes are copied, never decoded
        assert sorted(reads) == sorted(e.tensor for e in report.entries)
    else:
        assert sorted(reads) == sorted(tensors_of(inputs.llama_dir))
    assert alive_at_read == [0] * len(reads) and 1 <= peak[0] <= 2 and not alive


# --- bad input, failures --------------------------------------------------------------------------


def _refused(out: Path) -> None:
    assert not out.exists() and leftovers(out.parent, out.name) == []


def test_adapter_of_another_base_is_refused_once_with_a_count_and_two_examples(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FoldError) as exc:
        fold_checkpoint(inputs.llama_dir, inputs.wide, out, progress=False)
    assert str(exc.value) == (
        "cannot fold the adapter into this checkpoint: 4 of the adapter's 6 modules do not fit the model built from "
        "config.json (LlamaForCausalLM, model type 'llama'): e.g. 'model.layers.0.self_attn.k_proj' (16 output "
        "features, the adapter's vector 24) and 'model.layers.0.self_attn.v_proj' (16 output features, the adapter's "
        "vector 24); the adapter was trained on another base model ('tiny', as its adapter_config.json records): "
        "fold it into that base, or use an adapter trained on this one"
    )
    _refused(out)


def _adapter(vectors: dict[str, torch.Tensor], **kw: Any) -> IA3Adapter:
    return IA3Adapter(vectors, {p: False for p in vectors}, {"peft_type": "IA3"}, **kw)


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "absent",
            (
                r"^cannot fold the adapter into this checkpoint: the adapter's module does not fit the model "
                r"built from config\.json \(LlamaForCausalLM, model type 'llama'\): "
                r"'model\.layers\.7\.self_attn\.k_proj' \(absent\); the adapter was trained on another base "
                r"model: fold it into that base, or use an adapter trained on this one$"
            ),
        ),
        ("ambiguous", r"'self_attn\.k_proj' matches 2 modules .*'model\.layers\.0\.self_attn\.k_proj'.*ambiguous"),
        (
            "tied",
            r"'lm_head' \(model type 'gpt2'\) has its weight tied to 'transformer\.wte\.weight'; folding it would change",
        ),
        (
            "extras",
            (
                r"^the adapter's trained modules \(modules_to_save, e\.g\. a classifier head\) do not fit this "
                r"checkpoint \(the checkpoint has no module 'score'\); fold into the checkpoint the adapter was "
                r"trained on, or pass extras='drop' \(--extras drop on the command line\) to fold the IA3 "
                r"vectors only$"
            ),
        ),
        ("not a linear", r"'model\.norm' is a LlamaRMSNorm .* nn\.Linear, Conv1D and Conv2d/Conv3d"),
    ],
)
def test_modules_that_cannot_be_folded_are_refused(inputs: Inputs, tmp_path: Path, case: str, message: str) -> None:
    base, vectors, extras = inputs.llama_dir, {f"{K_PROJ0}": torch.ones(16, 1)}, {}
    if case == "absent":
        vectors = {"model.layers.7.self_attn.k_proj": torch.ones(16, 1)}
    elif case == "ambiguous":
        vectors = {"self_attn.k_proj": torch.ones(16, 1)}
    elif case == "tied":
        base, vectors = inputs.gpt2_dir, {"lm_head": torch.ones(128, 1)}
    elif case == "extras":
        extras = {"base_model.model.score.weight": torch.ones(2, 32)}
    else:
        vectors = {"model.norm": torch.ones(32, 1)}
    out = tmp_path / "out"
    with pytest.raises(FoldError, match=message):
        fold_checkpoint(base, _adapter(vectors, extras=extras), out, progress=False)
    _refused(out)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float8"}, r"dtype='float8' is not an output dtype; pass 'float32', 'float16', 'bfloat16'"),
        ({"max_shard_size": "5XB"}, r"max_shard_size='5XB' is not a size"),
        ({"max_shard_size": 0}, r"max_shard_size=0 is not positive"),
    ],
)
def test_bad_options_are_refused(inputs: Inputs, tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FoldError, match=message):
        fold_checkpoint(inputs.llama_dir, inputs.adapter, tmp_path / "out", progress=False, **kwargs)
    _refused(tmp_path / "out")


def test_a_directory_without_safetensors_is_refused(inputs: Inputs, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_bytes((inputs.llama_dir / "config.json").read_bytes())
    (base / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FoldError, match=r"has no model\.safetensors nor .* \(found pytorch_model\.bin\)"):
        fold_checkpoint(base, inputs.adapter, tmp_path / "out", progress=False)
    _refused(tmp_path / "out")


def test_existing_output_is_refused_unless_overwrite(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="already exists"):
        fold_checkpoint(inputs.llama_dir, inputs.adapter, out, progress=False)
    assert os.listdir(out) == ["keep.txt"]
    fold_checkpoint(inputs.llama_dir, inputs.adapter, out, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert leftovers(tmp_path, "out") == []


def test_output_inside_the_base_is_refused(inputs: Inputs) -> None:
    out = inputs.llama_dir / "folded"
    with pytest.raises(OutputPathError, match="lies inside the input"):
        fold_checkpoint(inputs.llama_dir, inputs.adapter, out, progress=False)
    _refused(out)


def test_a_write_failure_midway_leaves_nothing(inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ckio._write_tensor

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(ckio, "_write_tensor", failing)
    out = tmp_path / "out"
    with pytest.raises(OutputPathError, match="No space left on device"):
        fold_checkpoint(inputs.llama_dir, inputs.adapter, out, max_shard_size="20KB", progress=False)
    assert len(calls) == 2
    _refused(out)
    assert os.listdir(tmp_path) == []


# --- the command line -----------------------------------------------------------------------------


def test_cli_fold_writes_the_api_result(inputs: Inputs, tmp_path: Path) -> None:
    api = tmp_path / "api"
    report = fold_checkpoint(inputs.llama_dir, inputs.adapter, api, progress=False)
    out = tmp_path / "cli"
    res = run_cli(
        "fold", "--base", inputs.llama_dir, "--adapter", inputs.adapter, "-o", out, "--no-progress", real=True
    )
    assert res.returncode == 0, res.stderr
    # a summary by default, not a row per tensor (a 7B model changes ~200)
    assert res.stdout.splitlines() == [
        report.summary().replace(str(api), str(out)),
        "exact: 4 by rows, 2 by cols (float32 products, each rounded once to its tensor's dtype)",
        "(per-tensor table: --verbose, or --report FILE for a markdown file)",
    ]
    assert (out / "model.safetensors").read_bytes() == (api / "model.safetensors").read_bytes()

    # --verbose prints the table too; --report writes it, unwrapped, to a markdown file
    md = tmp_path / "fold.md"
    res = run_cli(
        "fold",
        "--base",
        inputs.llama_dir,
        "--adapter",
        inputs.adapter,
        "-o",
        tmp_path / "v",
        "--no-progress",
        "--verbose",
        "--report",
        md,
    )
    assert res.returncode == 0, res.stderr
    summary = report.summary().replace(str(api), str(tmp_path / "v"))
    assert res.stdout.splitlines() == [
        summary,
        report.breakdown(),
        f"wrote the per-tensor table to {md}",
        *report.table().splitlines(),
    ]
    assert f"| {K_PROJ0}.weight | rows   | 16x32 | float32 |" in report.table().splitlines()
    assert md.read_text() == f"# ia3fuse fold\n\n{summary}\n\n{report.breakdown()}\n\n{report.table(max_width=None)}\n"
    assert len(report.table(max_width=None).splitlines()) == 2 + report.changed

    # an existing report is refused before anything is folded
    res = run_cli("fold", "--base", inputs.llama_dir, "--adapter", inputs.adapter, "-o", tmp_path / "w", "--report", md)
    assert res.returncode == 2 and "already exists" in res.stderr and not (tmp_path / "w").exists()


def test_cli_fold_error_is_one_line_with_status_2(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = run_cli("fold", "--base", inputs.llama_dir, "--adapter", inputs.wide, "-o", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ia3fuse: error: ") and K_PROJ0 in lines[0], res.stderr
    _refused(out)
