"""Weight search (`ia3fuse.search`): it finds the weights that explain the data, its recipe
reproduces its adapter, its pieces (MethodForm, ScaleHooks, batches) agree with merge and PEFT,
and it refuses bad input with a precise message, leaving the model as it found it.

Everything runs on tiny models built from configs, once per module; budgets are at most 120
forward passes of 8 examples, so the file runs in seconds on two cores.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from peft import PeftModel
from torch import Tensor

from cli_runner import run_cli
from ia3fuse import IA3Adapter, WeightSchedule, load_adapter, merge
from ia3fuse._runtime import torch_threads
from ia3fuse.errors import (
    DataError,
    IA3FuseError,
    IncompatibleAdaptersError,
    InvalidParameterError,
    MethodInputError,
    UnknownMethodError,
)
from factories import random_ia3_adapter, save_tiny_model, tiny_model, tiny_tokenizer
from ia3fuse.fusion import get_method, method_names
from ia3fuse.merging import run_recipe
from ia3fuse.recipe import load_recipe
from ia3fuse.scaling import ScaleHooks, TaskStack
from ia3fuse.search import SEARCHABLE_METHODS, load_model, make_batches, search_weights
from ia3fuse.search.optim import run_cma
from ia3fuse.search.space import MethodForm, WeightSpace

BUDGET = 120  # forward passes over 2 batches: 60 Adam steps, or 60 CMA-ES candidates
LAYER_RE = {0: r"^model\.layers\.0\.", 1: r"^model\.layers\.1\."}

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # PEFT on GPT-2


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny forwards: torch's thread pool only adds latency (and contention on 2 cores)
    with torch_threads(1):
        yield


# --------------------------------------------------------------------------- helpers


def _logits(model: Any, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft(base: Any, adapter_dir: Path) -> Any:
    """``base`` (a deep copy of it) with the adapter applied by PEFT itself."""
    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def _greedy_batches(teacher: Any, ids: Tensor, rows: int = 8) -> list[dict[str, Tensor]]:
    """Ready batches whose labels are the teacher's greedy next tokens, shifted right."""
    pred = _logits(teacher, ids).argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = pred[:, :-1]
    return [{"input_ids": ids[i : i + rows], "labels": labels[i : i + rows]} for i in range(0, len(ids), rows)]


def _mean_loss(model: Any, batches: list[dict[str, Tensor]]) -> float:
    """Each batch's mean loss weighted by its rows: every example counts once."""
    rows = [len(b["input_ids"]) for b in batches]
    with torch.no_grad():
        return sum(float(model(**b).loss) * n for b, n in zip(batches, rows)) / sum(rows)


