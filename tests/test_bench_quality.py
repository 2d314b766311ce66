"""The quality runner and report on a toy suite (a tiny Llama whose tasks are 'agree with adapter t')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks.quality.runner import run_quality, tuning_grid
from benchmarks.quality.report import quality_markdown, write_quality
from factories import random_ia3_adapter, tiny_model


class ToySuite:
    """Task t: predict, at each position of fixed inputs, the token that adapter t's model predicts."""

    name = "toy"
    tasks = ["a", "b", "c"]

    def prepare(self, cache: Path, *, quick: bool, seed: int, progress: bool) -> None:
        self.root = Path(cache)
        self.base = tiny_model("llama", seed=seed)
        self.inputs = {
            s: torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(i))
            for i, s in enumerate(("val", "test"))
        }
        self.dirs = {
            t: random_ia3_adapter(self.base, self.root / t, seed=10 + i, spread=1.0) for i, t in enumerate(self.tasks)
        }
        self.multi = random_ia3_adapter(self.base, self.root / "multi", seed=99, spread=0.1)
        self.labels = {}
        from peft import PeftModel

        for t, d in self.dirs.items():
            model = PeftModel.from_pretrained(tiny_model("llama", seed=seed), str(d)).eval()
            with torch.no_grad():
                self.labels[t] = {s: model(input_ids=x).logits.argmax(-1) for s, x in self.inputs.items()}

    def base_model(self) -> nn.Module:
        return tiny_model("llama")

    def adapter_dir(self, task: str) -> Path:
        return self.dirs[task]

    def multitask_adapter_dir(self) -> Path:
        return self.multi

    def evaluate(self, model: nn.Module, task: str, split: str) -> float:
        pred = model(input_ids=self.inputs[split]).logits.argmax(-1)
        return float((pred == self.labels[task][split]).float().mean())

    def describe(self) -> dict[str, Any]:
        return {"model": "tiny llama", "tasks": self.tasks}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_quality(
        ToySuite(),
        cache=tmp_path_factory.mktemp("toy"),
        quick=True,
        progress=False,
        methods=["linear", "task_arithmetic", "ties"],
    )


def test_rows_and_normalized_accuracy(result):
    names = [r["name"] for r in result["rows"]]
    assert names == [
        "base model",
        "adapter: a",
        "adapter: b",
        "adapter: c",
        "PEFT add_weighted_adapter (uniform)",
        "linear",
        "task_arithmetic",
        "ties",
        "linear (tuned)",
        "task_arithmetic (tuned)",
        "ties (tuned)",
        "ties (at task-arithmetic norm)",
        "multi-task adapter (upper bound)",
    ]
    rows = {r["name"]: r for r in result["rows"]}
    for t in "abc":
        assert rows[f"adapter: {t}"]["accuracy"][t] == 1.0  # a task is agreeing with its own adapter
        assert rows["base model"]["accuracy"][t] < 1.0
    # PEFT's uniform sum and ia3fuse's linear with the same weights are the same vectors here
    assert rows["PEFT add_weighted_adapter (uniform)"]["accuracy"] == rows["linear"]["accuracy"]
    for r in result["rows"]:
        assert r["normalized"] == pytest.approx(sum(r["accuracy"].values()) / 3)  # own accuracy is 1
        assert r["average"] == pytest.approx(sum(r["accuracy"].values()) / 3)
    tuned = rows["task_arithmetic (tuned)"]["params"]
    assert 0.25 <= tuned["scale"] <= 4.5 and "val_average" in tuned
    at_norm = rows["ties (at task-arithmetic norm)"]["params"]
    assert at_norm["norm"] > 0 and at_norm["scale"] > 0


def test_tuning_grid_covers_method_parameters():
    assert tuning_grid("linear", 3, quick=False) == [{}]
    assert tuning_grid("ties", 2, quick=False) == [{"density": d} for d in (0.2, 0.5, 0.8)]
    assert tuning_grid("svd", 4, quick=False) == [{"svd_rank": r} for r in (1, 2, 3, 4)]


