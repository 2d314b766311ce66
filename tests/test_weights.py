"""Weight schedules: per adapter, per module kind, per module (regex), over depth."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ia3fuse
from ia3fuse.errors import IA3FuseError, InvalidWeightsError
from ia3fuse.weights import KINDS, WeightSchedule, layer_positions, plan_weights

F64 = torch.float64
AB = ["a", "b"]
ABC = ["a", "b", "c"]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def weights_for(plan, path: str = "model.layers.0.mlp.down_proj", kind: str = "feedforward", depth=None):
    return plan.for_module(path, kind, depth)


def raises_weights(match_exact: str, weights, names=AB):
    with pytest.raises(InvalidWeightsError) as info:
        plan_weights(weights, names)
    assert str(info.value) == match_exact
    return info.value


# --- per-adapter lists and mappings -----------------------------------------------------------


def test_none_means_the_mean():
    plan = plan_weights(None, ABC)
    out = weights_for(plan)
    assert out.dtype == F64
    assert_close(out, t(1 / 3, 1 / 3, 1 / 3))
    assert plan.is_uniform
    assert_close(weights_for(plan_weights(None, AB), kind="attention", depth=0.7), t(0.5, 0.5))


def test_list_gives_one_weight_per_adapter_in_order():
    plan = plan_weights([0.2, 0.8], AB)
    assert_close(weights_for(plan), t(0.2, 0.8))
    assert plan.is_uniform
    # ints and tuples are accepted and turned into float64
    assert_close(weights_for(plan_weights((1, -2, 3), ABC)), t(1.0, -2.0, 3.0))


def test_mapping_is_matched_by_name_not_by_order():
    plan = plan_weights({"b": 0.8, "a": 0.2}, AB)
    assert_close(weights_for(plan), t(0.2, 0.8))


def test_mapping_with_an_unknown_name():
    raises_weights(
        "weights names no adapter 'c'; give one weight for each adapter: 'a', 'b'",
        {"a": 0.5, "b": 0.5, "c": 1.0},
    )


def test_mapping_with_a_missing_name():
    raises_weights("weights lacks 'b'; give one weight for each adapter: 'a', 'b'", {"a": 1.0})


def test_mapping_with_unknown_and_missing_names():
    raises_weights(
        "weights names no adapter 'x', 'y' and lacks 'b', 'c'; give one weight for each adapter: 'a', 'b', 'c'",
        {"a": 1.0, "x": 1.0, "y": 2.0},
        ABC,
    )


def test_empty_mapping_lacks_every_adapter():
    raises_weights("weights lacks 'a', 'b'; give one weight for each adapter: 'a', 'b'", {})


@pytest.mark.parametrize(
    "weights, names, message",
    [
        ([1.0], AB, "weights has 1 value for 2 adapters; pass one weight per adapter or a mapping"),
        ([1.0, 2.0, 3.0], AB, "weights has 3 values for 2 adapters; pass one weight per adapter or a mapping"),
        ([1.0, 2.0], ["a"], "weights has 2 values for 1 adapter; pass one weight per adapter or a mapping"),
        ([], AB, "weights has 0 values for 2 adapters; pass one weight per adapter or a mapping"),
    ],
)
def test_wrong_count_is_rejected_not_truncated(weights, names, message):
    raises_weights(message, weights, names)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([float("nan"), 1.0], "weights[0] is nan; weights must be finite numbers"),
        ([1.0, float("inf")], "weights[1] is inf; weights must be finite numbers"),
        ([1.0, float("-inf")], "weights[1] is -inf; weights must be finite numbers"),
        ({"a": 1.0, "b": float("nan")}, "weights['b'] is nan; weights must be finite numbers"),
        ([[0.0, float("nan")], 1.0], "weights[0] is nan; weights must be finite numbers"),
    ],
)
def test_nan_and_inf_are_rejected(weights, message):
    err = raises_weights(message, weights)
    assert isinstance(err, IA3FuseError)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([True, 1.0], "weights[0] is True; a weight is a number or a list of numbers (a depth gradient)"),
        (["0.5", 1.0], "weights[0] is '0.5'; a weight is a number or a list of numbers (a depth gradient)"),
        ([None, 1.0], "weights[0] is None; a weight is a number or a list of numbers (a depth gradient)"),
        ([[], 1.0], "weights[0] is an empty list; a depth gradient needs at least one number"),
        ("ab", "weights is 'ab'; pass one weight per adapter as a list, or a mapping adapter name -> weight"),
        (0.5, "weights is 0.5; pass one weight per adapter as a list, or a mapping adapter name -> weight"),
    ],
)
def test_values_that_are_not_weights(weights, message):
    raises_weights(message, weights)


def test_nested_list_inside_a_gradient_is_an_invalid_weights_error():
    with pytest.raises(
        InvalidWeightsError, match=r"weights\[0\] holds the list \[1.0\]; a depth gradient is a flat list of numbers"
    ):
        plan_weights([[0.5, [1.0]], 1.0], AB)


def test_adapter_named_like_a_schedule_key_is_a_per_adapter_mapping():
    plan = plan_weights({"default": 0.25, "other": 0.75}, ["default", "other"])
    assert_close(weights_for(plan), t(0.25, 0.75))
    assert_close(weights_for(plan_weights({"default": 0.3}, ["default"])), t(0.3))


# --- depth gradients ----------------------------------------------------------------------------


def test_two_anchor_gradient_is_interpolated_over_depth():
    plan = plan_weights([[0.0, 1.0], 0.5], AB)
    assert not plan.is_uniform
    assert_close(weights_for(plan, depth=0.0), t(0.0, 0.5))  # first anchor at the first layer
    assert_close(weights_for(plan, depth=0.5), t(0.5, 0.5))  # 0*(1-0.5) + 1*0.5
    assert_close(weights_for(plan, depth=1.0), t(1.0, 0.5))  # last anchor at the last layer
    assert_close(weights_for(plan, depth=0.25), t(0.25, 0.5))


def test_three_anchor_gradient_is_piecewise_linear():
    plan = plan_weights([[1.0, 0.0, 2.0], [0.2, 0.4, 0.6]], AB)
    # pos = t * 2; segment lo = floor(pos); value = a[lo]*(1-frac) + a[lo+1]*frac
    assert_close(weights_for(plan, depth=0.0), t(1.0, 0.2))
    assert_close(weights_for(plan, depth=0.25), t(0.5, 0.3))  # pos 0.5: (1+0)/2, (0.2+0.4)/2
    assert_close(weights_for(plan, depth=0.5), t(0.0, 0.4))  # pos 1: the middle anchor
    assert_close(weights_for(plan, depth=0.75), t(1.0, 0.5))  # pos 1.5: (0+2)/2, (0.4+0.6)/2
    assert_close(weights_for(plan, depth=1.0), t(2.0, 0.6))


def test_single_anchor_gradient_and_modules_outside_layers_use_the_first_value():
    plan = plan_weights([[0.7], [0.1, 0.9]], AB)
    assert_close(weights_for(plan, depth=0.6), t(0.7, 0.1 * 0.4 + 0.9 * 0.6))
    # a module with no layer index (depth None) gets the first anchor
    assert_close(weights_for(plan, path="lm_head", depth=None), t(0.7, 0.1))


def test_gradient_over_layer_positions_of_five_layers():
    paths = [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    depth = layer_positions(paths)
    plan = plan_weights({"a": [0.0, 1.0], "b": [1.0, 0.0]}, AB)
    got = torch.stack([plan.for_module(p, "feedforward", depth[p]) for p in paths])
    # t = i/4 -> a = t, b = 1 - t
    expected = torch.tensor([[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]], dtype=F64)
    assert_close(got, expected)


# --- layer_positions ----------------------------------------------------------------------------


def test_layer_positions_counts_encoder_and_decoder_separately():
    paths = [
        "encoder.block.0.layer.0.SelfAttention.k",
        "encoder.block.1.layer.1.DenseReluDense.wo",
        "encoder.block.2.layer.0.SelfAttention.v",
        "decoder.block.0.layer.0.SelfAttention.k",
        "decoder.block.1.layer.2.DenseReluDense.wo",
        "lm_head",
        "shared",
    ]
    assert layer_positions(paths) == {
        # encoder has 3 blocks (0..2), decoder 2 (0..1); the second number (layer.N) is ignored
        "encoder.block.0.layer.0.SelfAttention.k": 0.0,
        "encoder.block.1.layer.1.DenseReluDense.wo": 0.5,
        "encoder.block.2.layer.0.SelfAttention.v": 1.0,
        "decoder.block.0.layer.0.SelfAttention.k": 0.0,
        "decoder.block.1.layer.2.DenseReluDense.wo": 1.0,
        "lm_head": None,
        "shared": None,
    }


def test_layer_positions_compares_indices_as_numbers_and_single_layer_is_one():
    paths = ["model.layers.0.q", "model.layers.2.q", "model.layers.10.q", "vision.blocks.0.fc", "score"]
    assert layer_positions(paths) == {
        "model.layers.0.q": 0.0,
        "model.layers.2.q": 0.2,
        "model.layers.10.q": 1.0,
        "vision.blocks.0.fc": 1.0,  # a stack of one layer: t = 1, as mergekit
        "score": None,
    }
    assert layer_positions([]) == {}


def test_layer_positions_count_the_models_layers_when_known():
    """Offline, an adapter on layers 0-2 spreads over those 3 layers; with the model's 5, as mergekit."""
    paths = ["model.layers.0.q", "model.layers.1.q", "model.layers.2.q"]
    assert layer_positions(paths) == {"model.layers.0.q": 0.0, "model.layers.1.q": 0.5, "model.layers.2.q": 1.0}
    assert layer_positions(paths, {"model.layers": 5, "other": 7}) == {
        "model.layers.0.q": 0.0,
        "model.layers.1.q": 0.25,
        "model.layers.2.q": 0.5,
    }


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_live_merge_spreads_a_gradient_over_the_models_layers(tiny):
    """add_weighted_adapter knows the model: an adapter on layer 0 of 2 gets t = 0 there, as mergekit
    would; offline, the same adapter's one layer is a stack of one (t = 1)."""
    from peft import IA3Config, get_peft_model

    from ia3fuse.live import model_layers

    config = IA3Config(
        target_modules=r".*layers\.0\.self_attn\.(k_proj|v_proj)", feedforward_modules=[], init_ia3_weights=False
    )
    model = get_peft_model(tiny.fresh_base(), config, adapter_name="a")
    alone = ia3fuse.adapter_from_peft(model, "a")
    assert sorted(alone.vectors) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert model_layers(model.base_model.model, list(alone.vectors)) == {"model.layers": 2}
    k0 = "model.layers.0.self_attn.k_proj"
    live = ia3fuse.add_weighted_adapter(model, ["a"], [[0.0, 1.0]], "grad", combination_type="linear")
    assert torch.equal(live.vectors[k0], torch.zeros_like(alone.vectors[k0]))  # t = 0 of 2 layers: weight 0
    assert torch.equal(ia3fuse.merge([alone], [[0.0, 1.0]], "linear").vectors[k0], alone.vectors[k0])  # t = 1