def _hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@dataclass
class ModelState:
    """What a search must leave as it found it."""

    logits: Tensor
    training: list[bool]
    requires_grad: list[bool]
    params: dict[str, Tensor]

    @classmethod
    def of(cls, model: Any, ids: Tensor) -> "ModelState":
        training = [m.training for m in model.modules()]
        model.eval()
        logits = _logits(model, ids)
        for m, flag in zip(model.modules(), training):
            m.training = flag
        return cls(
            logits,
            training,
            [p.requires_grad for p in model.parameters()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
        )

    def assert_same(self, model: Any, ids: Tensor, targets: list[str]) -> None:
        assert [m.training for m in model.modules()] == self.training
        assert [p.requires_grad for p in model.parameters()] == self.requires_grad
        assert all(p.grad is None for p in model.parameters())
        for path in targets:
            module = model.get_submodule(path)
            assert not module._forward_hooks and not module._forward_pre_hooks, path
        assert _hooks(model) == 0
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in self.params.items())
        training = [m.training for m in model.modules()]
        model.eval()
        assert torch.equal(_logits(model, ids), self.logits)
        for m, flag in zip(model.modules(), training):
            m.training = flag


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class World:
    """A tiny llama with peaked predictions, adapters a, b (all modules) and c (attention only),
    and ready batches labeled by teachers: a, b, and a layer-wise mix (layer 0 = a, layer 1 = b)."""

    root: Path
    base: Any
    a: Path
    b: Path
    c: Path
    ids: Tensor
    batches: dict[str, list[dict[str, Tensor]]]

    @property
    def targets(self) -> list[str]:
        return list(load_adapter(self.a).vectors)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("search")
    # std 0.5 instead of 0.02: peaked next-token distributions, so adapters change the argmax
    base = tiny_model("llama", 0, initializer_range=0.5)
    a = random_ia3_adapter(base, root / "a", seed=1, spread=0.5)
    b = random_ia3_adapter(base, root / "b", seed=2, spread=0.5)
    c = random_ia3_adapter(base, root / "c", seed=3, spread=0.5, target_modules=["k_proj", "v_proj"])
    schedule = WeightSchedule(default=[0.5, 0.5], overrides=[(LAYER_RE[0], [1.0, 0.0]), (LAYER_RE[1], [0.0, 1.0])])
    merge({"a": a, "b": b}, schedule, "task_arithmetic", name="mixed").save(root / "mixed")
    ids = torch.randint(3, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    batches = {name: _greedy_batches(_peft(base, root / name), ids) for name in ("a", "b", "mixed")}
    return World(root, base, a, b, c, ids, batches)


@pytest.fixture(scope="module")
def searched(world: World) -> Callable[..., Any]:
    """search_weights over {a, b} on a teacher's batches, each distinct call run once."""
    cache: dict[Any, Any] = {}

    def run(teacher: str, optimizer: str = "adam", granularity: str = "task", **kwargs: Any) -> Any:
        key = (teacher, optimizer, granularity, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = search_weights(
                world.base,
                {"a": world.a, "b": world.b},
                world.batches[teacher],
                optimizer=optimizer,
                granularity=granularity,
                budget=BUDGET,
                lr=0.1,
                **kwargs,
            )
        return cache[key]

    return run


# --------------------------------------------------------------------------- 1. dominance


def test_teachers_disagree(world: World) -> None:
    # precondition of the dominance tests: the two adapters predict different tokens
    la = torch.cat([b["labels"][:, 1:] for b in world.batches["a"]])
    lb = torch.cat([b["labels"][:, 1:] for b in world.batches["b"]])
    base = _logits(world.base, world.ids).argmax(-1)[:, :-1]
    assert (la == lb).float().mean() < 0.2
    assert (la == base).float().mean() < 0.3


@pytest.mark.parametrize("optimizer", ["adam", "cma"])
@pytest.mark.parametrize("teacher, other", [("a", "b"), ("b", "a")])
def test_the_teachers_adapter_dominates(searched: Callable[..., Any], optimizer: str, teacher: str, other: str) -> None:
    result = searched(teacher, optimizer)
    assert result.names == ["a", "b"] and result.groups == ["all"] and result.weights.shape == (2, 1)
    (w_teacher,), (w_other,) = result.weight_of(teacher), result.weight_of(other)
    assert w_teacher > w_other + 0.7, result.weights_table()
    assert 0.85 < w_teacher < 1.15 and abs(w_other) < 0.15  # the teacher is a alone: weights (1, 0)
    assert result.final_objective < 0.4 * result.initial_objective
    assert result.optimizer == optimizer and result.objective == "loss" and result.granularity == "task"


def test_history_and_budget(searched: Callable[..., Any]) -> None:
    adam = searched("a", "adam")
    assert len(adam.history) == BUDGET // 2 and adam.forwards == BUDGET
    assert [h["forwards"] for h in adam.history] == list(range(2, BUDGET + 1, 2))
    cma = searched("a", "cma")
    # the start, 9 generations of 6 (the default population for 2 weights), then 5 candidates of a
    # 10th that does not fit whole: 60 candidates of 2 passes
    assert len(cma.history) == 1 + 9 * 6 + 5 and cma.forwards == BUDGET
    assert [h["forwards"] for h in cma.history] == list(range(2, BUDGET + 1, 2))
    for result in (adam, cma):
        assert result.budget == BUDGET and result.stopped == "" and result.passes() == "120 of 120 forward passes"
        assert result.summary()["budget"] == BUDGET
    for result in (adam, cma):
        running = float("inf")
        for h in result.history:
            assert h["penalized"] == h["objective"]  # no L1 term
            running = min(running, h["penalized"])
            assert h["best"] == running
        assert result.initial_objective == result.history[0]["objective"]
        # the final objective is that of the merged adapter, which equals the best point's
        assert result.final_objective == pytest.approx(result.history[-1]["best"], rel=1e-5)


def _bowl(theta: Tensor, grad: bool) -> tuple[float, float, None]:
    value = float(((theta - 0.3) ** 2).sum())
    return value, value, None


def test_cma_spends_the_budget_in_whole_candidates() -> None:
    # 40 passes at 3 per candidate (3 batches): 40 // 3 = 13 candidates, 39 passes: the start, two
    # generations of 5, and 2 candidates of a third (whole generations alone would stop at 33)
    trace = run_cma(_bowl, torch.zeros(2), budget=40, cost=3, popsize=5)
    assert trace.forwards == 39 and trace.stopped == ""
    assert [h["forwards"] for h in trace.history] == [3 * i for i in range(1, 14)]


def test_cma_that_stops_itself_before_the_budget_says_why() -> None:
    trace = run_cma(lambda theta, grad: (1.0, 1.0, None), torch.zeros(2), budget=300, cost=3)  # flat: converges
    assert trace.stopped.startswith("CMA-ES stopped itself: ") and len(trace.stopped) > len("CMA-ES stopped itself: ")
    assert trace.forwards < 300 - 3 and trace.forwards % 3 == 0


def test_passes_says_what_was_spent_of_the_budget(searched: Callable[..., Any]) -> None:
    result = searched("a", "adam")
    assert (
        dataclasses.replace(result, forwards=117, budget=118).passes()
        == "117 of 118 forward passes (2 per evaluation: one per batch)"
    )
    assert (
        dataclasses.replace(result, forwards=20, stopped="CMA-ES stopped itself: tolfun").passes()
        == "20 of 120 forward passes (CMA-ES stopped itself: tolfun)"
    )
    assert dataclasses.replace(result, forwards=1, budget=None).passes() == "1 forward pass"


def test_objectives_are_peft_losses(world: World, searched: Callable[..., Any], tmp_path: Path) -> None:
    result = searched("a", "adam")
    batches = world.batches["a"]
    merge({"a": world.a, "b": world.b}, [0.5, 0.5], "task_arithmetic").save(tmp_path / "start")
    assert result.initial_objective == pytest.approx(
        _mean_loss(_peft(world.base, tmp_path / "start"), batches), rel=1e-5
    )
    result.adapter.save(tmp_path / "found")
    assert result.final_objective == pytest.approx(_mean_loss(_peft(world.base, tmp_path / "found"), batches), rel=1e-5)
    again = merge({"a": world.a, "b": world.b}, result.schedule, "task_arithmetic")
    assert all(torch.equal(again.vectors[p], v) for p, v in result.adapter.vectors.items())


# --------------------------------------------------------------------------- 2. layer-wise


def test_layer_wise_beats_task_wise_when_layers_disagree(searched: Callable[..., Any]) -> None:
    task = searched("mixed", "adam", "task")
    layer = searched("mixed", "adam", "layer")
    assert layer.groups == ["model.layers.0", "model.layers.1"]
    assert layer.forwards == task.forwards == BUDGET
    assert layer.initial_objective == pytest.approx(task.initial_objective, rel=1e-6)
    assert layer.final_objective < task.final_objective - 0.5
    (a0, a1), (b0, b1) = layer.weight_of("a"), layer.weight_of("b")
    assert a0 > b0 + 0.5  # layer 0 came from a
    assert b1 > a1 + 0.3  # layer 1 came from b


def test_l1_penalty_and_bounds(searched: Callable[..., Any]) -> None:
    pen = searched("a", "adam", l1=0.2)
    first = pen.history[0]
    assert first["penalized"] == pytest.approx(first["objective"] + 0.2 * 0.5, rel=1e-6)
    boxed = searched("a", "adam", bounds=(0.0, 0.3))
    assert boxed.weights.min() >= 0.0 and boxed.weights.max() <= 0.3
    assert boxed.weight_of("a") == [0.3] and boxed.weight_of("b") == [0.0]
    cma_box = searched("a", "cma", bounds=(-0.2, 0.4))
    assert cma_box.weights.min() >= -0.2 and cma_box.weights.max() <= 0.4


# --------------------------------------------------------------------------- 3. reproducibility


@pytest.mark.parametrize("optimizer", ["adam", "cma"])
def test_same_seed_same_search(world: World, searched: Callable[..., Any], optimizer: str) -> None:
    first = searched("a", optimizer)
    again = search_weights(
        world.base, {"a": world.a, "b": world.b}, world.batches["a"], optimizer=optimizer, budget=BUDGET, lr=0.1
    )
    assert torch.equal(first.weights, again.weights)
    assert first.history == again.history
    assert all(torch.equal(first.adapter.vectors[p], v) for p, v in again.adapter.vectors.items())


def test_cma_seeds_differ(searched: Callable[..., Any]) -> None:
    zero, one = searched("a", "cma"), searched("a", "cma", seed=1)
    assert zero.history[0] == one.history[0]  # the same starting point
    assert [h["objective"] for h in zero.history[1:]] != [h["objective"] for h in one.history[1:]]
    assert not torch.equal(zero.weights, one.weights)


# --------------------------------------------------------------------------- 4. recipe


def _equal_adapters(x: IA3Adapter, y: IA3Adapter) -> bool:
    return list(x.vectors) == list(y.vectors) and all(
        x.vectors[p].dtype == y.vectors[p].dtype and torch.equal(x.vectors[p], y.vectors[p]) for p in x.vectors
    )


RECIPE_CASES = [
    ("task", "task_arithmetic", {}),
    ("layer", "task_arithmetic", {}),
    ("module", "task_arithmetic", {}),
    ("layer", "ties", {"density": 0.5}),
    ("module", "ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("module", "dare_ties", {"density": 0.5, "seed": 3}),
]


@pytest.mark.parametrize("granularity, method, params", RECIPE_CASES, ids=lambda v: str(v))
def test_recipe_reproduces_the_adapter(
    world: World, tmp_path: Path, granularity: str, method: str, params: dict
) -> None:
    result = search_weights(
        world.base,
        [world.a, world.b, world.c],
        world.batches["mixed"],
        granularity=granularity,
        method=method,
        budget=20,
        lr=0.1,
        **params,
    )
    assert result.method == method and result.names == ["a", "b", "c"]
    assert result.params == get_method(method).validate(params)  # dare_ties: the search's seed seeds the drops
    out = result.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "objective.png",
        "recipe.yaml",
        "search.json",
        "weights.md",
        "weights.png",
    ]
    assert (out / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "search.json").read_text())
    assert summary["weights"] == result.weights.tolist() and summary["method"] == method
    assert summary["final_objective"] == result.final_objective and len(summary["history"]) == 10
    fused = load_adapter(out / "adapter")
    assert _equal_adapters(fused, result.adapter)
    again = run_recipe(load_recipe(out / "recipe.yaml"), output=tmp_path / "again")
    assert _equal_adapters(load_adapter(again), fused)
    # the search moved off the uniform start, and per group, so the schedule is exercised
    assert len(result.groups) == {"task": 1, "layer": 2, "module": 4}[granularity]
    assert not torch.equal(result.weights, torch.full_like(result.weights, 1 / 3))
    if granularity != "task":
        assert not torch.equal(result.weights[:, 0], result.weights[:, -1])


def test_recipe_with_relative_adapter_paths(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(world.root)
    result = search_weights(world.base, ["a", "b"], world.batches["mixed"], granularity="layer", budget=4, lr=0.2)
    out = result.save(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    again = run_recipe(load_recipe(out / "recipe.yaml"), output=tmp_path / "again")
    assert _equal_adapters(load_adapter(again), result.adapter)


def test_cli_merge_reproduces_the_adapter(world: World, tmp_path: Path) -> None:
    result = search_weights(
        world.base,
        [world.a, world.b, world.c],
        world.batches["mixed"],
        granularity="module",
        method="ties",
        density=0.5,
        budget=6,
        lr=0.2,
    )
    out = result.save(tmp_path / "out")
    done = run_cli("merge", out / "recipe.yaml", "-o", tmp_path / "cli")
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "cli") in done.stdout
    assert _equal_adapters(load_adapter(tmp_path / "cli"), result.adapter)


# --------------------------------------------------------------------------- 5. MethodForm


PARAMS = {
    "linear": {},
    "geometric": {},
    "task_arithmetic": {"lam": 0.8},
    "magnitude_prune": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "dare_linear": {"density": 0.5, "seed": 5},
    "svd": {"svd_rank": 1},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 5, "majority_sign_method": "frequency"},
}


@pytest.fixture(scope="module")
def form_stack(tmp_path_factory: pytest.TempPathFactory) -> list[IA3Adapter]:
    """Three adapters on a tiny llama: a also scales lm_head (outside the layers), c lacks v_proj."""
    root = tmp_path_factory.mktemp("form")
    base = tiny_model("llama", 0)
    paths = [
        random_ia3_adapter(
            base,
            root / "a",
            seed=1,
            spread=0.2,
            target_modules=["k_proj", "v_proj", "down_proj", "lm_head"],
            feedforward_modules=["down_proj"],
        ),
        random_ia3_adapter(base, root / "b", seed=2, spread=0.2),
        random_ia3_adapter(
            base,
            root / "c",
            seed=3,
            spread=0.2,
            target_modules=["k_proj", "down_proj"],
            feedforward_modules=["down_proj"],
        ),
    ]
    return [load_adapter(p) for p in paths]


def _form_vs_merge(adapters: list[IA3Adapter], method: str, granularity: str, seed: int) -> tuple[Tensor, Tensor]:
    stack = TaskStack(adapters)
    space = WeightSpace(stack, granularity)
    params = get_method(method).validate(PARAMS[method])
    theta = torch.rand(space.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.6 - 0.3
    per_entry = space.expand(theta).float()
    form = MethodForm(stack, method, params, per_entry, "cpu")  # the election (ties) fixed at theta
    fused = merge(adapters, space.schedule(theta), method, **params)
    want = torch.cat([fused.vectors[s.path].reshape(-1) for s in stack.segments])
    return form(per_entry), want


def test_form_stack_layout(form_stack: list[IA3Adapter]) -> None:
    stack = TaskStack(form_stack)
    assert len(stack.segments) == 7 and stack.segments[0].path == "lm_head"
    c = stack.vectors[2]
    v0 = next(s for s in stack.segments if s.path == "model.layers.0.self_attn.v_proj")
    assert torch.equal(c[v0.offset : v0.offset + v0.size], torch.ones(v0.size))  # identity fill
    assert WeightSpace(stack, "layer").groups == ["model.layers.0", "model.layers.1", "other"]
    assert WeightSpace(stack, "module").groups == [
        "model.layers.0:attention",
        "model.layers.0:feedforward",
        "model.layers.1:attention",
        "model.layers.1:feedforward",
        "other:attention",
    ]


@pytest.mark.parametrize("granularity", ["task", "layer", "module"])
@pytest.mark.parametrize("method", SEARCHABLE_METHODS)
def test_method_form_equals_merge(form_stack: list[IA3Adapter], method: str, granularity: str) -> None:
    got, want = _form_vs_merge(form_stack, method, granularity, seed=len(method))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    assert not torch.allclose(want, torch.ones_like(want))  # a real fusion, not the identity


def _hand_adapter(name: str, seed: int, paths: list[str]) -> IA3Adapter:
    shapes = {
        "model.layers.0.self_attn.k_proj": (4, 1),
        "model.layers.0.mlp.down_proj": (1, 6),
        "lm_head": (5, 1),
        "proj_in": (1, 3),
    }
    gen = torch.Generator().manual_seed(seed)
    vectors = {p: 1 + 0.3 * torch.randn(shapes[p], generator=gen) for p in paths}
    ff = {p: shapes[p][0] == 1 for p in paths}
    config = {"peft_type": "IA3", "target_modules": paths, "feedforward_modules": [p for p in paths if ff[p]]}
    return IA3Adapter(vectors, ff, config, name)


def test_module_schedule_with_both_kinds_outside_layers() -> None:
    paths = ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj", "lm_head", "proj_in"]
    adapters = [_hand_adapter("a", 1, paths), _hand_adapter("b", 2, paths[:3])]
    space = WeightSpace(TaskStack(adapters), "module")
    assert space.groups[-2:] == ["other:attention", "other:feedforward"]
    got, want = _form_vs_merge(adapters, "task_arithmetic", "module", seed=0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- 6. ScaleHooks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_scale_hooks_match_peft(tmp_path: Path, arch: str) -> None:
    model = tiny_model(arch, 0)
    path = random_ia3_adapter(model, tmp_path / "a", seed=1, spread=0.3)
    adapter = load_adapter(path)
    ff = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "t5": "DenseReluDense.wo"}[arch]
    assert any(adapter.feedforward[p] and p.endswith(ff) for p in adapter.vectors)
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 128, (2, 7), generator=gen)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, 128, (2, 5), generator=gen)
    with torch.no_grad():
        base = model(**inputs).logits
        reference = _peft(model, path)(**inputs).logits  # copied before any hook is on the model
    stack = TaskStack([adapter])
    hooks = ScaleHooks(model, stack.segments)
    with torch.no_grad():
        off = model(**inputs).logits
        hooks.scales = stack.vectors[0]
        on = model(**inputs).logits
    assert torch.equal(off, base)  # scales None: no scaling
    torch.testing.assert_close(on, reference, atol=1e-5, rtol=0)
    assert (on - base).abs().max() > 1e-2
    hooks.remove()
    assert _hooks(model) == 0 and hooks.scales is None
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


