"""In-memory fold into full-precision weights, checked against PEFT's unmerged forward."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from torch import nn

import ia3fuse
from ia3fuse.errors import FoldError
from factories import random_ia3_adapter, tiny_model
from ia3fuse.folding.dense import DenseBackend

ARCHS = ["llama", "gpt2", "t5", "bert", "opt"]


def _batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :3]} if arch == "t5" else {})}


def _out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    root = tmp_path_factory.mktemp("fold")
    out = {}
    for arch in ARCHS:
        base = tiny_model(arch)
        # spread 0.5 gives some negative entries: rows fold exactly with any sign
        out[arch] = (base, random_ia3_adapter(base, root / arch, seed=7, spread=0.5))
    return out


def _reference(base: nn.Module, adapter: Path, arch: str) -> torch.Tensor:
    return _out(PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval(), _batch(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_peft_model_equals_unmerged_forward(models, arch):
    base, adapter = models[arch]
    assert any((v < 0).any() for v in ia3fuse.load_adapter(adapter).vectors.values()), "want negative entries"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    ref = _out(peft_model, _batch(arch))
    folded = ia3fuse.fold(peft_model, exact="require", measure_error=True)
    assert type(folded) is type(base)
    assert not any("ia3" in n for n, _ in folded.named_modules())
    torch.testing.assert_close(_out(folded, _batch(arch)), ref, rtol=1e-5, atol=1e-5)
    report = folded.ia3fuse_report
    assert report.exact and {e.path for e in report.entries} == {"dense"}
    assert len(report.entries) == len(ia3fuse.load_adapter(adapter).vectors)
    assert report.max_error < 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_plain_model_with_adapter_and_unfold_bit_identical(models, arch):
    base, adapter = models[arch]
    model = copy.deepcopy(base)
    folded = ia3fuse.fold(model, adapter, keep_originals=True)
    assert folded is model
    torch.testing.assert_close(_out(folded, _batch(arch)), _reference(base, adapter, arch), rtol=1e-5, atol=1e-5)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, folded.state_dict()[k])]
    assert changed, "the fold changed nothing"
    ia3fuse.unfold(folded)
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in base.state_dict().items())
    assert not hasattr(folded, "ia3fuse_report")


def test_unfold_without_originals_is_refused(models):
    base, adapter = models["llama"]
    folded = ia3fuse.fold(copy.deepcopy(base), adapter)
    with pytest.raises(FoldError, match=r"were folded without keep_originals=True, so they cannot be restored exactly"):
        ia3fuse.unfold(folded)
    with pytest.raises(FoldError, match="carries no ia3fuse fold report"):
        ia3fuse.unfold(copy.deepcopy(base))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_half_precision_at_rounding_floor(models, dtype):
    base, adapter = models["llama"]
    half = copy.deepcopy(base).to(dtype)
    ref = _out(PeftModel.from_pretrained(copy.deepcopy(half), str(adapter)).eval(), _batch("llama")).float()
    folded = ia3fuse.fold(copy.deepcopy(half), adapter, measure_error=True)
    out = _out(folded, _batch("llama")).float()
    eps = torch.finfo(dtype).eps
    assert ((out - ref).norm() / ref.norm()) < 8 * eps
    assert folded.ia3fuse_report.max_error < eps


def _pretend_quantized(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> None:
    """Make columns of modules named ``names`` non-exact, as in a quantized format."""
    original = DenseBackend.exact_cols

    def exact_cols(self, module):
        if getattr(module, "_ia3_test_name", None) in names:
            return "pretend-quantized columns"
        return original(self, module)

    monkeypatch.setattr(DenseBackend, "exact_cols", exact_cols)


def _tag(model: nn.Module) -> None:
    for name, module in model.named_modules():
        module._ia3_test_name = name.rsplit(".", 1)[-1]


@pytest.mark.parametrize(("arch", "ff", "neighbour"), [("llama", "down_proj", "up_proj"), ("opt", "fc2", "fc1")])
def test_neighbour_rewrite_is_exact(models, monkeypatch, tmp_path, arch, ff, neighbour):
    base, _ = models[arch]
    # a positive adapter: the ReLU rewrite needs l > 0
    adapter = random_ia3_adapter(base, tmp_path / "pos", seed=3, spread=0.2)
    _pretend_quantized(monkeypatch, (ff,))
    model = copy.deepcopy(base)
    _tag(model)
    folded = ia3fuse.fold(model, adapter, exact="require", keep_originals=True)
    torch.testing.assert_close(_out(folded, _batch(arch)), _reference(base, adapter, arch), rtol=1e-5, atol=1e-5)
    rows = {e.module: e for e in folded.ia3fuse_report.entries}
    nb = next(e for m, e in rows.items() if m.endswith(neighbour))
    assert nb.path == "dense + neighbour" and "neighbour" in nb.carries
    assert not any(m.endswith(ff) for m in rows)


def test_relu_rewrite_refused_for_nonpositive_l_and_falls_back(models, monkeypatch, tmp_path):
    base, _ = models["opt"]
    adapter = ia3fuse.load_adapter(random_ia3_adapter(base, tmp_path / "a", seed=3, spread=0.2))
    key = next(p for p in adapter.vectors if p.endswith("fc2"))
    adapter.vectors[key] = adapter.vectors[key].clone()
    adapter.vectors[key][0, 0] = -0.5
    _pretend_quantized(monkeypatch, ("fc2",))
    model = copy.deepcopy(base)
    _tag(model)
    with pytest.raises(
        FoldError,
        match=r"can only be folded by dequantize-scale-requantize .*the ReLU rewrite \(relu\(z\) \* l = relu\(z \* l\)\) needs every l > 0",
    ):
        ia3fuse.fold(model, adapter, exact="require")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.state_dict().items()), "model changed"
    with pytest.warns(UserWarning, match="folded by dequantize-scale-requantize"):
        folded = ia3fuse.fold(model, adapter)
    lossy = [e.module for e in folded.ia3fuse_report.entries if not e.exact]
    assert lossy == [key]  # only the layer with l <= 0; the other fc2 moved onto its fc1
    assert not folded.ia3fuse_report.exact


def test_gelu_mlp_has_no_rewrite(models, monkeypatch):
    base, adapter = models["gpt2"]
    _pretend_quantized(monkeypatch, ("c_proj",))
    model = copy.deepcopy(base)
    _tag(model)
    with pytest.raises(FoldError, match="no exact rewrite for this module's input"):
        ia3fuse.fold(model, adapter, exact="require")


def test_several_active_adapters_multiply(models, tmp_path):
    base, a = models["llama"]
    b = random_ia3_adapter(base, tmp_path / "b", seed=11)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(a), adapter_name="a")
    peft_model.load_adapter(str(b), adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])
    ref = _out(peft_model.eval(), _batch("llama"))
    folded = ia3fuse.fold(peft_model)
    torch.testing.assert_close(_out(folded, _batch("llama")), ref, rtol=1e-5, atol=1e-5)


def test_adapter_from_another_base_is_refused_and_model_untouched(models, tmp_path):
    base, _ = models["llama"]
    wide = tiny_model("llama", hidden_size=48, head_dim=12)
    adapter = random_ia3_adapter(wide, tmp_path / "wide", seed=1)
    model = copy.deepcopy(base)
    with pytest.raises(FoldError) as caught:
        ia3fuse.fold(model, adapter)
    assert str(caught.value) == (  # said once, with a count and two examples
        "cannot fold the adapter into this model: 4 of the adapter's 6 modules do not fit the model (model type "
        "'llama'): e.g. 'model.layers.0.self_attn.k_proj' (16 output features, the adapter's vector 24) and "
        "'model.layers.0.self_attn.v_proj' (16 output features, the adapter's vector 24); the adapter was trained on "
        "another base model ('tiny', as its adapter_config.json records): fold it into that base, or use an adapter "
        "trained on this one"
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.state_dict().items())
    gpt2_adapter = models["gpt2"][1]
    with pytest.raises(
        FoldError,
        match=r"modules do not fit the model \(model type 'llama'\): e\.g\. "
        r"'transformer\.h\.0\.attn\.c_attn' \(absent\)",
    ):
        ia3fuse.fold(copy.deepcopy(base), gpt2_adapter)


def test_bad_calls(models):
    base, adapter = models["llama"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    with pytest.raises(FoldError, match="not both"):
        ia3fuse.fold(peft_model, adapter)
    with pytest.raises(FoldError, match="pass the IA3 adapter"):
        ia3fuse.fold(copy.deepcopy(base))
    with pytest.raises(FoldError, match="exact='sometimes' is not a policy"):
        ia3fuse.fold(copy.deepcopy(base), adapter, exact="sometimes")
    with peft_model.disable_adapter():
        with pytest.raises(FoldError, match="adapters are disabled"):
            ia3fuse.fold(peft_model)
    peft_model.merge_adapter()
    with pytest.raises(FoldError, match="already has adapters merged by PEFT"):
        ia3fuse.fold(peft_model)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(self.conv3(x).mean(dim=(2, 3)))


def test_conv2d_custom_model_rows_and_grouped_cols():
    torch.manual_seed(0)
    base = ConvNet().eval()
    cfg = IA3Config(
        target_modules=["conv1", "conv2", "conv3", "head"],
        feedforward_modules=["conv2", "head"],
        init_ia3_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = peft_model(x)
    folded = ia3fuse.fold(peft_model, exact="require", measure_error=True)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(folded.conv2, nn.Conv2d)
    assert folded.ia3fuse_report.max_error < 1e-6  # the grouped-convolution expectation is right


def test_modules_to_save_are_kept_from_a_peft_model_and_from_files(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
        vocab_size=128,
        num_labels=3,
    )
    base = tf.BertForSequenceClassification(cfg).eval()
    peft_model = get_peft_model(copy.deepcopy(base), IA3Config(task_type="SEQ_CLS", init_ia3_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(str(tmp_path / "cls"))
    ids = torch.randint(1, 128, (2, 6))
    peft_model.eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    folded = ia3fuse.fold(peft_model)
    assert type(folded.classifier) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    # From the adapter files onto a plain model: the trained head comes along (extras="keep").
    plain = copy.deepcopy(base)
    folded = ia3fuse.fold(plain, tmp_path / "cls", keep_originals=True)
    assert folded.ia3fuse_report.trained == ["classifier.bias", "classifier.weight"]
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        ia3fuse.unfold(folded)
        torch.testing.assert_close(folded(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    # extras="drop": IA3 only, the base model's (random) head stays
    dropped = ia3fuse.fold(copy.deepcopy(base), tmp_path / "cls", extras="drop")
    assert dropped.ia3fuse_report.trained == []
    assert torch.equal(dropped.classifier.weight, base.classifier.weight)
    # a head of another shape is refused before anything changes
    other = tf.BertForSequenceClassification(tf.BertConfig(**{**cfg.to_dict(), "num_labels": 5})).eval()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(FoldError) as caught:
        ia3fuse.fold(other, tmp_path / "cls")
    assert str(caught.value) == (
        "2 of the adapter's trained modules (modules_to_save) do not fit the model ('base_model.model.classifier.bias' "
        "is (3,) but the model's 'classifier.bias' is (5,); 'base_model.model.classifier.weight' is (3, 32) but the "
        "model's 'classifier.weight' is (5, 32)); fold into the model the adapter was trained on, or pass "
        "extras='drop' (--extras drop on the command line) to fold the IA3 vectors only"
    )
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_error_is_measured_for_lossy_layers_by_default(models, monkeypatch):
    base, adapter = models["gpt2"]
    _pretend_quantized(monkeypatch, ("c_proj",))
    model = copy.deepcopy(base)
    _tag(model)
    with pytest.warns(UserWarning):
        report = ia3fuse.fold(model, adapter).ia3fuse_report
    measured = {e.module.rsplit(".", 1)[-1]: e.rel_error for e in report.entries}
    assert measured["c_attn"] is None and measured["c_proj"] is not None and measured["c_proj"] < 1e-6
    with pytest.raises(FoldError, match="measure_error='some' is not a choice"):
        ia3fuse.fold(copy.deepcopy(base), adapter, measure_error="some")


@pytest.mark.parametrize(
    "bad", [{"measure_error": "bogus"}, {"exact": "never"}, {"double_quant": "zip"}, {"extras": "keep-some"}]
)
def test_a_bad_option_leaves_the_peft_model_as_it_was(models, bad):
    """Options are checked before the IA3 layers are stripped (measure_error was checked after)."""
    base, adapter = models["llama"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    before = _out(peft_model, _batch("llama"))
    with pytest.raises(FoldError, match="is not a"):
        ia3fuse.fold(peft_model, **bad)
    from peft.tuners.ia3 import IA3Layer

    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.k_proj, IA3Layer)  # still PEFT's
    torch.testing.assert_close(_out(peft_model, _batch("llama")), before, rtol=0, atol=0)