# --- WeightSchedule: default / kinds / overrides ------------------------------------------------

SCHEDULE = WeightSchedule(
    default=[0.5, 0.5],
    kinds={"feedforward": [1.0, 0.0]},
    overrides=[(r"layers\.0\.", [0.0, 1.0]), (r"layers\.[01]\.", [0.3, 0.7])],
)
SCHEDULE_DICT = {
    "default": [0.5, 0.5],
    "kinds": {"feedforward": [1.0, 0.0]},
    "overrides": [
        {"filter": r"layers\.0\.", "weights": [0.0, 1.0]},
        {"filter": r"layers\.[01]\.", "weights": [0.3, 0.7]},
    ],
}
PRECEDENCE = [
    # (path, kind, expected)
    ("model.layers.2.self_attn.q_proj", "attention", (0.5, 0.5)),  # default
    ("model.layers.2.mlp.down_proj", "feedforward", (1.0, 0.0)),  # kind beats default
    ("model.layers.0.mlp.down_proj", "feedforward", (0.0, 1.0)),  # override beats kind
    ("model.layers.0.self_attn.k_proj", "attention", (0.0, 1.0)),  # override beats default
    ("model.layers.1.mlp.down_proj", "feedforward", (0.3, 0.7)),  # first matching override only
    ("lm_head", "other", (0.5, 0.5)),  # a kind with no entry falls back to default
]