# --------------------------------------------------------------------------- 7. text records


@dataclass(frozen=True)
class TextWorld:
    root: Path
    model: Any
    tokenizer: Any
    adapters: dict[str, Path]
    labeled: Path
    unlabeled: Path


RECORDS = [{"input": "ab", "target": "ba"}, {"input": "abc", "target": "cba"}, {"input": "hello", "target": "olleh"}]


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> TextWorld:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("text")
    model_dir = save_tiny_model(root / "model", "llama", tokenizer=True)
    model = load_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    adapters = {n: random_ia3_adapter(model, root / n, seed=s, spread=0.5) for n, s in (("x", 1), ("y", 2))}
    labeled, unlabeled = root / "labeled.jsonl", root / "unlabeled.jsonl"
    labeled.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    unlabeled.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for r in RECORDS))
    return TextWorld(root, model, tokenizer, adapters, labeled, unlabeled)


def _tok(text: str) -> list[int]:
    return [ord(ch) - 29 for ch in text]  # tiny_tokenizer: <pad> 0, <eos> 1, <unk> 2, printable ASCII from 3


def test_make_batches_labels_only_targets(text: TextWorld) -> None:
    batches = make_batches(text.labeled, text.model, tokenizer=text.tokenizer, batch_size=2)
    assert [b.size for b in batches] == [2, 1]
    first, second = batches
    assert first.inputs["input_ids"].tolist() == [_tok("abba") + [1, 0, 0], _tok("abccba") + [1]]
    assert first.inputs["attention_mask"].tolist() == [[1] * 5 + [0, 0], [1] * 7]
    assert first.inputs["labels"].tolist() == [
        [-100, -100] + _tok("ba") + [1, -100, -100],
        [-100, -100, -100] + _tok("cba") + [1],
    ]
    assert first.prompt_end.tolist() == [1, 2]
    assert second.inputs["labels"].tolist() == [[-100] * 5 + _tok("olleh") + [1]]
    unlabeled = make_batches(text.unlabeled, text.model, tokenizer=text.tokenizer, batch_size=8, need_labels=False)
    assert len(unlabeled) == 1 and "labels" not in unlabeled[0].inputs
    assert unlabeled[0].prompt_end.tolist() == [1, 2, 4]