def test_scaled_fusions_and_the_task_arithmetic_norm(tmp_path):
    from benchmarks.quality.runner import scale_at_norm, scaled, task_vector_norm
    from ia3fuse import load_adapter, merge

    base = tiny_model("llama")
    adapters = [load_adapter(random_ia3_adapter(base, tmp_path / n, seed=i)) for i, n in enumerate("ab")]
    # the scale multiplies the uniform weights of delta methods, and lam of TIES-style ones
    ta = scaled(adapters, "task_arithmetic", {}, 1.2)
    for p, v in merge(adapters, [0.6, 0.6], "task_arithmetic").vectors.items():
        assert torch.equal(ta.vectors[p], v)
    ties = scaled(adapters, "ties", {"density": 0.5}, 0.7)
    for p, v in merge(adapters, None, "ties", density=0.5, lam=0.7).vectors.items():
        assert torch.equal(ties.vectors[p], v)
    # the norm of l - 1, and the scale at which another method reaches it
    one = adapters[0]
    assert task_vector_norm(one) == pytest.approx(
        float(torch.cat([(v.double() - 1).reshape(-1) for v in one.vectors.values()]).norm())
    )
    target = task_vector_norm(ta)
    s = scale_at_norm(adapters, "ties", {"density": 0.5}, target)
    assert s is not None and task_vector_norm(scaled(adapters, "ties", {"density": 0.5}, s)) == pytest.approx(
        target, rel=1e-6
    )


def test_report_files(result, tmp_path):
    paths = write_quality(result, tmp_path)
    assert [p.name for p in paths] == ["quality_toy_quick.json", "quality_toy_quick.md", "quality_toy_quick.png"]
    data = json.loads(paths[0].read_text())
    assert data["rows"] == result["rows"] and data["machine"]["cpus"] >= 1
    md = paths[1].read_text()
    assert md == quality_markdown({**result, "machine": data["machine"]})
    assert "| PEFT add_weighted_adapter (uniform) |" in md and "best ia3fuse row" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_benchmarks_doc_collects_full_runs(result, tmp_path):
    from benchmarks.quality.report import benchmarks_doc

    assert "No full quality run is recorded yet." in benchmarks_doc(tmp_path)
    write_quality({**result, "suite": "encoder", "quick": False}, tmp_path)
    (tmp_path / "merge_speed.md").write_text("# Merge speed\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    doc = benchmarks_doc(tmp_path)
    assert "## encoder suite\n" in doc and "| PEFT add_weighted_adapter (uniform) |" in doc
    assert "![encoder suite](../benchmarks/results/quality_encoder.png)" in doc
    assert "### Merging 8 adapters (`python benchmarks/merge_speed.py`)\n\n| a | b |" in doc


def test_speed_ratio_plot_from_results(tmp_path):
    from benchmarks.quality.report import speed_ratios, write_benchmarks_doc

    (tmp_path / "merge_speed.json").write_text(json.dumps({"ratios": {"peft_wall_over_cli_wall": 2.5, "unknown": 3}}))
    (tmp_path / "fold_speed.json").write_text(json.dumps({"ratios": {"int8 (b)/(a)": 200.0}}))
    (tmp_path / "gguf_fold.json").write_text(
        json.dumps(
            {
                "rows": [
                    {"layout": "Q4_K_M", "path": "ia3fuse (block scales)", "seconds": 0.5},
                    {"layout": "Q4_K_M", "path": "requantize (gguf-py numpy)", "seconds": None},
                    {"layout": "Q4_K_M", "path": "requantize (ggml C)", "seconds": 20.0},
                ]
            }
        )
    )
    (tmp_path / "gguf_fold.md").write_text("# GGUF fold\n\n| x |\n|---|\n| 1 |\n")
    assert speed_ratios(tmp_path) == [
        ("merge 8 adapters: PEFT process / ia3fuse CLI", 2.5),
        ("fold int8: per-layer requantize / ia3fuse", 200.0),
        ("fold GGUF Q4_K_M: ggml requantize / ia3fuse", 40.0),
    ]
    doc = write_benchmarks_doc(tmp_path, tmp_path / "docs" / "benchmarks.md").read_text()
    assert (tmp_path / "speed_ratios.png").stat().st_size > 1000
    assert "![speed ratios](../benchmarks/results/speed_ratios.png)" in doc
    assert "### Folding into a GGUF file (`python benchmarks/gguf_fold.py`)\n\n| x |" in doc
