"""The quality benchmark's weight-search and router rows (benchmarks.quality.auto) on the quick
causal suite, and how the report shows them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from benchmarks.quality.auto import (
    AUTO_RUNS,
    SEARCH_RUNS,
    passes_to_reach,
    run_label,
    run_router_rows,
    run_search_rows,
)
from benchmarks.quality.causal import CausalSuite
from benchmarks.quality.report import quality_markdown, write_quality


@pytest.fixture(scope="module")
def suite(causal_quick: tuple[CausalSuite, Path]) -> CausalSuite:
    """The session's quick causal suite (conftest's causal_quick, shared with test_bench_causal.py)."""
    return causal_quick[0]


def test_passes_to_reach_counts_forwards_of_the_first_point_at_or_below_the_target() -> None:
    history = [
        {"forwards": 4, "objective": 2.0},
        {"forwards": 8, "objective": 1.5},
        {"forwards": 12, "objective": 1.7},
        {"forwards": 16, "objective": 1.2},
    ]
    assert passes_to_reach(history, 1.5) == 8
    assert passes_to_reach(history, 1.3) == 16
    assert passes_to_reach(history, 1.0) is None


@pytest.fixture(scope="module")
def search_rows(suite: CausalSuite):
    scored = []

    def score(adapter):
        scored.append(adapter)
        return {t: 0.5 for t in suite.tasks}

    rows, summary = run_search_rows(suite, quick=True, seed=0, progress=False, score=score, log=lambda m: None)
    return rows, summary, scored


def test_every_search_run_spends_the_same_budget_and_is_scored(search_rows) -> None:
    rows, summary, scored = search_rows
    labels = [run_label(*r) for r in SEARCH_RUNS]
    autos = [label for label, _ in AUTO_RUNS]
    assert [r["name"] for r in rows] == labels + autos and {r["group"] for r in rows} == {"automatic weights"}
    assert len(scored) == len(SEARCH_RUNS) + len(AUTO_RUNS)
    for label in autos:  # method="auto": a choice, and its held-out estimate next to the test score
        run = summary["runs"][label]
        assert run["forwards"] <= run["budget"]
        assert run["heldout"]["examples"] == summary["batches"]  # 4 per task: one held out of each
        assert 0.0 <= run["heldout"]["metric"] <= 1.0 and 0.0 <= run["test_average"] <= 1.0
        assert run["chosen"]["stage"] in ("task-wise", "layer-wise")
        assert run["granularity"] == ("layer" if run["chosen"]["stage"] == "layer-wise" else "task")
    assert summary["runs"][autos[1]]["chosen"]["method"] == "task_arithmetic"
    budget = summary["budget"]
    assert budget == 12 * summary["batches"] and summary["per_task"] == 4
    for label in labels:
        run = summary["runs"][label]
        assert run["forwards"] <= budget
        assert run["history"][-1]["forwards"] == run["forwards"]
        # every run starts at uniform weights: the same starting objective per objective kind
        assert run["history"][0]["objective"] == pytest.approx(run["initial_objective"])
    adam = summary["runs"][run_label("adam", "layer", "loss")]
    assert adam["forwards"] == budget  # Adam spends the whole budget, one pass over the data per step
    assert adam["final_objective"] < adam["initial_objective"]
    start = {summary["runs"][l]["initial_objective"] for l in labels if summary["runs"][l]["objective"] == "loss"}
    assert max(start) - min(start) < 1e-6
    assert summary["cma_best_final_loss"] == min(
        summary["runs"][run_label("cma", g, "loss")]["final_objective"] for g in ("task", "layer")
    )
    assert summary["adam_layer_passes_to_cma_best"] == passes_to_reach(adam["history"], summary["cma_best_final_loss"])


def test_the_router_row_trains_a_router_and_scores_the_mixture(suite: CausalSuite) -> None:
    seen = []

    def score(mixture):
        seen.append(mixture)
        # the routed mixture is what the suite scores: it runs the suite's own greedy decoding
        return {t: suite.evaluate(mixture, t, "test") for t in suite.tasks}

    rows, summary = run_router_rows(suite, quick=True, seed=0, progress=False, score=score, log=lambda m: None)
    (row,) = rows
    assert row["group"] == "dynamic mixture" and set(row["accuracy"]) == set(suite.tasks)
    assert summary["epochs"] == 2 and len(summary["losses"]) == 2
    assert summary["losses"][-1] < summary["losses"][0]
    (mixture,) = seen
    # the mixture's hooks are gone from every IA3 module (transformers keeps its own elsewhere)
    for seg in mixture.segments:
        module = mixture.model.get_submodule(seg.path)
        assert not module._forward_hooks and not module._forward_pre_hooks, seg.path


def test_report_shows_the_search_section_and_plot(search_rows, suite: CausalSuite, tmp_path: Path) -> None:
    rows, summary, _ = search_rows
    tasks = list(suite.tasks)
    acc = {t: 0.5 for t in tasks}
    table_rows = [
        {
            "name": f"adapter: {t}",
            "group": "individual",
            "params": {},
            "accuracy": {u: 1.0 for u in tasks},
            "average": 1.0,
            "normalized": 1.0,
        }
        for t in tasks
    ] + [
        {
            "name": "PEFT add_weighted_adapter (uniform)",
            "group": "baseline",
            "params": {},
            "accuracy": acc,
            "average": 0.5,
            "normalized": 0.5,
        }
    ]
    table_rows += [{**r, "average": 0.5, "normalized": 0.5} for r in rows]
    result = {
        "suite": "causal",
        "tasks": tasks,
        "quick": True,
        "seed": 0,
        "rows": table_rows,
        "seconds": {"prepare": 1.0, "rows": 2.0},
        "search": summary,
        "describe": {},
    }
    text = quality_markdown(result)
    assert (
        f"### Weight search (4 val examples per task, {summary['batches']} batches, budget {summary['budget']}" in text
    )
    for label in summary["runs"]:
        assert re.search(rf"\|\s*{re.escape(label)}\s*\|\s*{summary['runs'][label]['forwards']}\s*\|", text), label
    paths = write_quality(result, tmp_path)
    assert tmp_path / "quality_causal_quick_search.png" in paths
    assert (tmp_path / "quality_causal_quick_search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    torch.manual_seed(0)  # keep the global generator in a known state for later tests