def _reference_peft(text: TextWorld, tmp_path: Path, weights: list[float]) -> Any:
    merge(text.adapters, weights, "task_arithmetic").save(tmp_path / "ref")
    return _peft(text.model, tmp_path / "ref")


def test_text_search_with_loss(text: TextWorld, tmp_path: Path) -> None:
    result = search_weights(
        text.model, text.adapters, text.labeled, tokenizer=text.tokenizer, batch_size=2, budget=10, lr=0.1
    )
    assert result.objective == "loss" and result.forwards == 10 and len(result.history) == 5
    batches = make_batches(text.labeled, text.model, tokenizer=text.tokenizer, batch_size=2)
    reference = _reference_peft(text, tmp_path, [0.5, 0.5])
    expected = _mean_loss(reference, [b.inputs for b in batches])
    assert result.initial_objective == pytest.approx(expected, rel=1e-5)
    assert result.final_objective < result.initial_objective


@pytest.mark.parametrize("data", ["labeled", "unlabeled"])
def test_text_search_with_entropy(text: TextWorld, tmp_path: Path, data: str) -> None:
    result = search_weights(
        text.model, text.adapters, getattr(text, data), objective="entropy", tokenizer=text.tokenizer, budget=6, lr=0.1
    )
    assert result.objective == "entropy" and len(result.history) == 6
    # the entropy of the next-token distribution after each prompt, at the starting weights
    reference = _reference_peft(text, tmp_path, [0.5, 0.5])
    prompts = [r["input"] for r in RECORDS]
    entropies = []
    with torch.no_grad():
        for p in prompts:
            logp = torch.log_softmax(reference(input_ids=torch.tensor([_tok(p)])).logits[0, -1], -1)
            entropies.append(float(-(logp.exp() * logp).sum()))
    assert result.initial_objective == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert result.final_objective < result.initial_objective