@pytest.mark.parametrize("schedule", [SCHEDULE, SCHEDULE_DICT], ids=["WeightSchedule", "dict"])
@pytest.mark.parametrize("path, kind, expected", PRECEDENCE)
def test_schedule_precedence_override_then_kind_then_default(schedule, path, kind, expected):
    plan = plan_weights(schedule, AB)
    assert not plan.is_uniform
    assert_close(plan.for_module(path, kind, None), t(*expected))


def test_first_matching_override_wins_in_list_order():
    plan = plan_weights(WeightSchedule(overrides=[("mlp", [0.9, 0.1]), ("layers", [0.1, 0.9])]), AB)
    assert_close(plan.for_module("model.layers.3.mlp.up_proj", "feedforward", None), t(0.9, 0.1))
    assert_close(plan.for_module("model.layers.3.self_attn.v_proj", "attention", None), t(0.1, 0.9))


def test_override_filter_uses_search_not_match():
    plan = plan_weights({"overrides": [("down_proj$", [1.0, 0.0])]}, AB)
    assert_close(plan.for_module("model.layers.3.mlp.down_proj", "feedforward", None), t(1.0, 0.0))
    # no default given -> the mean
    assert_close(plan.for_module("model.layers.3.mlp.down_proj.x", "feedforward", None), t(0.5, 0.5))


