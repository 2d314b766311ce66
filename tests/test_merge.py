"""Offline merge plumbing: union of modules, identity fill, conflicts, dtypes, extras, I/O."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import ia3fuse
from ia3fuse import IA3Adapter
from ia3fuse.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    InvalidParameterError,
    MethodInputError,
    OutputPathError,
    RecipeError,
)
from ia3fuse.merging import run_recipe
from ia3fuse.recipe import parse_recipe

K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"
D = "model.layers.0.mlp.down_proj"
K1 = "model.layers.1.self_attn.k_proj"


def _adapter(name: str, vectors: dict[str, torch.Tensor], ff: tuple[str, ...] = (), base: str = "base") -> IA3Adapter:
    targets = sorted({p.rsplit(".", 1)[1] for p in vectors})
    ff_names = sorted({p.rsplit(".", 1)[1] for p in ff})
    config = {
        "peft_type": "IA3",
        "target_modules": targets,
        "feedforward_modules": ff_names,
        "base_model_name_or_path": base,
        "task_type": "CAUSAL_LM",
        "init_ia3_weights": True,
    }
    return IA3Adapter(dict(vectors), {p: p in ff for p in vectors}, config, name)


@pytest.fixture
def two() -> tuple[IA3Adapter, IA3Adapter]:
    a = _adapter("a", {K: torch.tensor([[1.5], [0.5]]), D: torch.tensor([[2.0, 1.0, 0.0]])}, ff=(D,))
    b = _adapter("b", {K: torch.tensor([[1.1], [1.3]]), V: torch.tensor([[0.9], [1.2]])})
    return a, b


def test_union_of_modules_with_identity_fill(two):
    a, b = two
    fused = ia3fuse.merge([a, b], [0.5, 0.5], "task_arithmetic")
    assert list(fused.vectors) == [K, D, V]
    # K: 1 + 0.5*(0.5, -0.5) + 0.5*(0.1, 0.3) = (1.3, 0.9)
    torch.testing.assert_close(fused.vectors[K], torch.tensor([[1.3], [0.9]]))
    # D only in a: 1 + 0.5*(1, 0, -1); b counts as tau = 0
    torch.testing.assert_close(fused.vectors[D], torch.tensor([[1.5, 1.0, 0.5]]))
    # V only in b: 1 + 0.5*(-0.1, 0.2)
    torch.testing.assert_close(fused.vectors[V], torch.tensor([[0.95], [1.1]]))
    assert fused.feedforward == {K: False, D: True, V: False}


def test_missing_zero_is_peft_fill(two):
    a, b = two
    fused = ia3fuse.merge([a, b], [0.5, 0.5], "linear", missing="zero")
    # D only in a: 0.5 * (2, 1, 0) + 0.5 * 0 -- the shrink PEFT applies
    torch.testing.assert_close(fused.vectors[D], torch.tensor([[1.0, 0.5, 0.0]]))
    identity = ia3fuse.merge([a, b], [0.5, 0.5], "linear")
    torch.testing.assert_close(identity.vectors[D], torch.tensor([[1.5, 1.0, 0.5]]))


def test_inputs_are_not_modified(two):
    a, b = two
    before = {p: v.clone() for p, v in a.vectors.items()}
    ia3fuse.merge([a, b], [2.0, -1.0], "ties", density=0.5)
    assert all(torch.equal(a.vectors[p], before[p]) for p in before)


def test_shape_conflict_is_reported():
    a = _adapter("a", {K: torch.ones(2, 1)})
    b = _adapter("b", {K: torch.ones(3, 1)})
    with pytest.raises(
        IncompatibleAdaptersError,
        match=r"'model.layers.0.self_attn.k_proj' has different shapes \('a': \(2, 1\), 'b': \(3, 1\)\)",
    ):
        ia3fuse.merge([a, b])


def test_feedforward_conflict_is_reported():
    a = _adapter("a", {D: torch.ones(1, 3)}, ff=(D,))
    b = _adapter("b", {D: torch.ones(3, 1)})
    with pytest.raises(IncompatibleAdaptersError, match="is feed-forward in one adapter and not in another"):
        ia3fuse.merge([a, b])


def test_different_bases_warn_or_fail_when_strict():
    a = _adapter("a", {K: torch.ones(2, 1)}, base="llama-7b")
    b = _adapter("b", {K: torch.ones(2, 1)}, base="mistral-7b")
    with pytest.warns(ia3fuse.IA3FuseWarning, match="different base models"):
        ia3fuse.merge([a, b])
    with pytest.raises(
        IncompatibleAdaptersError, match=r"pass strict=False \(no --strict on the command line\) to fuse anyway"
    ):
        ia3fuse.merge([a, b], strict=True)


def test_same_base_does_not_warn(two):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ia3fuse.merge(list(two))
    assert not [w for w in caught if issubclass(w.category, ia3fuse.IA3FuseWarning)]


def test_geometric_error_names_module_and_adapter():
    a = _adapter("a", {K: torch.tensor([[1.0], [-0.2]])})
    b = _adapter("b", {K: torch.ones(2, 1)})
    with pytest.raises(
        MethodInputError, match=r"geometric: module 'model.layers.0.self_attn.k_proj', adapter 'a': .* must be > 0"
    ):
        ia3fuse.merge([a, b], method="geometric")


def test_geometric_with_missing_zero_is_refused():
    a = _adapter("a", {K: torch.ones(2, 1), V: torch.ones(2, 1)})
    b = _adapter("b", {K: torch.ones(2, 1)})
    with pytest.raises(MethodInputError, match="module 'model.layers.0.self_attn.v_proj', adapter 'b': .* has 0;"):
        ia3fuse.merge([a, b], method="geometric", missing="zero")


def test_parameters_checked_before_anything_is_read(tmp_path):
    with pytest.raises(
        InvalidParameterError, match="method 'linear' has no parameter 'density'; its parameters are: none"
    ):
        ia3fuse.merge([tmp_path / "does-not-exist"], method="linear", density=0.5)
    with pytest.raises(InvalidParameterError, match="missing='one' is not a fill rule"):
        ia3fuse.merge([_adapter("a", {K: torch.ones(2, 1)})], missing="one")


def test_empty_adapter_list():
    with pytest.raises(IncompatibleAdaptersError, match="no adapters given"):
        ia3fuse.merge([])


def test_randomized_methods_are_reproducible_and_differ_per_module():
    gen = torch.Generator().manual_seed(0)
    vecs = {f"model.layers.{i}.self_attn.k_proj": 1 + torch.randn(64, 1, generator=gen) for i in range(2)}
    a = _adapter("a", vecs)
    b = _adapter("b", {p: 2 - v for p, v in vecs.items()})
    one = ia3fuse.merge([a, b], [1, 1], "dare_linear", density=0.5, seed=7)
    two = ia3fuse.merge([a, b], [1, 1], "dare_linear", density=0.5, seed=7)
    other = ia3fuse.merge([a, b], [1, 1], "dare_linear", density=0.5, seed=8)
    assert all(torch.equal(one.vectors[p], two.vectors[p]) for p in vecs)
    assert not all(torch.equal(one.vectors[p], other.vectors[p]) for p in vecs)
    kept = [(v - 1 != 0).reshape(-1) for v in one.vectors.values()]
    assert not torch.equal(kept[0], kept[1])


def test_dtype_is_kept_and_computed_in_float32():
    a = _adapter("a", {K: torch.tensor([[1.5], [0.5]], dtype=torch.bfloat16)})
    b = _adapter("b", {K: torch.tensor([[1.25], [0.75]], dtype=torch.bfloat16)})
    fused = ia3fuse.merge([a, b], [0.5, 0.5])
    assert fused.vectors[K].dtype == torch.bfloat16
    torch.testing.assert_close(fused.vectors[K].float(), torch.tensor([[1.375], [0.625]]))
    mixed = ia3fuse.merge([a, _adapter("c", {K: torch.ones(2, 1)})])
    assert mixed.vectors[K].dtype == torch.float32


def test_weight_schedule_applies_per_module(two):
    a, b = two
    fused = ia3fuse.merge(
        [a, b],
        {
            "default": [0.5, 0.5],
            "kinds": {"feedforward": [1.0, 0.0]},
            "overrides": [{"filter": r"v_proj$", "weights": [0.0, 2.0]}],
        },
    )
    torch.testing.assert_close(fused.vectors[D], a.vectors[D])  # kind feedforward: a alone
    torch.testing.assert_close(fused.vectors[V], torch.tensor([[0.8], [1.4]]))  # 1 + 2 * (-0.1, 0.2)
    torch.testing.assert_close(fused.vectors[K], torch.tensor([[1.3], [0.9]]))


def test_depth_gradient_over_layers():
    a = _adapter("a", {K: torch.tensor([[2.0]]), K1: torch.tensor([[2.0]])})
    b = _adapter("b", {K: torch.tensor([[0.0]]), K1: torch.tensor([[0.0]])})
    fused = ia3fuse.merge([a, b], [[1.0, 0.0], [0.0, 1.0]])
    # layer 0: all a -> 2; layer 1: all b -> 0
    assert fused.vectors[K].item() == pytest.approx(2.0)
    assert fused.vectors[K1].item() == pytest.approx(0.0)


def test_extras_policies():
    a = _adapter("a", {K: torch.ones(2, 1)})
    b = _adapter("b", {K: torch.ones(2, 1)})
    head = "base_model.model.score.weight"
    for x in (a, b):
        x.config["modules_to_save"] = ["score"]
    a.extras = {head: torch.ones(3)}
    b.extras = {head: torch.tensor([0.0, 2.0, 4.0])}
    with pytest.raises(IncompatibleAdaptersError) as caught:
        ia3fuse.merge([a, b])
    assert str(caught.value) == (
        f"adapters 'a' and 'b' carry different trained modules (modules_to_save, e.g. {head!r}: a classifier head); "
        "ia3fuse fuses IA3 vectors, so choose what the fused adapter gets: pass extras='first' (--extras first on "
        "the command line) to keep 'a''s, extras='average' (--extras average on the command line) to average them "
        "with the adapters' weights, or extras='drop' (--extras drop on the command line) to leave them out (the "
        "base model's modules are used)"
    )
    first = ia3fuse.merge([a, b], extras="first")
    assert torch.equal(first.extras[head], torch.ones(3)) and first.config["modules_to_save"] == ["score"]
    # weights 1 and 3, normalised: (1 * a + 3 * b) / 4
    average = ia3fuse.merge([a, b], [1.0, 3.0], extras="average")
    assert torch.equal(average.extras[head], torch.tensor([0.25, 1.75, 3.25]))
    dropped = ia3fuse.merge([a, b], extras="drop")
    assert dropped.extras == {} and dropped.config["modules_to_save"] is None  # PEFT would look for them
    with pytest.raises(IncompatibleAdaptersError, match="the weights are depth gradients"):
        ia3fuse.merge([a, b], [[0.0, 1.0], 1.0], extras="average")
    with pytest.raises(InvalidParameterError, match="extras='keep' is not a policy"):
        ia3fuse.merge([a, b], extras="keep")
    b.extras = {head: torch.ones(3)}
    assert set(ia3fuse.merge([a, b]).extras) == {head}


def test_an_excluded_module_of_one_adapter_is_not_excluded_from_the_fusion():
    """a excludes lin1, b targets it: the fused config must name both (a's exclude_modules no longer holds)."""
    a = _adapter("a", {"m.lin0": torch.ones(2, 1)})
    b = _adapter("b", {"m.lin1": torch.ones(2, 1)})
    a.config.update(target_modules=["lin0", "lin1"], exclude_modules=["lin1"])
    cfg = ia3fuse.merge([a, b]).config
    assert cfg["target_modules"] == ["m.lin0", "m.lin1"] and cfg["exclude_modules"] is None


def test_adapters_of_different_models_are_refused_unless_forced():
    a = _adapter("a", {K: torch.ones(2, 1)}, base="llama-7b")
    b = _adapter("b", {"encoder.layer.0.attention.self.key": torch.ones(2, 1)}, base="bert-base")
    with pytest.raises(IncompatibleAdaptersError) as caught:
        ia3fuse.merge([a, b])
    assert str(caught.value) == (
        "the adapters name different base models ('a': 'llama-7b', 'b': 'bert-base') and target different modules "
        "(0 of 2 shared), so the fused adapter would mix two models; fuse adapters trained on one base, or pass "
        "mixed_bases=True (--mixed-bases on the command line) to fuse them anyway"
    )
    assert len(ia3fuse.merge([a, b], mixed_bases=True).vectors) == 2
    # without base names: no shared module and no shared layer stack is two models all the same
    a.config.pop("base_model_name_or_path")
    b.config.pop("base_model_name_or_path")
    with pytest.raises(IncompatibleAdaptersError) as caught:
        ia3fuse.merge([a, b])
    assert str(caught.value) == (
        "the adapters share no module and their layers lie in different places ('a': model.layers, 'b': "
        "encoder.layer), so they were trained on different models; fuse adapters of one model, or pass "
        "mixed_bases=True (--mixed-bases on the command line) to fuse them anyway"
    )
    # disjoint modules of one model (an attention-only and a feed-forward-only adapter) are fine
    c = _adapter("c", {D: torch.ones(1, 3)}, ff=(D,))
    assert len(ia3fuse.merge([a, c]).vectors) == 2


def test_duplicate_names_are_made_unique(two):
    a, _ = two
    fused = ia3fuse.merge([a, a], [0.5, 0.5])
    assert fused.recipe.adapter_names() == ["a", "a#1"]
    torch.testing.assert_close(fused.vectors[K], a.vectors[K])


def test_config_targets_exactly_the_fused_modules(two):
    a, b = two
    cfg = ia3fuse.merge(list(two)).config
    assert cfg["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert cfg["feedforward_modules"] == ["down_proj"]
    assert cfg["init_ia3_weights"] is True
    # a regex target in one input: fall back to exact module paths
    b.config["target_modules"] = r".*\.(k_proj|v_proj)"
    cfg = ia3fuse.merge([a, b]).config
    assert cfg["target_modules"] == [K, D, V]
    assert cfg["feedforward_modules"] == [D]


def _hash_tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_save_load_round_trip_and_model_card(tmp_path, two):
    fused = ia3fuse.merge(list(two), [0.25, 0.75], "ties", density=0.5)
    out = fused.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    back = ia3fuse.load_adapter(out)
    assert back.name == "out"
    assert all(torch.equal(back.vectors[p], v) for p, v in fused.vectors.items())
    assert back.feedforward == fused.feedforward
    assert json.loads((out / "adapter_config.json").read_text()) == fused.config
    card = (out / "README.md").read_text()
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert (
        recipe
        == fused.recipe.plain()
        == {
            "adapters": [{"name": "a"}, {"name": "b"}],
            "method": "ties",
            "weights": [0.25, 0.75],
            "parameters": {"density": 0.5, "majority_sign_method": "total", "lam": 1.0},
            "missing": "identity",
            "name": "fused",
        }
    )


def test_save_refuses_existing_output_and_replaces_with_overwrite(tmp_path, two):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fused = ia3fuse.merge(list(two))
    with pytest.raises(OutputPathError, match="already exists; pass another path, or overwrite=True"):
        fused.save(out)
    assert (out / "keep.txt").exists()
    fused.save(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_leaves_nothing(tmp_path, two, monkeypatch):
    fused = ia3fuse.merge(list(two))

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ia3fuse.adapter.save_file", boom)
    with pytest.raises(
        OutputPathError, match=r"writing output '.*out' failed \(No space left on device\); nothing was written"
    ):
        fused.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_recipe_from_model_card_reproduces_the_merge(tmp_path, two):
    a, b = two
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    data = {
        "adapters": [str(tmp_path / "a"), str(tmp_path / "b")],
        "method": "dare_ties",
        "parameters": {"density": 0.5, "seed": 3},
        "weights": {"a": 0.6, "b": 0.4},
    }
    first = run_recipe(parse_recipe(data), output=tmp_path / "one")
    card = (first / "README.md").read_text()
    again = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    second = run_recipe(parse_recipe(again), output=tmp_path / "two")
    x, y = ia3fuse.load_adapter(first), ia3fuse.load_adapter(second)
    assert all(torch.equal(x.vectors[p], y.vectors[p]) for p in x.vectors)


def test_run_recipe_refuses_output_inside_input_before_reading(tmp_path, two):
    a, b = two
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    before = _hash_tree(tmp_path)
    recipe = parse_recipe({"adapters": [str(tmp_path / "a"), str(tmp_path / "b")]})
    with pytest.raises(OutputPathError, match="is also an input"):
        run_recipe(recipe, output=tmp_path / "a", overwrite=True)
    with pytest.raises(OutputPathError, match="lies inside the input"):
        run_recipe(recipe, output=tmp_path / "a" / "sub")
    assert _hash_tree(tmp_path) == before


def test_loader_rejects_bad_vectors(tmp_path):
    from safetensors.torch import save_file

    def write(name: str, tensors: dict, config: dict | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        cfg = {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
        (d / "adapter_config.json").write_text(json.dumps(config or cfg))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        return d

    key = f"base_model.model.{K}.ia3_l"
    with pytest.raises(AdapterFormatError, match=r"holds 1 NaN/Inf values; the adapter is corrupt"):
        ia3fuse.load_adapter(write("nan", {key: torch.tensor([[1.0], [float("nan")]])}))
    with pytest.raises(
        AdapterFormatError, match=r"has shape \(1, 2\), but a output-side IA3 vector has shape \(out_features, 1\)"
    ):
        ia3fuse.load_adapter(write("shape", {key: torch.ones(1, 2)}))
    with pytest.raises(AdapterFormatError, match="has dtype torch.int64; IA3 vectors are floating point"):
        ia3fuse.load_adapter(write("int", {key: torch.ones(2, 1, dtype=torch.int64)}))
    with pytest.raises(AdapterFormatError, match="holds no IA3 vectors"):
        ia3fuse.load_adapter(write("empty", {"base_model.model.x.weight": torch.ones(2)}))
    with pytest.raises(AdapterFormatError, match="is a LORA adapter, not IA3"):
        ia3fuse.load_adapter(write("lora", {key: torch.ones(2, 1)}, {"peft_type": "LORA"}))
    d = write("corrupt", {key: torch.ones(2, 1)})
    (d / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterFormatError, match="is not a readable safetensors file"):
        ia3fuse.load_adapter(d)
    d = write("badjson", {key: torch.ones(2, 1)})
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="is not valid JSON"):
        ia3fuse.load_adapter(d)
    with pytest.raises(AdapterFormatError, match="does not exist; pass a PEFT adapter directory"):
        ia3fuse.load_adapter(tmp_path / "nowhere")


def test_schedule_in_a_recipe_with_an_adapter_named_default(tmp_path, two):
    a, b = two
    a.save(tmp_path / "default")
    b.save(tmp_path / "b")
    recipe = parse_recipe(
        {
            "adapters": [str(tmp_path / "default"), str(tmp_path / "b")],
            "weights": {"default": [1.0, 0.0], "overrides": [{"filter": "v_proj", "weights": [0.0, 1.0]}]},
        }
    )
    out = ia3fuse.load_adapter(run_recipe(recipe, output=tmp_path / "out"))
    torch.testing.assert_close(out.vectors[K], a.vectors[K])
    torch.testing.assert_close(out.vectors[V], b.vectors[V])


def test_a_recipe_reports_every_problem_at_once():
    """Field errors used to hide the cross-field checks, and an unknown parameter hid the others."""
    data = {
        "adapters": ["a", "b"],
        "method": "ties",
        "weights": [1],
        "missing": "nope",
        "unknown": 1,
        "parameters": {"density": 1.5, "majority_sign_method": "x", "foo": 1},
    }
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    assert str(caught.value) == (
        "recipe is invalid: missing: Input should be 'identity' or 'zero'; unknown: Extra inputs are not permitted; "
        "method 'ties' has no parameter 'foo'; its parameters are: density, majority_sign_method, lam; "
        "method 'ties': density=1.5 is invalid (Input should be less than or equal to 1); density is the fraction "
        "of each task vector's entries kept; pass a value in (0, 1]; majority_sign_method='x' is invalid (Input "
        "should be 'total' or 'frequency'); majority_sign_method elects each entry's sign by summed mass ('total') "
        "or by vote count ('frequency'); weights has 1 value for 2 adapters; pass one weight per adapter or a mapping"
    )


def test_method_parameters_as_a_dict_or_keywords_never_both(two):
    a, b = two
    as_dict = ia3fuse.merge([a, b], [0.3, 0.7], "ties", params={"density": 0.5})
    as_keywords = ia3fuse.merge([a, b], [0.3, 0.7], "ties", density=0.5)
    assert all(torch.equal(as_dict.vectors[p], as_keywords.vectors[p]) for p in as_dict.vectors)
    assert as_dict.recipe.parameters == as_keywords.recipe.parameters
    with pytest.raises(InvalidParameterError) as caught:
        ia3fuse.merge([a, b], [0.3, 0.7], "ties", params={"density": 0.5}, density=0.4)
    assert str(caught.value) == (
        "method parameter(s) 'density' given both in params= and as keyword arguments; pass each once"
    )
    with pytest.raises(InvalidParameterError, match=r"params=\[\('density', 0\.5\)\] is not a mapping"):
        ia3fuse.merge([a, b], params=[("density", 0.5)])
