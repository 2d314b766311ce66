"""``ia3fuse search`` from the command line (in-process; the error matrix also through the real
entry point in the full suite): what it writes, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import ia3fuse
from factories import random_ia3_adapter, save_tiny_model, tiny_model, tiny_tokenizer
from cli_runner import RUNNERS, run_cli
from test_cli import leftovers, snapshot

RECORDS = [{"input": w + "=", "target": w[::-1]} for w in ("abc", "hello", "ia3", "fuse", "xyz", "merge")]


@dataclass(frozen=True)
class SearchInputs:
    root: Path
    model: Path
    a: Path
    b: Path
    wide: Path  # a llama with hidden size 48: vectors that fit no module of the model
    data: Path
    empty: Path
    too_long: Path
    big_tokenizer: Path  # 129 tokens: more than the model's 128 embedding rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SearchInputs:
    root = tmp_path_factory.mktemp("cli-search")
    model_dir = save_tiny_model(root / "model", "llama", 0, tokenizer=True)
    model = tiny_model("llama", 0)
    a = random_ia3_adapter(model, root / "a", seed=1, spread=0.5)
    b = random_ia3_adapter(model, root / "b", seed=2, spread=0.5)
    wide = random_ia3_adapter(tiny_model("llama", 0, hidden_size=48, head_dim=12), root / "wide", seed=4)
    data = root / "few.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    empty = root / "empty.jsonl"
    empty.write_text("\n")
    too_long = root / "long.jsonl"
    too_long.write_text(json.dumps({"input": "a" * 60, "target": "b" * 10}) + "\n")  # 60 + 10 + eos = 71 tokens
    big = tiny_tokenizer()
    big.add_tokens([f"<extra{i}>" for i in range(129 - len(big))])
    big.save_pretrained(str(root / "big_tokenizer"))
    return SearchInputs(root, model_dir, a, b, wide, data, empty, too_long, root / "big_tokenizer")


def _search(i: SearchInputs, out: Path, *extra: object) -> list[object]:
    return ["search", "--model", i.model, "--adapters", i.a, i.b, "--data", i.data, "-o", out, "--no-progress", *extra]


def test_search_writes_adapter_recipe_table_and_plots(inputs: SearchInputs, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    res = run_cli(*_search(inputs, out, "--granularity", "layer", "--budget", "6"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "objective.png",
        "recipe.yaml",
        "search.json",
        "weights.md",
        "weights.png",
    ]
    summary = json.loads((out / "search.json").read_text())
    assert summary["granularity"] == "layer" and summary["forwards"] == 6 and len(summary["history"]) == 6
    assert summary["groups"] == ["model.layers.0", "model.layers.1"] and summary["names"] == ["a", "b"]
    assert "| adapter | model.layers.0 | model.layers.1 |" in res.stdout
    assert "(adam, layer-wise) in 6 of 6 forward passes\n" in res.stdout
    again = tmp_path / "again"
    res = run_cli("merge", out / "recipe.yaml", "-o", again, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    want, got = ia3fuse.load_adapter(out / "adapter").vectors, ia3fuse.load_adapter(again).vectors
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the search moved the weights off the uniform start
    assert summary["weights"] != [[0.5, 0.5], [0.5, 0.5]]


def test_cma_search_spends_the_budget_and_names_the_table(inputs: SearchInputs, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    res = run_cli(
        *_search(inputs, out, "--optimizer", "cma", "--budget", "40", "--batch-size", "2", "--name", "mine"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    batches = -(-len(RECORDS) // 2)  # 3: a candidate costs one pass per batch
    spent = 40 // batches * batches  # 13 whole candidates: 39 passes
    assert spent == 39
    assert "(cma, task-wise) in 39 of 40 forward passes (3 per evaluation: one per batch)\n" in res.stdout
    summary = json.loads((out / "search.json").read_text())
    assert summary["forwards"] == spent and summary["budget"] == 40 and summary["stopped"] == ""
    assert len(summary["history"]) == 13
    table = (out / "weights.md").read_text()
    assert table.startswith("# Searched weights of mine (task-wise, cma, objective loss)\n")
    assert "in 39 of 40 forward passes (3 per evaluation: one per batch).\n" in table
    assert "name: mine" in (out / "recipe.yaml").read_text()


@dataclass(frozen=True)
class Case:
    build: Callable[[SearchInputs, Path], list[object]]
    phrase: str


def _existing(i: SearchInputs, t: Path) -> list[object]:
    (t / "OUT").mkdir()
    (t / "OUT" / "keep.txt").write_text("mine")
    return _search(i, t / "OUT")


BAD = {
    "missing_data": Case(
        lambda i, t: [
            "search",
            "--model",
            i.model,
            "--adapters",
            i.a,
            i.b,
            "--data",
            t / "none.jsonl",
            "-o",
            t / "OUT",
        ],
        "cannot be read",
    ),
    "empty_data": Case(
        lambda i, t: ["search", "--model", i.model, "--adapters", i.a, i.b, "--data", i.empty, "-o", t / "OUT"],
        "the data hold no examples",
    ),
    "too_long": Case(
        lambda i, t: ["search", "--model", i.model, "--adapters", i.a, i.b, "--data", i.too_long, "-o", t / "OUT"],
        "example 0 is 71 tokens long but the model's context holds 64",
    ),
    "budget_zero": Case(lambda i, t: _search(i, t / "OUT", "--budget", "0"), "budget=0"),
    "budget_below_one_pass": Case(
        lambda i, t: _search(i, t / "OUT", "--budget", "1", "--batch-size", "2"),
        "is less than one pass over the data (3 batches)",
    ),
    "other_base": Case(
        lambda i, t: ["search", "--model", i.model, "--adapters", i.a, i.wide, "--data", i.data, "-o", t / "OUT"],
        "different shapes",
    ),
    "only_other_base": Case(
        lambda i, t: ["search", "--model", i.model, "--adapters", i.wide, "--data", i.data, "-o", t / "OUT"],
        "do not fit the model",
    ),
    "tokenizer_mismatch": Case(
        lambda i, t: _search(i, t / "OUT", "--tokenizer", i.big_tokenizer), "the tokenizer does not match the model"
    ),
    "not_a_model": Case(
        lambda i, t: ["search", "--model", i.a, "--adapters", i.a, i.b, "--data", i.data, "-o", t / "OUT"],
        "is not a transformers model directory",
    ),
    "unknown_method": Case(lambda i, t: _search(i, t / "OUT", "--method", "tie"), "valid methods are:"),
    "bad_bounds": Case(lambda i, t: _search(i, t / "OUT", "--bounds", "1", "0"), "low < high"),
    "output_exists": Case(_existing, "already exists"),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_search_is_one_line_exit_2_and_writes_nothing(
    case: Case, inputs: SearchInputs, tmp_path: Path, runner: str
) -> None:
    argv = case.build(inputs, tmp_path)
    before_inputs, before_here = snapshot(inputs.root), snapshot(tmp_path)
    res = run_cli(*argv, cwd=tmp_path, real=runner == "subprocess")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ia3fuse: error: "), res.stderr
    assert case.phrase in lines[0], lines[0]
    assert res.stdout == ""
    assert snapshot(inputs.root) == before_inputs
    assert snapshot(tmp_path) == before_here
    assert leftovers(tmp_path, "OUT") == []