def test_unlabeled_records_refused_for_loss(text: TextWorld) -> None:
    message = (
        "objective 'loss' needs labeled examples but example 0 has no 'target' or 'label'; add them, "
        "or use objective 'entropy' for unlabeled inputs"
    )
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        search_weights(text.model, text.adapters, text.unlabeled, tokenizer=text.tokenizer, budget=4)
    assert str(caught.value) == message


def test_seq2seq_layer_search(tmp_path: Path) -> None:
    model = tiny_model("t5", 0)
    adapters = [random_ia3_adapter(model, tmp_path / n, seed=s, spread=0.5) for n, s in (("x", 1), ("y", 2))]
    tokenizer = tiny_tokenizer()
    (batch,) = make_batches(RECORDS[:2], model, tokenizer=tokenizer)
    assert batch.inputs["input_ids"].tolist() == [_tok("ab") + [0], _tok("abc")]
    assert batch.inputs["labels"].tolist() == [_tok("ba") + [-100], _tok("cba")]  # the decoder's labels
    result = search_weights(model, adapters, RECORDS[:2], tokenizer=tokenizer, granularity="layer", budget=10)
    assert sorted(result.groups) == ["decoder.block.0", "decoder.block.1", "encoder.block.0", "encoder.block.1"]
    merge(adapters, [0.5, 0.5]).save(tmp_path / "start")
    assert result.initial_objective == pytest.approx(
        _mean_loss(_peft(model, tmp_path / "start"), [batch.inputs]), rel=1e-5
    )
    assert result.final_objective < result.initial_objective
    out = result.save(tmp_path / "out", plots=False)
    assert not (out / "weights.png").exists()
    again = run_recipe(load_recipe(out / "recipe.yaml"), output=tmp_path / "again")
    assert _equal_adapters(load_adapter(again), result.adapter)