def test_schedule_parts_accept_mappings_and_gradients():
    plan = plan_weights(
        WeightSchedule(
            default={"b": 1.0, "a": 0.0},
            kinds={"attention": {"a": [0.0, 1.0], "b": 0.5}},
        ),
        AB,
    )
    assert_close(plan.for_module("model.layers.0.mlp.up_proj", "feedforward", 0.5), t(0.0, 1.0))
    assert_close(plan.for_module("model.layers.0.self_attn.q_proj", "attention", 0.25), t(0.25, 0.5))


def test_schedule_without_default_uses_the_mean_outside_kinds():
    plan = plan_weights(WeightSchedule(kinds={"attention": [1.0, 0.0, 0.0]}), ABC)
    assert_close(plan.for_module("x.0.q", "attention", 0.0), t(1.0, 0.0, 0.0))
    assert_close(plan.for_module("x.0.w", "feedforward", 0.0), t(1 / 3, 1 / 3, 1 / 3))


def test_kinds_are_attention_and_feedforward():
    assert KINDS == ("attention", "feedforward")
    assert ia3fuse.WeightSchedule is WeightSchedule


@pytest.mark.parametrize(
    "schedule",
    [WeightSchedule(kinds={"mlp": [1.0, 0.0]}), {"kinds": {"mlp": [1.0, 0.0]}}],
    ids=["WeightSchedule", "dict"],
)
def test_unknown_kind_is_rejected(schedule):
    raises_weights("weights.kinds has unknown kind 'mlp'; valid kinds are attention, feedforward", schedule)


@pytest.mark.parametrize(
    "schedule",
    [WeightSchedule(overrides=[("(", [1.0, 0.0])]), {"overrides": [{"filter": "(", "weights": [1.0, 0.0]}]}],
    ids=["WeightSchedule", "dict"],
)
def test_bad_regex_is_rejected(schedule):
    with pytest.raises(InvalidWeightsError) as info:
        plan_weights(schedule, AB)
    msg = str(info.value)
    assert msg.startswith("weights.overrides[0] filter '(' is not a valid regular expression (")
    assert "missing ), unterminated subpattern" in msg
    assert msg.endswith("); fix the pattern")


@pytest.mark.parametrize("item", [("x",), {"filter": "x"}, {"regex": "x", "weights": [1, 0]}, "x"])
def test_malformed_override_is_rejected(item):
    raises_weights(
        f"weights.overrides[0] is {item!r}; each override is {{filter: REGEX, weights: [...]}} or a (regex, weights) pair",
        {"overrides": [item]},
    )


def test_errors_inside_a_schedule_name_where_they_are():
    raises_weights(
        "weights.default has 1 value for 2 adapters; pass one weight per adapter or a mapping",
        {"default": [1.0]},
    )
    raises_weights(
        "weights.kinds['feedforward'] has 3 values for 2 adapters; pass one weight per adapter or a mapping",
        WeightSchedule(kinds={"feedforward": [1.0, 0.0, 0.0]}),
    )
    raises_weights(
        "weights.overrides[1] ('mlp') has 1 value for 2 adapters; pass one weight per adapter or a mapping",
        WeightSchedule(overrides=[("attn", [0.5, 0.5]), ("mlp", [1.0])]),
    )
    raises_weights(
        "weights.kinds['attention']['b'] is nan; weights must be finite numbers",
        WeightSchedule(kinds={"attention": {"a": 1.0, "b": float("nan")}}),
    )
    raises_weights(
        "weights.kinds is [1.0, 0.0]; pass a mapping kind -> weights, kinds are attention, feedforward",
        WeightSchedule(kinds=[1.0, 0.0]),  # type: ignore[arg-type]
    )
