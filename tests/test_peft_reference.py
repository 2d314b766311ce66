"""ia3fuse against PEFT's own computation, on tiny llama / gpt2 / t5 / bert models.

The reference is always PEFT in the same process: its ``add_weighted_adapter``, its forward
pass with one or several adapters active, and (for saved adapters) the vectors applied by hand
with forward hooks on a fresh copy of the base model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import ia3fuse
from ia3fuse import AdapterFormatError, IA3Adapter, IA3FuseError, adapter_from_peft, load_adapter, merge

NAMES = ["a", "b", "c"]
WEIGHTS = [0.5, 0.3, 0.4]
OTHER_WEIGHTS = [0.2, 0.9, -0.4]
LIVE_METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.5, "seed": 3}),
    ("svd", {}),
    ("breadcrumbs", {}),
    ("magnitude_prune", {}),
]


# ---------------------------------------------------------------- helpers


def peft_with(tiny: Any, paths: Sequence[Path], names: Sequence[str] = NAMES) -> PeftModel:
    """A PeftModel on a fresh base with ``paths`` loaded as ``names``; the first one is active."""
    model = PeftModel.from_pretrained(tiny.fresh_base(), str(paths[0]), adapter_name=names[0])
    for path, name in zip(paths[1:], names[1:]):
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


def peft_from_dir(tiny: Any, path: Path) -> PeftModel:
    return PeftModel.from_pretrained(tiny.fresh_base(), str(path)).eval()


def assert_same_vectors(got: IA3Adapter, want: IA3Adapter) -> None:
    """Same modules, shapes, dtypes, feed-forward flags and bit-identical values."""
    assert sorted(got.vectors) == sorted(want.vectors)
    assert got.feedforward == want.feedforward
    for path, vec in want.vectors.items():
        assert got.vectors[path].dtype == vec.dtype, path
        assert got.vectors[path].shape == vec.shape, path
        assert torch.equal(got.vectors[path], vec), path


def hand_applied(tiny: Any, adapter: IA3Adapter) -> torch.nn.Module:
    """A fresh base model with ``adapter``'s vectors applied by forward hooks, as IA3 defines them.

    Output-side: ``y = f(x) * l``; feed-forward: ``y = f(x * l)``. Which modules are feed-forward
    comes from the architecture (PEFT's defaults), not from ia3fuse.
    """
    model = tiny.fresh_base()
    for path, vec in adapter.vectors.items():
        module = model.get_submodule(path)
        scale = vec.detach().flatten()
        if tiny.is_feedforward(path):
            assert vec.shape == (1, scale.numel()), path
            module.register_forward_pre_hook(lambda mod, args, s=scale: (args[0] * s, *args[1:]))
        else:
            assert vec.shape == (scale.numel(), 1), path
            module.register_forward_hook(lambda mod, args, out, s=scale: out * s)
    return model


def assert_changes_output(tiny: Any, out: torch.Tensor) -> None:
    """Sanity: the adapter under test really changes the model's output."""
    assert not torch.allclose(out, tiny.run(tiny.model), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- (a) linear + zero fill == PEFT


@pytest.mark.parametrize("weights", [[0.3, 0.5, 0.7], [1.25, -0.6, 0.35]], ids=["positive", "mixed-sign"])
def test_linear_zero_fill_equals_peft_add_weighted_adapter_bit_for_bit(tiny, weights):
    model = peft_with(tiny, tiny.adapters)
    model.add_weighted_adapter(NAMES, weights, "peft_fused")
    reference = adapter_from_peft(model, "peft_fused")

    ours = merge(list(tiny.adapters), weights, method="linear", missing="zero")

    assert_same_vectors(ours, reference)
    # The third adapter lacks the feed-forward modules: the zero fill is really exercised.
    partial = set(load_adapter(tiny.adapters[2]).vectors)
    feedforward = {p for p in ours.vectors if tiny.is_feedforward(p)}
    assert feedforward and not partial & feedforward
    assert partial < set(ours.vectors)


def test_linear_identity_fill_differs_from_peft_only_where_an_adapter_is_missing(tiny):
    model = peft_with(tiny, tiny.adapters)
    model.add_weighted_adapter(NAMES, WEIGHTS, "peft_fused")
    reference = adapter_from_peft(model, "peft_fused")

    ours = merge(list(tiny.adapters), WEIGHTS, method="linear", missing="identity")

    partial = set(load_adapter(tiny.adapters[2]).vectors)
    for path, vec in reference.vectors.items():
        if path in partial:
            assert torch.equal(ours.vectors[path], vec), path
        else:  # PEFT counted the missing vector as 0; identity counts it as 1 * weight
            torch.testing.assert_close(ours.vectors[path], vec + WEIGHTS[2], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (b) saved adapter in PEFT == hand-applied vectors


@pytest.mark.parametrize(
    "method, params",
    [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("geometric", {})],
    ids=["task_arithmetic", "ties", "geometric"],
)
def test_saved_fusion_loaded_by_peft_equals_vectors_applied_by_hand(tiny, tmp_path, method, params):
    fused = merge(list(tiny.adapters), WEIGHTS, method=method, **params)
    saved = fused.save(tmp_path / "fused")

    model = peft_from_dir(tiny, saved)
    # PEFT put every vector on the right module, on the right side, unchanged.
    assert_same_vectors(adapter_from_peft(model, "default"), fused)
    got = tiny.run(model)

    want = tiny.run(hand_applied(tiny, fused))
    torch.testing.assert_close(got, want)
    assert_changes_output(tiny, want)


# ---------------------------------------------------------------- (c) geometric, weights 1 == PEFT multi-active


def test_geometric_with_unit_weights_equals_peft_with_all_adapters_active(tiny, tmp_path):
    multi = peft_with(tiny, tiny.adapters)
    single = tiny.run(multi)  # only "a" active
    multi.base_model.set_adapter(NAMES)
    assert multi.active_adapters == NAMES
    want = tiny.run(multi)
    assert not torch.allclose(want, single, rtol=1e-3, atol=1e-4)  # all three really act

    fused = merge(list(tiny.adapters), [1, 1, 1], method="geometric")
    got = tiny.run(peft_from_dir(tiny, fused.save(tmp_path / "geometric")))

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- (d) disjoint modules + identity fill


def test_identity_fill_of_disjoint_adapters_equals_peft_with_both_active(tiny, tmp_path):
    first = load_adapter(tiny.attention_only)
    second = load_adapter(tiny.feedforward_only)
    assert first.vectors and second.vectors and not set(first.vectors) & set(second.vectors)

    fused = merge([tiny.attention_only, tiny.feedforward_only], [1, 1], method="task_arithmetic", missing="identity")

    assert sorted(fused.vectors) == sorted([*first.vectors, *second.vectors])
    for only in (first, second):
        for path, vec in only.vectors.items():
            assert fused.feedforward[path] == only.feedforward[path], path
            # 1 + ((l - 1) * 1 + 0 * 1) in float32: exact for l in [0.5, 2]; below 0.5 the one
            # rounding of l - 1 is at most 2**-25 (half an ulp of numbers in [0.5, 1)).
            torch.testing.assert_close(fused.vectors[path], vec, rtol=0, atol=2**-25)

    both = peft_with(tiny, [tiny.attention_only, tiny.feedforward_only], ["attn", "ff"])
    both.base_model.set_adapter(["attn", "ff"])
    want = tiny.run(both)
    got = tiny.run(peft_from_dir(tiny, fused.save(tmp_path / "disjoint")))

    torch.testing.assert_close(got, want)
    assert_changes_output(tiny, want)


# ---------------------------------------------------------------- (e) live path == offline merge


@pytest.mark.parametrize("method, params", LIVE_METHODS, ids=[m for m, _ in LIVE_METHODS])
def test_live_add_weighted_adapter_equals_offline_merge(tiny, method, params):
    model = peft_with(tiny, tiny.adapters)

    returned = ia3fuse.add_weighted_adapter(model, NAMES, WEIGHTS, "fused", combination_type=method, **params)

    offline = merge(list(tiny.adapters), WEIGHTS, method=method, **params)
    assert_same_vectors(adapter_from_peft(model, "fused"), offline)
    assert_same_vectors(returned, offline)
    assert model.active_adapters == ["a"]
    # The fused vectors are not just one of the inputs.
    first = load_adapter(tiny.adapters[0])
    assert any(not torch.equal(offline.vectors[p], first.vectors[p]) for p in first.vectors)


def test_live_add_weighted_adapter_refuses_existing_name_and_overwrites_on_request(tiny, tmp_path):
    model = peft_with(tiny, tiny.adapters)
    ia3fuse.add_weighted_adapter(model, NAMES, WEIGHTS, "fused", combination_type="ties", density=0.5)
    first = adapter_from_peft(model, "fused")
    assert_same_vectors(first, merge(list(tiny.adapters), WEIGHTS, method="ties", density=0.5))

    with pytest.raises(IA3FuseError) as excinfo:
        ia3fuse.add_weighted_adapter(model, NAMES, OTHER_WEIGHTS, "fused", combination_type="task_arithmetic")
    assert str(excinfo.value) == (
        "an adapter named 'fused' already exists; pass overwrite=True to replace it, or another adapter_name"
    )
    assert_same_vectors(adapter_from_peft(model, "fused"), first)  # refused: nothing changed
    assert model.active_adapters == ["a"]

    ia3fuse.add_weighted_adapter(
        model, NAMES, OTHER_WEIGHTS, "fused", combination_type="task_arithmetic", overwrite=True
    )
    offline = merge(list(tiny.adapters), OTHER_WEIGHTS, method="task_arithmetic")
    assert_same_vectors(adapter_from_peft(model, "fused"), offline)
    assert model.active_adapters == ["a"]
    assert sorted(model.peft_config) == ["a", "b", "c", "fused"]

    model.set_adapter("fused")
    got = tiny.run(model)
    want = tiny.run(peft_from_dir(tiny, offline.save(tmp_path / "offline")))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_changes_output(tiny, want)


def test_live_add_weighted_adapter_keeps_several_active_adapters(tiny):
    model = peft_with(tiny, tiny.adapters)
    model.base_model.set_adapter(["a", "c"])
    want = tiny.run(model)

    ia3fuse.add_weighted_adapter(model, NAMES, WEIGHTS, "fused", combination_type="task_arithmetic")

    assert model.active_adapters == ["a", "c"]
    torch.testing.assert_close(tiny.run(model), want, rtol=0, atol=0)


def test_live_overwrite_of_the_active_fused_adapter_keeps_it_active_with_new_vectors(tiny, tmp_path):
    model = peft_with(tiny, tiny.adapters)
    ia3fuse.add_weighted_adapter(model, NAMES, WEIGHTS, "fused", combination_type="task_arithmetic")
    model.set_adapter("fused")
    before = tiny.run(model)

    ia3fuse.add_weighted_adapter(model, NAMES, OTHER_WEIGHTS, "fused", combination_type="svd", overwrite=True)

    assert model.active_adapters == ["fused"]
    offline = merge(list(tiny.adapters), OTHER_WEIGHTS, method="svd")
    assert_same_vectors(adapter_from_peft(model, "fused"), offline)
    got = tiny.run(model)
    want = tiny.run(peft_from_dir(tiny, offline.save(tmp_path / "offline")))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, before, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- (f) loading and saving


def test_load_save_load_round_trip_is_exact(tiny, tmp_path):
    for i, path in enumerate(tiny.adapters):
        original = load_adapter(path)
        assert original.state_dict().keys() == load_file(str(path / "adapter_model.safetensors")).keys()

        again = load_adapter(original.save(tmp_path / f"copy{i}"))

        assert again.config == original.config
        assert again.config == json.loads((path / "adapter_config.json").read_text())
        assert_same_vectors(again, original)
        assert again.extras.keys() == original.extras.keys()
        saved = load_file(str(tmp_path / f"copy{i}" / "adapter_model.safetensors"))
        raw = load_file(str(path / "adapter_model.safetensors"))
        assert saved.keys() == raw.keys()
        assert all(torch.equal(saved[k], raw[k]) for k in raw)


def test_saved_directory_holds_peft_files_and_a_model_card_with_the_recipe(tiny, tmp_path):
    fused = merge(list(tiny.adapters), WEIGHTS, method="ties", density=0.5)
    out = fused.save(tmp_path / "fused")

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (out / "README.md").read_text()
    assert "method: ties" in card
    assert "density: 0.5" in card
    assert PeftConfig.from_pretrained(str(out)).peft_type.value == "IA3"
    again = load_adapter(out)
    assert_same_vectors(again, fused)
    assert again.config == fused.config


def test_lora_adapter_directory_is_rejected_as_not_ia3(tiny, tmp_path):
    lora = get_peft_model(tiny.fresh_base(), LoraConfig(r=2, target_modules=tiny.attention_modules))
    lora.save_pretrained(str(tmp_path / "lora"))
    path = str(tmp_path / "lora")

    with pytest.raises(AdapterFormatError) as excinfo:
        load_adapter(path)
    assert str(excinfo.value) == (
        f"{path!r} is a LORA adapter, not IA3 (peft_type='LORA'); ia3fuse fuses IA3 adapters only"
    )
    with pytest.raises(AdapterFormatError, match="not IA3"):
        merge([tiny.adapters[0], path], [0.5, 0.5])


def test_pickle_only_directory_needs_allow_pickle(tiny, tmp_path):
    source = tiny.adapters[0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(source / "adapter_config.json", legacy / "adapter_config.json")
    torch.save(load_file(str(source / "adapter_model.safetensors")), legacy / "adapter_model.bin")

    with pytest.raises(AdapterFormatError) as excinfo:
        load_adapter(legacy)
    assert str(excinfo.value) == (
        f"{str(legacy)!r} holds only adapter_model.bin, a pickle file that can run code when loaded; "
        "pass allow_pickle=True (--allow-pickle) if you trust it (it is then read with weights_only=True)"
    )
    with pytest.raises(AdapterFormatError, match="allow_pickle"):
        merge([source, legacy], [0.5, 0.5])

    loaded = load_adapter(legacy, allow_pickle=True)
    original = load_adapter(source)
    assert loaded.config == original.config
    assert_same_vectors(loaded, original)
    fused = merge([source, legacy], [0.5, 0.5], method="task_arithmetic", allow_pickle=True)
    assert_same_vectors(fused, merge([source, source], [0.5, 0.5], method="task_arithmetic"))


def test_overwrite_the_first_input_adapter(tmp_path):
    """Replacing adapters[0] itself: the template config is taken before the delete."""
    from peft import PeftModel

    from factories import random_ia3_adapter, tiny_model

    base = tiny_model("llama")
    a = random_ia3_adapter(base, tmp_path / "a", seed=1)
    b = random_ia3_adapter(base, tmp_path / "b", seed=2)
    model = PeftModel.from_pretrained(base, str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    fused = ia3fuse.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "a", overwrite=True)
    offline = ia3fuse.merge([a, b], [0.5, 0.5])
    assert sorted(model.peft_config) == ["a", "b"]
    live = ia3fuse.adapter_from_peft(model, "a").vectors
    assert all(torch.equal(live[p], v) and torch.equal(fused.vectors[p], v) for p, v in offline.vectors.items())


def test_live_fused_vectors_keep_the_adapters_dtype_on_a_bf16_base(tmp_path):
    """PEFT would store the new vectors in the base layer's bf16; we keep the inputs' float32."""
    from peft import PeftModel

    from factories import random_ia3_adapter, tiny_model

    base = tiny_model("llama")
    a = random_ia3_adapter(base, tmp_path / "a", seed=1)
    b = random_ia3_adapter(base, tmp_path / "b", seed=2)
    model = PeftModel.from_pretrained(base.to(torch.bfloat16), str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    ia3fuse.add_weighted_adapter(model, ["a", "b"], [0.3, 0.7], "fused")
    live = ia3fuse.adapter_from_peft(model, "fused").vectors
    offline = ia3fuse.merge([a, b], [0.3, 0.7]).vectors
    assert {v.dtype for v in live.values()} == {torch.float32}
    assert all(torch.equal(live[p], v) for p, v in offline.items())