# --------------------------------------------------------------------------- 8. bad input


def assert_refused(
    model: Any, ids: Tensor, targets: list[str], roots: list[Path], error: type, message: str, call: Callable[[], Any]
) -> None:
    """``call`` raises ``error`` with exactly ``message``; the model and files are as they were."""
    state = ModelState.of(model, ids)
    trees = [_tree(r) for r in roots]
    with pytest.raises(error, match=re.escape(message)) as caught:
        call()
    assert str(caught.value) == message
    state.assert_same(model, ids, targets)
    assert [_tree(r) for r in roots] == trees


def test_bad_search_arguments(world: World) -> None:
    def search(**kw: Any) -> Callable[[], Any]:
        args = {"budget": 4, **kw}
        return lambda: search_weights(world.base, {"a": world.a, "b": world.b}, world.batches["a"], **args)

    cases = [
        (
            InvalidParameterError,
            "budget=0; pass the number of forward passes to spend, an integer >= 1",
            search(budget=0),
        ),
        (
            InvalidParameterError,
            "budget=2.5; pass the number of forward passes to spend, an integer >= 1",
            search(budget=2.5),
        ),
        (
            InvalidParameterError,
            "budget=1 forward passes is less than one pass over the data (2 batches); "
            "pass a budget >= 2 or fewer examples",
            search(budget=1),
        ),
        (InvalidParameterError, "optimizer='sgd' is not an optimizer; pass one of adam, cma", search(optimizer="sgd")),
        (
            InvalidParameterError,
            "granularity='row' is not a search granularity; pass one of task, layer, module",
            search(granularity="row"),
        ),
        (
            InvalidParameterError,
            "objective='accuracy' is not an objective; pass one of loss, entropy or a "
            "callable(model, inputs) -> tensor",
            search(objective="accuracy"),
        ),
        (
            InvalidParameterError,
            "bounds=(1.0, 0.0); pass finite (low, high) with low < high",
            search(bounds=(1.0, 0.0)),
        ),
        (
            InvalidParameterError,
            "bounds=(0.0, inf); pass finite (low, high) with low < high",
            search(bounds=(0.0, float("inf"))),
        ),
        (InvalidParameterError, "bounds=(1.0,); pass (low, high), e.g. (-1.5, 1.5)", search(bounds=(1.0,))),
        (InvalidParameterError, "bounds='ab'; pass (low, high), e.g. (-1.5, 1.5)", search(bounds="ab")),
        (InvalidParameterError, "l1=-0.1; pass a finite penalty >= 0", search(l1=-0.1)),
        (InvalidParameterError, "l1=nan; pass a finite penalty >= 0", search(l1=float("nan"))),
        (
            UnknownMethodError,
            "unknown fusion method 'mean'; valid methods are: " + ", ".join(method_names()),
            search(method="mean"),
        ),
        (
            InvalidParameterError,
            "method 'ties': density=0.0 is invalid (Input should be greater than 0); density is the "
            "fraction of each task vector's entries kept; pass a value in (0, 1]",
            search(method="ties", density=0.0),
        ),
        (
            InvalidParameterError,
            "init has shape (3,); pass a number, one value per adapter (2), or a (2, 1) table",
            search(init=[0.2, 0.3, 0.5]),
        ),
        # optimiser settings
        (InvalidParameterError, "lr=0.0; Adam's learning rate must be a finite number > 0", search(lr=0.0)),
        (
            InvalidParameterError,
            "sigma0=-0.1; CMA-ES's initial step size must be a finite number > 0",
            search(optimizer="cma", sigma0=-0.1, budget=40),
        ),
    ]
    for error, message, call in cases:
        assert_refused(world.base, world.ids, world.targets, [world.root], error, message, call)


