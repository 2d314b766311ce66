"""``search_weights(method="auto")``: the split, the honesty of the held-out estimate (the choice
never sees the held-out examples), reproducibility, budgets and errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ia3fuse
from ia3fuse import IA3FuseWarning
from ia3fuse.errors import DataError, InvalidParameterError
from ia3fuse.search import search_weights
from ia3fuse.search.auto import AutoCandidate, AutoSearchResult, auto_candidates, separation_warning, split_examples

from cli_runner import run_cli
from factories import random_ia3_adapter, tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def problem(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny BERT classifier, two adapters, and 24 labeled records of two tasks whose labels a
    known fusion (task arithmetic, weights 0.9 and 0.6) predicts."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_config("bert", num_labels=2)).eval()
    base.save_pretrained(str(root / "base"))
    tok = tiny_tokenizer()
    tok.save_pretrained(str(root / "base"))
    dirs = [random_ia3_adapter(base, root / n, seed=i + 11, spread=0.9) for i, n in enumerate(["a", "b"])]
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghij ") for _ in range(rng.randint(5, 20))) for _ in range(24)]
    fused = ia3fuse.merge(dirs, [0.9, 0.6])
    fused.save(root / "truth")
    from peft import PeftModel

    truth = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(str(root / "base")), str(root / "truth")
    )
    with torch.no_grad():
        labels = truth(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    records = [
        {"input": t, "label": y, "task": "one" if i % 2 else "two"} for i, (t, y) in enumerate(zip(texts, labels))
    ]
    data = root / "few.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return base, tok, dirs, records, data, root


def _auto(problem: Any, records: Any = None, **kwargs: Any) -> AutoSearchResult:
    base, tok, dirs, recs, _, _ = problem
    with pytest.warns(IA3FuseWarning):  # 6 held-out examples: the estimate says how uncertain it is
        result = search_weights(base, dirs, records or recs, tokenizer=tok, method="auto", budget=500, **kwargs)
    assert isinstance(result, AutoSearchResult)
    return result


# ---------------------------------------------------------------------- the split
def test_records_are_split_within_each_task_and_never_overlap(problem: Any) -> None:
    records = problem[3]
    fit, val, hold = split_examples(records, seed=0)
    assert (len(fit), len(val), len(hold)) == (12, 6, 6)
    for part in (val, hold):
        assert sorted(r["task"] for r in part) == ["one"] * 3 + ["two"] * 3
    ids = [r["input"] for r in fit + val + hold]
    assert sorted(ids) == sorted(r["input"] for r in records)
    assert split_examples(records, seed=0) == (fit, val, hold)  # seeded
    assert split_examples(records, seed=1) != (fit, val, hold)


def test_ready_batches_are_split_by_rows_and_keep_their_other_entries() -> None:
    batch = {
        "input_ids": torch.arange(24).reshape(8, 3),
        "labels": torch.arange(8),
        "descriptions": torch.zeros(3, 5),  # not per row: kept whole in every part
        "examples": [f"e{i}" for i in range(8)],
        "task": "t",
    }
    fit, val, hold = split_examples([batch], seed=0)
    assert [len(p) for p in (fit, val, hold)] == [1, 1, 1]
    rows = [p[0]["labels"].tolist() for p in (fit, val, hold)]
    assert [len(r) for r in rows] == [4, 2, 2]
    assert sorted(sum(rows, [])) == list(range(8))
    for part in (fit, val, hold):
        b = part[0]
        assert b["task"] == "t" and torch.equal(b["descriptions"], batch["descriptions"])
        assert b["examples"] == [f"e{i}" for i in b["labels"].tolist()]
        assert torch.equal(b["input_ids"], batch["input_ids"][b["labels"]])


def test_too_few_examples_for_three_parts_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="a group has only 2; give at least 3 examples per batch or task"):
        split_examples([{"input": "a", "label": 0}, {"input": "b", "label": 1}], seed=0)


def test_the_screen_covers_every_searchable_method_and_its_key_parameter() -> None:
    assert auto_candidates(3) == [
        ("linear", {}),
        ("task_arithmetic", {}),
        ("geometric", {}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.7}),
        ("dare_linear", {"density": 0.3}),
        ("dare_linear", {"density": 0.7}),
        ("dare_ties", {"density": 0.3}),
        ("dare_ties", {"density": 0.7}),
        ("magnitude_prune", {"density": 0.3}),
        ("magnitude_prune", {"density": 0.7}),
        ("breadcrumbs", {"density": 0.3}),
        ("breadcrumbs", {"density": 0.7}),
        ("svd", {"svd_rank": 1}),
        ("svd", {"svd_rank": 2}),
    ]
    assert auto_candidates(4, ["ties", "svd"]) == [
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.7}),
        ("svd", {"svd_rank": 1}),
        ("svd", {"svd_rank": 2}),
    ]


# ---------------------------------------------------------------------- the run
def test_auto_returns_the_chosen_fusion_and_its_recipe_reproduces_it(problem: Any, tmp_path: Path) -> None:
    _, _, dirs, _, _, _ = problem
    result = _auto(problem)
    again = ia3fuse.merge(dirs, result.schedule, result.method, **result.params)
    for p, v in result.adapter.vectors.items():
        assert torch.equal(again.vectors[p], v)
    out = result.save(tmp_path / "out")
    assert {"candidates.md", "candidates.json", "candidates.png", "recipe.yaml", "adapter"} <= {
        p.name for p in out.iterdir()
    }
    res = run_cli("merge", out / "recipe.yaml", "-o", tmp_path / "merged", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    merged = ia3fuse.load_adapter(tmp_path / "merged")
    for p, v in result.adapter.vectors.items():
        assert torch.equal(merged.vectors[p], v)
    # the ranking: every screened candidate plus the trained ones, the chosen one marked
    rows = json.loads((out / "candidates.json").read_text())
    screened = sum(r["stage"] == "screen" for r in rows)
    assert screened + len(result.excluded) == len(auto_candidates(2))
    # spread 0.9 gives entries <= 0: geometric (log l) cannot take them, and the ranking says so
    assert list(result.excluded) == ["geometric"] and "must be > 0" in result.excluded["geometric"]
    assert "- not applicable: geometric: geometric fusion takes log(l)" in (out / "candidates.md").read_text()
    assert sum(r["stage"] == "task-wise" for r in rows) == 3
    assert result.chosen in rows and result.chosen["stage"] == "task-wise"
    assert min(r["selection"] for r in rows if r["stage"] != "screen") == result.chosen["selection"]
    assert "**(chosen)**" in (out / "candidates.md").read_text()
    assert result.split == {"fit": 12, "val": 6, "holdout": 6}
    assert result.forwards <= result.budget == 500


def test_the_heldout_estimate_is_the_fused_adapter_on_the_heldout_examples_in_peft(problem: Any) -> None:
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    _, tok, _, records, _, root = problem
    result = _auto(problem)
    _, _, hold = split_examples(records, seed=0)
    result.adapter.save(root / "chosen")
    model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(str(root / "base")), str(root / "chosen")
    ).eval()
    enc = tok([r["input"] for r in hold], return_tensors="pt", padding=True)
    labels = torch.tensor([r["label"] for r in hold])
    with torch.no_grad():
        logits = model(**enc).logits
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert result.heldout["examples"] == 6
    assert result.heldout["objective"] == pytest.approx(loss, rel=1e-5)
    assert result.final_objective == result.heldout["objective"]
    assert result.heldout["metric"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_the_choice_never_sees_the_heldout_examples(problem: Any) -> None:
    records = problem[3]
    _, _, hold = split_examples(records, seed=0)
    held = {r["input"] for r in hold}
    flipped = [{**r, "label": 1 - r["label"]} if r["input"] in held else r for r in records]
    a, b = _auto(problem), _auto(problem, flipped)
    assert (a.method, a.params, a.granularity) == (b.method, b.params, b.granularity)
    assert torch.equal(a.weights, b.weights)
    assert [r["selection"] for r in a.candidates] == [r["selection"] for r in b.candidates]
    # only the estimate moves: the held-out labels are the opposite ones
    assert a.heldout["metric"] + b.heldout["metric"] == pytest.approx(1.0)
    assert a.heldout["objective"] != b.heldout["objective"]


@pytest.mark.slow
def test_layer_wise_weights_compete_and_win_only_on_validation(problem: Any) -> None:
    result = _auto(problem, granularity="layer")
    trained = {r["stage"]: r for r in result.candidates if r["stage"] != "screen"}
    assert set(trained) == {"task-wise", "layer-wise"}
    best_task = min(r["selection"] for r in result.candidates if r["stage"] == "task-wise")
    layer = trained["layer-wise"]
    if result.granularity == "layer":
        assert layer["selection"] < best_task
        assert result.layer_note == "layer-wise weights won on validation"
    else:
        assert layer["selection"] >= best_task
        assert result.layer_note.startswith("layer-wise weights did not beat task-wise on validation")
    # stopped on validation from the task-wise solution: never worse than it there
    assert layer["selection"] <= best_task + 1e-12


@pytest.mark.slow
def test_the_objective_curve_reaches_the_callback(problem: Any) -> None:
    base, tok, dirs, records, _, _ = problem
    seen: list[dict[str, float]] = []
    with pytest.warns(IA3FuseWarning):
        search_weights(base, dirs, records, tokenizer=tok, method="auto", budget=500, callback=seen.append)
    assert seen and all(set(p) == {"forwards", "objective", "best"} for p in seen)
    assert [p["forwards"] for p in seen] == sorted(p["forwards"] for p in seen)
    assert seen[-1]["best"] == min(p["objective"] for p in seen)


# ---------------------------------------------------------------------- warnings and errors
def test_separation_warning_compares_paired_batch_differences() -> None:
    a = AutoCandidate("ties", {"density": 0.3}, 1.0, "task-wise", selection=0.50, val_batches=[0.40, 0.60, 0.50])
    close = AutoCandidate("svd", {"svd_rank": 1}, 1.0, "task-wise", selection=0.51, val_batches=[0.45, 0.55, 0.53])
    far = AutoCandidate("svd", {"svd_rank": 1}, 1.0, "task-wise", selection=0.70, val_batches=[0.61, 0.80, 0.69])
    message = separation_warning(a, close)
    assert message is not None and message.startswith(
        "the data are too few to separate the two best candidates: ties (density=0.3) (task-wise) beats "
        "svd (svd_rank=1) (task-wise) by 0.01 on validation"
    )
    assert separation_warning(a, far) is None
    one = separation_warning(
        AutoCandidate("ties", {}, 1.0, "task-wise", val_batches=[0.4]),
        AutoCandidate("svd", {}, 1.0, "layer-wise", val_batches=[0.5]),
    )
    assert one is not None and "form one batch" in one


@pytest.mark.slow
def test_a_small_heldout_part_is_said(problem: Any) -> None:
    base, tok, dirs, records, _, _ = problem
    with pytest.warns(IA3FuseWarning, match=r"the held-out estimate rests on 6 examples: .* up to \+-20 points"):
        search_weights(base, dirs, records, tokenizer=tok, method="auto", budget=500)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "cma"}, "method='auto' trains its weights with Adam; leave optimizer at 'adam', not 'cma'"),
        ({"granularity": "module"}, "granularity='module'; method='auto' takes 'task'"),
        ({"density": 0.5}, "method='auto' chooses the method's parameters, the scale and the starting weights itself"),
        ({"init": 0.5}, "leave params, l1, bounds and init out"),
        ({"holdout": 0.6}, "holdout=0.6; pass the share of examples to hold out, above 0 and below 0.5"),
        ({"methods": ["nope"]}, "nope"),
        (
            {"budget": 20},
            "budget=20 forward passes is too small for method='auto' (14 candidates to screen, 3 to train)",
        ),
    ],
)
def test_bad_arguments(problem: Any, kwargs: dict[str, Any], message: str) -> None:
    base, tok, dirs, records, _, _ = problem
    args = {"budget": 500, **kwargs}
    with pytest.raises((InvalidParameterError, ia3fuse.UnknownMethodError)) as info:
        search_weights(base, dirs, records, tokenizer=tok, method="auto", **args)
    assert message in str(info.value)
    # refused before anything touched the model: no hook left on it, nothing frozen
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.slow
def test_the_budget_error_names_a_budget_that_works(problem: Any) -> None:
    base, tok, dirs, records, _, _ = problem
    with pytest.raises(InvalidParameterError) as info:
        search_weights(base, dirs, records, tokenizer=tok, method="auto", budget=20)
    need = int(str(info.value).rsplit(">= ", 1)[1])
    with pytest.warns(IA3FuseWarning):
        result = search_weights(base, dirs, records, tokenizer=tok, method="auto", budget=need)
    assert math.isfinite(result.heldout["objective"]) and result.forwards <= need


@pytest.mark.slow
def test_the_command_runs_auto_and_prints_the_ranking(problem: Any, tmp_path: Path) -> None:
    _, _, dirs, _, data, root = problem
    res = run_cli(
        "search", "--model", root / "base", "--adapters", *dirs, "--data", data, "--method", "auto",
        "--budget", "500", "--no-progress", "-o", tmp_path / "out", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "| stage | method | parameters | scale | selection objective | held-out objective |" in res.stdout
    assert "chosen: " in res.stdout and "on 6 examples no choice used" in res.stdout
    assert "candidates.md/json/png" in res.stdout
    assert "ia3fuse: warning: the held-out estimate rests on 6 examples" in res.stderr
    assert (tmp_path / "out" / "candidates.png").exists()


# ---------------------------------------------------------------------- entropy collapse
def test_collapse_notes_flag_a_task_that_falls_onto_one_answer() -> None:
    from ia3fuse.search.objectives import collapse_notes

    before = {"a": [0, 1, 0, 1, 2], "b": [1, 1, 1, 1, 1], "c": [0, 1]}
    after = {"a": [1, 1, 1, 1, 1], "b": [1, 1, 1, 1, 1], "c": [1, 1]}
    assert collapse_notes(before, after) == [
        "task 'a': 5 of 5 predictions are the same answer after the search (at most 2 of 5 before): the entropy "
        "objective may have collapsed this task onto one answer; check it with a few labels, or use the loss objective"
    ]  # b predicted one answer before the search too (not its doing); c has too few examples to tell


def test_an_entropy_search_reports_the_tasks_it_collapsed_as_peft_predicts_them(problem: Any, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from ia3fuse.search.objectives import agreement_notes, collapse_notes

    base, tok, dirs, records, _, root = problem
    unlabeled = [{"input": r["input"], "task": r["task"]} for r in records]
    with warnings_kept() as caught:
        result = search_weights(base, dirs, unlabeled, tokenizer=tok, objective="entropy", budget=60, lr=0.5)
    result.adapter.save(tmp_path / "found")
    fused = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(str(root / "base")), str(tmp_path / "found")
    )
    plain = BertForSequenceClassification.from_pretrained(str(root / "base"))
    alone = {
        Path(d).name: PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(str(root / "base")), str(d)
        )
        for d in dirs
    }
    preds: dict[str, dict[str, list[int]]] = {"before": {}, "after": {}, **{n: {} for n in alone}}
    for key, model in (("before", plain), ("after", fused), *alone.items()):
        with torch.no_grad():
            logits = model.eval()(**tok([r["input"] for r in records], return_tensors="pt", padding=True)).logits
        for r, p in zip(records, logits.argmax(-1).tolist()):
            preds[key].setdefault(r["task"], []).append(p)
    want = collapse_notes(preds["before"], preds["after"]) + agreement_notes(
        {n: preds[n] for n in alone}, preds["after"]
    )
    assert result.notes == want
    assert [str(w.message) for w in caught if issubclass(w.category, IA3FuseWarning)] == want


def test_collapse_is_measured_per_task_before_and_after(problem: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check's wiring: the base model's predictions (hooks off) against the fusion's, grouped
    by each record's task. Predictions are stubbed: varied for the base, one answer for the fusion."""
    from ia3fuse.scaling import ScaleHooks, TaskStack
    from ia3fuse.search import run
    from ia3fuse.search.data import make_batches

    base, tok, dirs, records, _, _ = problem
    stack = TaskStack([ia3fuse.load_adapter(d) for d in dirs])
    batches = make_batches(records, base, tokenizer=tok, batch_size=8, need_labels=False)
    hooks = ScaleHooks(base, stack.segments)
    seen = []

    def stub(model: Any, batch: Any) -> torch.Tensor:
        seen.append(hooks.scales is None)
        rows = torch.arange(batch.size)
        if hooks.scales is None:
            return torch.nn.functional.one_hot((rows // 2) % 2, 2).float()  # half of each task answers 0
        return torch.nn.functional.one_hot(torch.zeros_like(rows), 2).float()  # all answer 0

    monkeypatch.setattr(run, "prediction_logits", stub)
    try:
        flat = torch.ones(stack.vectors.shape[1])
        notes = run._collapse(base, hooks, batches, records, "entropy", 8, flat, None, stack)
        assert run._collapse(base, hooks, batches, records, "loss", 8, flat) == []  # entropy only
    finally:
        hooks.remove()
    # per batch: the base (hooks off), the fusion, then each adapter alone (which answer as the fusion here)
    assert seen == [True, False, False, False] * len(batches)
    assert [n.split(":")[0] for n in notes] == ["task 'two'", "task 'one'"]
    assert all("12 of 12 predictions are the same answer after the search (at most " in n for n in notes)


def test_agreement_notes_flag_a_task_no_adapter_answers_as_the_fusion_does() -> None:
    from ia3fuse.search.objectives import agreement_notes

    experts = {"a": {"t": ["x", "y", "z", "w"], "u": [1, 2, 3]}, "b": {"t": ["q", "q", "q", "q"], "u": [1, 2, 0]}}
    after = {"t": ["x", "q", "k", "k"], "u": [1, 2, 3]}
    assert agreement_notes(experts, after) == [
        "task 't': the fusion's answers agree with no single adapter on more than 25% of its 4 examples (closest: a): "
        "the entropy objective may have made it confident in answers no adapter gives; check it with a few labels, or "
        "use the loss objective"
    ]  # u agrees with adapter a on every example
    assert agreement_notes({}, after) == []


def test_a_user_entropy_objective_is_checked_through_predict(problem: Any) -> None:
    """A user objective cannot show its predictions: ``predict=`` gives them (one answer per
    example, any hashable: a benchmark suite's decoded strings); without it there is no check."""
    from ia3fuse.scaling import ScaleHooks, TaskStack
    from ia3fuse.search import run
    from ia3fuse.search.data import make_batches

    base, tok, dirs, records, _, _ = problem
    stack = TaskStack([ia3fuse.load_adapter(d) for d in dirs])
    batches = make_batches(records, base, tokenizer=tok, batch_size=8, need_labels=False)
    hooks = ScaleHooks(base, stack.segments)

    def entropy(model: Any, inputs: Any) -> torch.Tensor:  # a user objective, named as the built-in one
        raise AssertionError("the check does not call the objective")

    def predict(model: Any, inputs: dict[str, Any]) -> list[str]:
        n = inputs["input_ids"].shape[0]
        return ["same"] * n if hooks.scales is not None else [f"answer {i % 3}" for i in range(n)]

    flat = torch.ones(stack.vectors.shape[1])
    try:
        notes = run._collapse(base, hooks, batches, records, entropy, 8, flat, predict)
        assert run._collapse(base, hooks, batches, records, entropy, 8, flat) == []  # no predictions: no check
    finally:
        hooks.remove()
    assert len(notes) == 2 and all("12 of 12 predictions are the same answer" in n for n in notes)


@contextlib.contextmanager
def warnings_kept() -> Iterator[list[Any]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