def test_bad_data(text: TextWorld, tmp_path: Path) -> None:
    def search(data: Any, **kw: Any) -> Callable[[], Any]:
        args = {"tokenizer": text.tokenizer, "budget": 4, **kw}
        return lambda: search_weights(text.model, text.adapters, data, **args)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "ab", "target": "ba"}\n\n{"input": "ab", "target": }\n')
    listed = tmp_path / "listed.jsonl"
    listed.write_text('{"input": "ab", "target": "ba"}\n[1, 2]\n')
    big = tiny_tokenizer()
    big.add_tokens([f"<extra{i}>" for i in range(31)])
    assert len(big) == 129
    long = [RECORDS[0], {"input": "a" * 60, "target": "bbbb"}]  # 60 + 4 + <eos> = 65 tokens > 64
    none = "the data hold no examples; pass at least one example (a JSON object per line)"
    cases = [
        (DataError, none, search([])),
        (DataError, none, search(empty)),
        (
            DataError,
            f"data file {str(broken)!r} line 3 is not valid JSON (Expecting value); write one JSON object per line",
            search(broken),
        ),
        (
            DataError,
            f'data file {str(listed)!r} line 2 holds a list, not a JSON object such as {{"input": ..., "target": ...}}',
            search(listed),
        ),
        (
            DataError,
            f"data file {str(tmp_path / 'nowhere.jsonl')!r} cannot be read ([Errno 2] No such file or directory: "
            f"{str(tmp_path / 'nowhere.jsonl')!r}); pass a JSON-lines file",
            search(tmp_path / "nowhere.jsonl"),
        ),
        (
            DataError,
            "example 1 is 65 tokens long but the model's context holds 64; shorten it or drop it",
            search(long),
        ),
        (
            DataError,
            "the tokenizer has 129 tokens but the model's embedding has 128 rows: the tokenizer does not match "
            "the model; pass the tokenizer saved with the base model",
            search(RECORDS, tokenizer=big),
        ),
        (
            DataError,
            "the examples mix kinds (target from example 0, unlabeled from example 1); give every example the "
            "same fields",
            search([RECORDS[0], {"input": "cd"}, RECORDS[1]], objective="entropy"),
        ),
        (
            DataError,
            "the examples are text: pass the base model's tokenizer (tokenizer=..., --tokenizer DIR)",
            search(RECORDS, tokenizer=None),
        ),
        (DataError, "example 1 has target 3; a target is a string", search([RECORDS[0], {"input": "ab", "target": 3}])),
        (
            DataError,
            "the examples have class labels but the model is a LlamaForCausalLM, not a sequence classifier; "
            'give generation examples {"input": ..., "target": ...} or load the model as a classifier',
            search([{"input": "ab", "label": 1}]),
        ),
    ]
    ids = torch.tensor([_tok("hello")])
    targets = list(load_adapter(text.adapters["x"]).vectors)
    for error, message, call in cases:
        assert_refused(text.model, ids, targets, [text.root, tmp_path], error, message, call)


def test_peft_model_is_refused(world: World) -> None:
    peft_model = _peft(world.base, world.a)
    before = _logits(peft_model, world.ids)
    message = (
        f"the model is a {type(peft_model).__name__}; pass the base model (peft_model.get_base_model() with the adapters "
        "unloaded, or the model loaded without PEFT): the search injects the adapters itself"
    )
    with pytest.raises(IA3FuseError, match=re.escape(message)):
        search_weights(peft_model, [world.a, world.b], world.batches["a"], budget=4)
    assert torch.equal(_logits(peft_model, world.ids), before)
    assert_refused(
        world.base,
        world.ids,
        world.targets,
        [world.root],
        IA3FuseError,
        message.replace(type(peft_model).__name__, "PeftModel"),
        lambda: search_weights(
            PeftModel(copy.deepcopy(world.base), load_adapter(world.a).peft_config()),
            [world.a],
            world.batches["a"],
            budget=4,
        ),
    )


def test_adapters_of_another_base(world: World, tmp_path: Path) -> None:
    wider = tiny_model("llama", 0, hidden_size=48, intermediate_size=96, head_dim=12)
    other = random_ia3_adapter(wider, tmp_path / "wide", seed=1)
    problems = [
        "module 'model.layers.0.mlp.down_proj' has 64 input features but the adapters' vectors have 96",
        "module 'model.layers.0.self_attn.k_proj' has 16 output features but the adapters' vectors have 24",
        "module 'model.layers.0.self_attn.v_proj' has 16 output features but the adapters' vectors have 24",
        "module 'model.layers.1.mlp.down_proj' has 64 input features but the adapters' vectors have 96",
    ]
    message = (
        "the adapters do not fit the model (LlamaForCausalLM, model type 'llama'): "
        + "; ".join(problems)
        + "; and 2 more; "
        "pass the base model the adapters were trained on"
    )
    assert_refused(
        world.base,
        world.ids,
        world.targets,
        [world.root, tmp_path],
        IncompatibleAdaptersError,
        message,
        lambda: search_weights(world.base, [other], world.batches["a"], budget=4),
    )


def test_geometric_needs_positive_vectors(world: World) -> None:
    a = load_adapter(world.a)
    vectors = {p: torch.ones_like(v) for p, v in a.vectors.items()}
    first = next(iter(vectors))
    vectors[first][0, 0] = -0.25
    holding = IA3Adapter(vectors, dict(a.feedforward), dict(a.config), "neg")
    message = (
        "geometric fusion takes log(l), so every IA3 value must be > 0, but the adapters hold -0.25; "
        "use method 'task_arithmetic' (delta space), which accepts any value"
    )
    assert_refused(
        world.base,
        world.ids,
        world.targets,
        [world.root],
        MethodInputError,
        message,
        lambda: search_weights(world.base, [holding, world.b], world.batches["a"], method="geometric", budget=4),
    )


def _fiddled(world: World, mixed: bool = False) -> Any:
    """A copy of the base in train mode (with ``mixed``, one block in eval) and some parameters frozen."""
    model = copy.deepcopy(world.base)
    model.train()
    if mixed:
        model.model.layers[1].eval()
    for name, p in model.named_parameters():
        if "layers.0" in name:
            p.requires_grad_(False)
    return model


def test_errors_during_the_search_restore_the_model(world: World) -> None:
    model = _fiddled(world)
    ids = world.ids
    unlabeled = [
        {"input_ids": b["input_ids"], "labels": torch.full_like(b["labels"], -100)} for b in world.batches["a"]
    ]
    for optimizer in ("adam", "cma"):
        assert_refused(
            model,
            ids,
            world.targets,
            [world.root],
            DataError,
            "the objective is nan; check the data (labels all -100?) and the bounds",
            lambda opt=optimizer: search_weights(model, [world.a, world.b], unlabeled, optimizer=opt, budget=40),
        )
    assert_refused(
        model,
        ids,
        world.targets,
        [world.root],
        DataError,
        "the entropy objective on a causal LM needs to know where prompts end; pass text records, or give each "
        "ready batch a 'prompt_end' tensor (index of each row's last prompt token)",
        lambda: search_weights(model, [world.a, world.b], world.batches["a"], objective="entropy", budget=4),
    )
    calls = []

    def failing(m: Any, inputs: dict[str, Tensor]) -> Tensor:
        calls.append(1)
        if len(calls) > 5:
            raise DataError("stop here")
        return m(**inputs).loss

    assert_refused(
        model,
        ids,
        world.targets,
        [world.root],
        DataError,
        "stop here",
        lambda: search_weights(model, [world.a, world.b], world.batches["a"], objective=failing, budget=40),
    )
    assert len(calls) == 6


# --------------------------------------------------------------------------- 9. model left as it was


@pytest.mark.parametrize("optimizer", ["adam", "cma"])
def test_search_leaves_the_model_as_it_was(world: World, optimizer: str) -> None:
    model = _fiddled(world)
    state = ModelState.of(model, world.ids)
    seen: list[Tensor] = []

    def loss(m: Any, inputs: dict[str, Tensor]) -> Tensor:
        assert not m.training and not any(p.requires_grad for p in m.parameters())  # eval, frozen while searching
        out = m(**inputs)
        seen.append(out.logits.detach())
        return out.loss

    result = search_weights(
        model, [world.a, world.b], world.batches["a"], objective=loss, optimizer=optimizer, budget=20
    )
    assert result.objective == "loss" and len(seen) > 10
    assert not torch.equal(seen[0], _logits(model, world.ids[:8]))  # the hooks did scale while searching
    state.assert_same(model, world.ids, world.targets)


def test_search_restores_mixed_train_eval_modes(world: World) -> None:
    model = _fiddled(world, mixed=True)
    state = ModelState.of(model, world.ids)
    search_weights(model, [world.a, world.b], world.batches["a"], budget=4)
    state.assert_same(model, world.ids, world.targets)


def test_ready_batches_with_prompt_end_take_the_entropy_objective(text: Any) -> None:
    """A ready batch's 'prompt_end' entry is where prompts end (not a model argument)."""
    built = make_batches(text.labeled, text.model, tokenizer=text.tokenizer, batch_size=2)
    ready = [{**b.inputs, "prompt_end": b.prompt_end} for b in built]
    from_ready = search_weights(text.model, text.adapters, ready, objective="entropy", budget=len(ready))
    from_text = search_weights(
        text.model,
        text.adapters,
        text.labeled,
        tokenizer=text.tokenizer,
        batch_size=2,
        objective="entropy",
        budget=len(built),
    )
    assert from_ready.initial_objective == pytest.approx(from_text.initial_objective, abs=1e-6)


def test_objective_is_the_mean_over_examples_not_batches(world: World) -> None:
    """Nine examples in batches of 8 and 1: each example counts once, whatever batch it is in."""
    model = world.base
    batch = world.batches["a"][0]
    ids, labels = batch["input_ids"][:5], batch["labels"][:5]
    split = [{"input_ids": ids[:4], "labels": labels[:4]}, {"input_ids": ids[4:], "labels": labels[4:]}]
    whole = [{"input_ids": ids, "labels": labels}]
    a = search_weights(model, [world.a, world.b], split, budget=2)
    b = search_weights(model, [world.a, world.b], whole, budget=1)
    per_example = []
    for i in range(5):
        one = search_weights(
            model, [world.a, world.b], [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]}], budget=1
        )
        per_example.append(one.initial_objective)
    # each row has the same number of label tokens, so the whole batch's mean loss is the mean of the rows'
    assert a.initial_objective == pytest.approx(sum(per_example) / 5, abs=1e-5)
    assert b.initial_objective == pytest.approx(sum(per_example) / 5, abs=1e-5)
